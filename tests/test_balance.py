"""Servers choosing and moving spans: pure functions over spans and throughputs, no network."""

from __future__ import annotations

import random

import pytest

from petald.p2p.swarm_map import block_servers, current_entries, serving, unserved_blocks
from petald.serving.balance import block_throughputs, choose_span, move_candidates, settle, should_move

TWICE_COVERED = {  # 30 blocks, 6 servers of 10 blocks: every block served twice
    "a": (0, 10, 100.0),
    "b": (0, 10, 100.0),
    "c": (10, 20, 100.0),
    "d": (10, 20, 100.0),
    "e": (20, 30, 100.0),
    "f": (20, 30, 100.0),
}


def test_choose_span_covers_the_weakest_blocks_and_counts_every_given_server():
    assert choose_span(30, 10, []) == (0, 10)
    assert choose_span(30, 10, [(0, 10, 100.0)]) == (10, 20)
    assert choose_span(30, 10, [(0, 10, 100.0), (10, 20, 100.0)]) == (20, 30)
    assert choose_span(30, 10, [(0, 10, 100.0), (20, 30, 50.0)]) == (10, 20)  # the gap before the slow blocks
    assert choose_span(30, 40, [(0, 10, 100.0)]) == (0, 30)  # a server larger than the model takes all of it


def test_a_server_moves_to_cover_a_gap():
    spans = {"a": (0, 10, 100.0), "b": (0, 10, 100.0), "c": (10, 20, 100.0)}  # blocks 20:30 are served by no one
    assert should_move(30, "a", spans, 0.75) == (20, 30)
    assert should_move(30, "b", spans, 0.75) == (20, 30)
    assert should_move(30, "c", spans, 0.75) is None  # the only server of 10:20 stays


def test_a_balanced_swarm_moves_nobody():
    for peer in TWICE_COVERED:
        assert should_move(30, peer, TWICE_COVERED, 0.75) is None
    once = {"a": (0, 10, 100.0), "b": (10, 20, 100.0), "c": (20, 30, 100.0)}
    for peer in once:
        assert should_move(30, peer, once, 0.75) is None


def test_after_a_server_leaves_the_others_close_the_gap_one_check_at_a_time():
    spans = {peer: span for peer, span in TWICE_COVERED.items() if peer not in ("c", "d")}  # 10:20 is unserved
    moves = {peer: should_move(30, peer, spans, 0.75) for peer in spans}
    assert moves == {"a": (10, 20), "b": (10, 20), "e": (10, 20), "f": (10, 20)}
    spans["a"] = (10, 20, 100.0)  # the first to check moves; the others then see the gap closed
    assert [should_move(30, peer, spans, 0.75) for peer in spans] == [None] * 4
    assert min(block_throughputs(30, spans.values())) == 100.0


def test_move_candidates_name_every_server_that_would_rush_to_a_gap():
    spans = {peer: span for peer, span in TWICE_COVERED.items() if peer not in ("c", "d")}
    assert move_candidates(30, spans) == {"a": (10, 20), "b": (10, 20), "e": (10, 20), "f": (10, 20)}
    assert move_candidates(30, TWICE_COVERED) == {}
    spans = {"a": (0, 10, 100.0), "b": (3, 13, 100.0)}  # a cannot move without uncovering 0:3
    assert move_candidates(30, spans) == {"b": (10, 20)}


def test_servers_that_all_joined_on_the_same_blocks_spread_out():
    spans = {peer: (0, 10, 100.0) for peer in "abcdef"}  # the worst race: everyone read an empty swarm
    for _ in range(3):
        for peer in sorted(spans):
            target = should_move(30, peer, spans, 0.75)
            if target is not None:
                spans[peer] = (*target, 100.0)
    assert block_throughputs(30, spans.values()) == [200.0] * 30


def test_a_move_that_would_uncover_blocks_only_this_server_holds_is_refused():
    spans = {"a": (0, 10, 100.0), "b": (3, 13, 100.0)}  # a alone holds 0:3; 13:30 is unserved
    assert should_move(30, "a", spans, 0.75) is None  # 13:23 would be better for a, but 0:3 would go dark
    assert should_move(30, "b", spans, 0.75) == (10, 20)  # 3:10 stays with a; the gap shrinks from 17 to 10


def test_the_weakest_block_must_gain_more_than_the_quality_threshold():
    # blocks 10:20 have 100, blocks 0:10 have 200; b moving there makes every block 150: 100 / 150 = 0.67
    spans = {"a": (0, 20, 100.0), "b": (0, 10, 50.0), "c": (0, 10, 50.0)}
    assert should_move(20, "b", spans, 0.75) == (10, 20)
    assert should_move(20, "b", spans, 0.7) == (10, 20)
    assert should_move(20, "b", spans, 0.65) is None
    assert should_move(20, "b", spans, 0.5) is None


