"""Pure decisions about which blocks a server should hold. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable


def block_throughputs(total_blocks: int, spans: Iterable[tuple[int, int, float]]) -> list[float]:
    """Summed throughput per block of the model, from (start, end, throughput) of every server."""
    per_block = [0.0] * total_blocks
    for start, end, throughput in spans:
        for block in range(max(start, 0), min(end, total_blocks)):
            per_block[block] += throughput
    return per_block


def choose_span(total_blocks: int, num_blocks: int, spans: Iterable[tuple[int, int, float]]) -> tuple[int, int]:
    """The window of `num_blocks` blocks that the swarm serves worst.

    Windows compare by their blocks' throughputs sorted ascending (the weakest block first), so a
    new server covers the weakest blocks; ties go to the lowest start."""
    num_blocks = min(num_blocks, total_blocks)
    per_block = block_throughputs(total_blocks, spans)
    start = min(range(total_blocks - num_blocks + 1), key=lambda s: sorted(per_block[s : s + num_blocks]))
    return start, start + num_blocks
