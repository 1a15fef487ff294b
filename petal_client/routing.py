"""Pure route choice: which servers carry a request through blocks [start, end). No I/O here.

A route is a list of hops, each a server running a contiguous part of its span; hops meet at block
boundaries. Inference takes the min-latency route (Dijkstra over block boundaries); forward/backward
work takes a throughput-weighted random route so load spreads over servers."""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass

from petald.errors import PetalError

DEFAULT_RTT = 0.05  # seconds, for a server we have not pinged yet
NO_CACHE_PENALTY = 10.0  # seconds: a server without cache room is a last resort
MAX_BUSY = 0.9  # a server busier than this is costed as this busy (its figure is an average over seconds)
MOVE_MIN_GAIN = 0.25  # a hop moves only to a server at least this much faster per step (no flapping on noise)
REPLAY_TOKENS_PER_STEP = 16  # replaying a hop's history to a new server costs a step per this many tokens


class MissingBlocksError(PetalError):
    """Some blocks of the model are served by no usable server."""


@dataclass(frozen=True)
class ServerSpan:
    """What routing knows of one server: its span, speed, free cache and how far away it is."""

    peer_id: str
    start: int
    end: int
    throughput: float  # blocks x steps per second: k blocks take k / throughput seconds
    cache_tokens_left: int = 1 << 62
    rtt: float | None = None  # seconds; None = not measured
    busy: float = 0.0  # fraction of recent time its compute lane was running (its load)


@dataclass(frozen=True)
class Hop:
    """Server `peer_id` runs blocks [start, end)."""

    peer_id: str
    start: int
    end: int


def missing_blocks(servers: Iterable[ServerSpan], start: int, end: int) -> list[tuple[int, int]]:
    """The maximal ranges inside [start, end) that no server covers."""
    covered = [False] * (end - start)
    for s in servers:
        for block in range(max(s.start, start), min(s.end, end)):
            covered[block - start] = True
    gaps, block = [], start
    while block < end:
        if covered[block - start]:
            block += 1
            continue
        gap_end = block
        while gap_end < end and not covered[gap_end - start]:
            gap_end += 1
        gaps.append((block, gap_end))
        block = gap_end
    return gaps


def _check_coverage(servers: list[ServerSpan], start: int, end: int, model: str) -> None:
    gaps = missing_blocks(servers, start, end)
    if gaps:
        ranges = ", ".join(f"{a}–{b - 1}" if b - a > 1 else f"{a}" for a, b in gaps)
        several = len(gaps) > 1 or gaps[0][1] - gaps[0][0] > 1
        noun, verb = ("blocks", "are") if several else ("block", "is")
        raise MissingBlocksError(f"{noun} {ranges} of {model} {verb} served by no one")


def hop_cost(server: ServerSpan, blocks: int, cache_tokens_needed: int) -> float:
    """Seconds this server adds to one step for `blocks` blocks: half a round trip plus compute, the compute
    stretched by the server's load: a step that finds the lane busy a fraction b of the time waits, on average,
    as a queue with that utilisation does (1 / (1 - b))."""
    rtt = DEFAULT_RTT if server.rtt is None else server.rtt
    compute = blocks / max(server.throughput, 1e-9)
    cost = rtt / 2 + compute / (1 - min(max(server.busy, 0.0), MAX_BUSY))
    if server.cache_tokens_left < cache_tokens_needed:
        cost += NO_CACHE_PENALTY
    return cost


def min_latency_route(
    servers: Iterable[ServerSpan],
    start: int,
    end: int,
    *,
    cache_tokens_needed: int = 0,
    model: str = "the model",
) -> list[Hop]:
    """The route through [start, end) with the least total hop cost (ties: fewer hops, then peer id)."""
    servers = [s for s in servers if s.start < end and s.end > start and s.throughput > 0]
    _check_coverage(servers, start, end, model)
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    came_from: dict[int, Hop] = {}
    queue = [(0.0, 0, start)]
    while queue:
        cost, hops, block = heapq.heappop(queue)
        if block == end:
            break
        if (cost, hops) > best.get(block, (float("inf"), 0)):
            continue
        for s in sorted(servers, key=lambda s: s.peer_id):
            if not s.start <= block < s.end:
                continue
            for stop in range(block + 1, min(s.end, end) + 1):
                candidate = (cost + hop_cost(s, stop - block, cache_tokens_needed), hops + 1)
                if candidate < best.get(stop, (float("inf"), 0)):
                    best[stop] = candidate
                    came_from[stop] = Hop(s.peer_id, block, stop)
                    heapq.heappush(queue, (*candidate, stop))
    route, block = [], end
    while block != start:
        hop = came_from[block]
        route.append(hop)
        block = hop.start
    return route[::-1]


def better_server(
    current: ServerSpan,
    servers: Iterable[ServerSpan],
    hop: Hop,
    *,
    tokens: int,
    remaining_steps: int,
    cache_tokens_needed: int = 0,
) -> ServerSpan | None:
    """Where to move `hop` of a running session at a step boundary, or None to stay.

    The candidate is the cheapest other server holding all of the hop's blocks. It wins only if its cost per step
    is at most (1 - MOVE_MIN_GAIN) of the current server's (hysteresis: loads measured over seconds do not make
    routes flap), and what it saves over the `remaining_steps` exceeds replaying the hop's `tokens` tokens of
    history to it (one step, plus a step per REPLAY_TOKENS_PER_STEP tokens)."""
    blocks = hop.end - hop.start
    others = [
        s
        for s in servers
        if s.peer_id != current.peer_id and s.start <= hop.start and hop.end <= s.end and s.throughput > 0
    ]
    if not others:
        return None
    best = min(others, key=lambda s: (hop_cost(s, blocks, cache_tokens_needed), s.peer_id))
    staying = hop_cost(current, blocks, 0)  # it holds the session's cache already
    moving = hop_cost(best, blocks, cache_tokens_needed)
    if moving > (1 - MOVE_MIN_GAIN) * staying:
        return None
    replay = moving * (1 + tokens / REPLAY_TOKENS_PER_STEP)
    return best if (staying - moving) * remaining_steps > replay else None


def throughput_weighted_route(
    servers: Iterable[ServerSpan], start: int, end: int, rng: random.Random, *, model: str = "the model"
) -> list[Hop]:
    """A random route through [start, end): at each boundary, a server covering it is drawn with
    probability proportional to its throughput, and runs as far as its span goes."""
    servers = [s for s in servers if s.start < end and s.end > start and s.throughput > 0]
    _check_coverage(servers, start, end, model)
    route, block = [], start
    while block < end:
        here = [s for s in servers if s.start <= block < s.end]
        chosen = rng.choices(here, weights=[s.throughput for s in here])[0]
        stop = min(chosen.end, end)
        route.append(Hop(chosen.peer_id, block, stop))
        block = stop
    return route