def test_no_move_when_the_weakest_block_would_not_gain():
    # 5 servers of 10 over 30 blocks: some block is always served once, wherever they stand
    spans = {peer: span for peer, span in TWICE_COVERED.items() if peer != "f"}
    for peer in spans:
        assert should_move(30, peer, spans, 0.75) is None


def test_the_decision_does_not_depend_on_the_order_the_swarm_was_read_in():
    spans = {"a": (0, 10, 100.0), "b": (0, 10, 100.0), "c": (0, 10, 100.0), "d": (5, 15, 70.0), "e": (12, 22, 30.0)}
    expected = {peer: should_move(30, peer, spans, 0.75) for peer in spans}
    assert expected["a"] is not None
    items = list(spans.items())
    for seed in range(10):
        random.Random(seed).shuffle(items)
        shuffled = dict(items)
        assert {peer: should_move(30, peer, shuffled, 0.75) for peer in shuffled} == expected


def test_unknown_or_empty_spans_are_ignored():
    assert should_move(30, "me", {"a": (0, 10, 100.0)}, 0.75) is None  # not in the swarm: nothing to move
    spans = {"me": (0, 10, 100.0), "a": (0, 10, 100.0), "zero": (10, 30, 0.0), "beyond": (40, 50, 100.0)}
    assert should_move(30, "me", spans, 0.75) == (10, 20)  # the zero-throughput and out-of-model spans serve nothing


@pytest.mark.parametrize("peers", [1, 5, 12])
def test_settle_stops_and_keeps_every_span_length(peers):
    rng = random.Random(peers)
    spans = {f"p{i}": (start := rng.randrange(20), start + 10, rng.uniform(10, 100)) for i in range(peers)}
    settled = settle(30, spans)
    assert {peer: end - start for peer, (start, end, _) in settled.items()} == {peer: 10 for peer in spans}
    assert settle(30, settled) == settled  # a settled swarm is a fixed point


def entry(peer: str, state: str, start: int, end: int, updated_at: float):
    from petald.p2p.dht import ServerEntry, ServerState

    return ServerEntry(peer, ServerState(state), start, end, 100.0, [], 0, "none", "", updated_at=updated_at)


def announced(*entries) -> dict[int, dict[str, object]]:
    """What get_servers finds: per block, one entry per peer (the one stored under that block's key)."""
    found: dict[int, dict[str, object]] = {block: {} for block in range(30)}
    for e in entries:
        for block in range(e.start, e.end):
            found[block][e.peer_id] = e
    return found


def test_a_moving_server_is_placed_at_its_new_blocks_whichever_announcement_came_first():

    for claimed_at, left_at in ((2.0, 3.0), (3.0, 2.0)):
        found = announced(entry("m", "OFFLINE", 0, 10, left_at), entry("m", "JOINING", 10, 20, claimed_at))
        assert {p: (e.state, e.start) for p, e in current_entries(found).items()} == {"m": ("JOINING", 10)}
    # a write of the OFFLINE entry was lost under one block: the stale ONLINE one there is older than the claim
    found = announced(entry("m", "OFFLINE", 0, 10, 3.0), entry("m", "JOINING", 10, 20, 2.0))
    found[5]["m"] = entry("m", "ONLINE", 0, 10, 1.0)
    assert current_entries(found)["m"].start == 10


def test_a_server_that_left_is_not_placed_anywhere():
    found = announced(entry("a", "OFFLINE", 0, 10, 5.0), entry("b", "ONLINE", 10, 20, 1.0))
    found[3]["a"] = entry("a", "ONLINE", 0, 10, 4.0)  # a stale copy under one block
    assert list(serving(current_entries(found))) == ["b"]
    assert current_entries(found)["a"].state == "OFFLINE"  # what status shows: it left


def test_block_servers_counts_only_online_servers():
    found = announced(
        entry("a", "JOINING", 0, 10, 1.0), entry("b", "ONLINE", 5, 15, 1.0), entry("c", "OFFLINE", 15, 30, 1.0)
    )
    current = current_entries(found)
    blocks = block_servers(current, 30)
    assert blocks[0] == [] and blocks[5] == ["b"] and blocks[14] == ["b"] and blocks[15] == []
    assert unserved_blocks(current, 30) == [*range(0, 5), *range(15, 30)]
