"""Route choice on synthetic swarms: no network."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from petal_client.routing import (
    Hop,
    MissingBlocksError,
    ServerSpan,
    better_server,
    hop_cost,
    min_latency_route,
    missing_blocks,
    throughput_weighted_route,
)


def test_single_server_covering_everything_is_the_route():
    assert min_latency_route([ServerSpan("a", 0, 30, 100.0)], 0, 30) == [Hop("a", 0, 30)]


def test_route_combines_partial_spans():
    servers = [ServerSpan("a", 0, 20, 100.0, rtt=0.01), ServerSpan("b", 10, 30, 100.0, rtt=0.01)]
    route = min_latency_route(servers, 0, 30)
    assert [h.peer_id for h in route] == ["a", "b"]
    assert route[0].start == 0 and route[-1].end == 30 and route[0].end == route[1].start
    assert 10 <= route[0].end <= 20


def test_fast_near_servers_beat_slow_far_ones():
    servers = [
        ServerSpan("slow", 0, 30, throughput=10.0, rtt=0.01),
        ServerSpan("fast1", 0, 15, throughput=1000.0, rtt=0.01),
        ServerSpan("fast2", 15, 30, throughput=1000.0, rtt=0.01),
    ]
    assert [h.peer_id for h in min_latency_route(servers, 0, 30)] == ["fast1", "fast2"]


def test_far_servers_lose_to_one_hop_when_compute_is_cheap():
    servers = [
        ServerSpan("whole", 0, 30, throughput=1000.0, rtt=0.02),
        ServerSpan("half1", 0, 15, throughput=1000.0, rtt=0.02),
        ServerSpan("half2", 15, 30, throughput=1000.0, rtt=0.02),
    ]
    assert min_latency_route(servers, 0, 30) == [Hop("whole", 0, 30)]


def test_ties_are_broken_deterministically():
    servers = [ServerSpan(name, 0, 10, 100.0, rtt=0.01) for name in ("c", "a", "b")]
    assert min_latency_route(servers, 0, 10) == [Hop("a", 0, 10)]


def test_server_without_cache_room_is_avoided():
    servers = [
        ServerSpan("full", 0, 10, 1000.0, cache_tokens_left=0, rtt=0.001),
        ServerSpan("roomy", 0, 10, 10.0, cache_tokens_left=4096, rtt=0.05),
    ]
    assert min_latency_route(servers, 0, 10, cache_tokens_needed=512) == [Hop("roomy", 0, 10)]
    # but it is still used when nothing else can carry those blocks
    assert min_latency_route(servers[:1], 0, 10, cache_tokens_needed=512) == [Hop("full", 0, 10)]


def test_sub_range_route():
    servers = [ServerSpan("a", 0, 20, 100.0), ServerSpan("b", 20, 30, 100.0)]
    assert min_latency_route(servers, 5, 25) == [Hop("a", 5, 20), Hop("b", 20, 25)]


def test_gap_gives_a_clear_error():
    servers = [ServerSpan("a", 0, 12, 100.0), ServerSpan("b", 15, 30, 100.0)]
    assert missing_blocks(servers, 0, 30) == [(12, 15)]
    with pytest.raises(MissingBlocksError, match="blocks 12–14 of smollm2-135m are served by no one"):
        min_latency_route(servers, 0, 30, model="smollm2-135m")
    with pytest.raises(MissingBlocksError, match="block 29 of m is served"):
        throughput_weighted_route([ServerSpan("a", 0, 29, 1.0)], 0, 30, random.Random(0), model="m")


def test_throughput_weighted_route_spreads_load_by_throughput():
    servers = [ServerSpan("big", 0, 30, 300.0), ServerSpan("small", 0, 30, 100.0)]
    rng = random.Random(0)
    counts = Counter(throughput_weighted_route(servers, 0, 30, rng)[0].peer_id for _ in range(2000))
    assert 0.7 < counts["big"] / 2000 < 0.8


def test_throughput_weighted_route_covers_the_range_contiguously():
    servers = [ServerSpan("a", 0, 10, 1.0), ServerSpan("b", 5, 20, 1.0), ServerSpan("c", 15, 30, 1.0)]
    rng = random.Random(3)
    for _ in range(50):
        route = throughput_weighted_route(servers, 0, 30, rng)
        assert route[0].start == 0 and route[-1].end == 30
        assert all(x.end == y.start for x, y in zip(route, route[1:], strict=False))


# ---------------------------------------------------------------- load: new routes and moves at step boundaries


def test_a_busy_server_costs_more_and_new_routes_take_the_idle_one():
    idle = ServerSpan("idle", 0, 6, throughput=100, rtt=0.004, busy=0.0)
    loaded = ServerSpan("loaded", 0, 6, throughput=100, rtt=0.002, busy=0.6)
    assert hop_cost(loaded, 6, 0) > 2 * hop_cost(idle, 6, 0) - 0.01
    assert min_latency_route([idle, loaded], 0, 6) == [Hop("idle", 0, 6)]
    # an average near 1 is still a finite cost: a saturated server is a poor choice, not an impossible one
    assert hop_cost(ServerSpan("full", 0, 6, throughput=100, busy=1.0), 6, 0) < 1


def test_a_hop_moves_only_for_a_clear_gain_that_pays_for_its_replay():
    hop = Hop("loaded", 0, 6)
    loaded = ServerSpan("loaded", 0, 6, throughput=100, rtt=0.002, busy=0.6)
    idle = ServerSpan("idle", 0, 6, throughput=100, rtt=0.002)
    assert better_server(loaded, [loaded, idle], hop, tokens=10, remaining_steps=50) == idle
    # a small gain is noise: no move (hysteresis)
    slightly = ServerSpan("slightly", 0, 6, throughput=100, rtt=0.002, busy=0.1)
    assert better_server(slightly, [slightly, idle], Hop("slightly", 0, 6), tokens=10, remaining_steps=50) is None
    # the gain over the steps left does not pay for replaying a long history
    assert better_server(loaded, [loaded, idle], hop, tokens=2000, remaining_steps=3) is None
    # only a server holding all of the hop's blocks can take it over, and one without cache room is a last resort
    partial = ServerSpan("partial", 0, 3, throughput=100, rtt=0.002)
    full_cache = ServerSpan("full-cache", 0, 6, throughput=100, rtt=0.002, cache_tokens_left=10)
    others = [loaded, partial, full_cache]
    assert better_server(loaded, others, hop, tokens=10, remaining_steps=50, cache_tokens_needed=64) is None
    # once moved, the hop does not come back while the old server is as loaded as it was
    assert better_server(idle, [loaded, idle], Hop("idle", 0, 6), tokens=10, remaining_steps=50) is None
