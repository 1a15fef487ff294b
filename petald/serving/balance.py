"""Pure decisions about which blocks a server should hold. No I/O here.

A span is (start, end, throughput): blocks [start, end) served at `throughput` blocks x steps / s. A block's
throughput is the sum over the servers holding it; a block at 0 is a gap (no route crosses it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SpanInfo = tuple[int, int, float]

# Re-placing every server in turn settles within a few rounds; the bound only stops a cycle.
MAX_SETTLE_ROUNDS = 20


def block_throughputs(total_blocks: int, spans: Iterable[SpanInfo]) -> list[float]:
    """Summed throughput per block of the model, from (start, end, throughput) of every server."""
    per_block = [0.0] * total_blocks
    for start, end, throughput in spans:
        for block in range(max(start, 0), min(end, total_blocks)):
            per_block[block] += throughput
    return per_block


def choose_span(total_blocks: int, num_blocks: int, spans: Iterable[SpanInfo]) -> tuple[int, int]:
    """The window of `num_blocks` blocks that the swarm serves worst.

    Windows compare by their blocks' throughputs sorted ascending (the weakest block first), so a
    new server covers the weakest blocks; ties go to the lowest start."""
    num_blocks = min(num_blocks, total_blocks)
    start = _best_start(block_throughputs(total_blocks, spans), num_blocks)
    return start, start + num_blocks


def should_move(
    total_blocks: int, my_peer_id: str, spans: Mapping[str, SpanInfo], balance_quality: float
) -> tuple[int, int] | None:
    """The (start, end) this server should move to, or None to stay where it is.

    `spans` maps every JOINING or ONLINE server, this one included, to its span. The rule (Petals'):
    1. Take this server out and re-place it where `choose_span` would put it among the others. If that
       is where it is already (ties keep it there), stay.
    2. The move alone, everyone else staying put, must open no gap: every block served before stays
       served.
    3. Simulate the swarm after the move: every server in turn (in peer id order, so the answer is
       deterministic) re-places itself the same way, until a round moves nobody (`settle`).
    4. Move only if the swarm gains clearly from it: it ends with fewer uncovered blocks, or, with
       none before nor after, its weakest block gets faster: min_before / min_after < balance_quality
       (0.75: the weakest block gains a third). One server's move rarely reaches the settled state by
       itself; the others' own checks take the swarm there.
    Petals moves only when the settled swarm has no gap at all; step 4's "fewer uncovered blocks" also
    lets a swarm too small to serve every block shrink its gaps."""
    spans = _clipped(total_blocks, spans)
    target = _replacement(total_blocks, my_peer_id, spans)
    if target is None:
        return None
    moved = {**spans, my_peer_id: (*target, spans[my_peer_id][2])}
    before = block_throughputs(total_blocks, spans.values())
    after = block_throughputs(total_blocks, settle(total_blocks, moved).values())
    return target if _gains_clearly(before, after, balance_quality) else None


def move_candidates(total_blocks: int, spans: Mapping[str, SpanInfo]) -> dict[str, tuple[int, int]]:
    """Peer id -> the span that steps 1 and 2 of `should_move` would let it move to now, for every server
    that would move.

    Servers in the same place see the same gap, and if each moved whenever it gains they would all rush
    to it. A server can count the rivals heading where it is heading, and move with probability 1 / their
    number instead: one of them moves on average, and the next check sees its claim."""
    spans = _clipped(total_blocks, spans)
    targets = {peer: _replacement(total_blocks, peer, spans) for peer in sorted(spans)}
    return {peer: target for peer, target in targets.items() if target is not None}


def _replacement(total_blocks: int, peer: str, spans: dict[str, SpanInfo]) -> tuple[int, int] | None:
    """Steps 1 and 2 of `should_move`: where `peer` would re-place itself, if that moves it and opens no gap."""
    if peer not in spans:
        return None
    start, end, throughput = spans[peer]
    others = {p: span for p, span in spans.items() if p != peer}
    new_start = _best_start(block_throughputs(total_blocks, others.values()), end - start, current=start)
    if new_start == start:
        return None
    new_end = new_start + end - start
    before = block_throughputs(total_blocks, spans.values())
    alone = block_throughputs(total_blocks, [*others.values(), (new_start, new_end, throughput)])
    if any(was > 0 and now <= 0 for was, now in zip(before, alone, strict=True)):
        return None
    return new_start, new_end


def settle(
    total_blocks: int, spans: Mapping[str, SpanInfo], max_rounds: int = MAX_SETTLE_ROUNDS
) -> dict[str, SpanInfo]:
    """The swarm after every server, in peer id order, re-places itself where `choose_span` would put it
    among the others (staying on ties), round after round until a round moves nobody (or `max_rounds`)."""
    spans = dict(spans)
    for _ in range(max_rounds):
        moved = False
        for peer in sorted(spans):
            start, end, throughput = spans[peer]
            others = block_throughputs(total_blocks, (span for p, span in spans.items() if p != peer))
            new_start = _best_start(others, end - start, current=start)
            if new_start != start:
                spans[peer] = (new_start, new_start + end - start, throughput)
                moved = True
        if not moved:
            break
    return spans


def _best_start(per_block: list[float], length: int, current: int | None = None) -> int:
    """Start of the window of `length` blocks whose sorted throughputs are lexicographically smallest;
    `current` wins a tie (a server does not move for nothing), then the lowest start."""
    keys = {start: sorted(per_block[start : start + length]) for start in range(len(per_block) - length + 1)}
    best = min(keys, key=keys.__getitem__)
    return current if keys.get(current) == keys[best] else best


def _gains_clearly(before: list[float], after: list[float], balance_quality: float) -> bool:
    gaps_before, gaps_after = sum(t <= 0 for t in before), sum(t <= 0 for t in after)
    if gaps_before or gaps_after:
        return gaps_after < gaps_before
    return min(before) / min(after) < balance_quality


def _clipped(total_blocks: int, spans: Mapping[str, SpanInfo]) -> dict[str, SpanInfo]:
    """Spans cut to the model's blocks; empty ones and ones with no throughput dropped (they serve nothing)."""
    clipped = {}
    for peer, (start, end, throughput) in spans.items():
        start, end = max(start, 0), min(end, total_blocks)
        if start < end and throughput > 0:
            clipped[peer] = (start, end, float(throughput))
    return clipped
