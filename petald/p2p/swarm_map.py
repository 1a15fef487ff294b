"""Who serves what: pure functions over the entries a DHT read found, shared by the node (span choice and
balance), the client (routing) and `petald status`, so all three see the same swarm. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping

from petald.p2p.dht import ServerEntry, ServerState


def current_entries(found: Mapping[int, Mapping[str, ServerEntry]]) -> dict[str, ServerEntry]:
    """Peer id -> the entry that says where each server is now, from the entries found per block.

    A server's entry is its newest one that is not OFFLINE, unless a newer OFFLINE entry has the same span
    (it left or is draining: then that OFFLINE entry). A server that moved has OFFLINE entries under the
    blocks it left and JOINING or ONLINE ones under its new blocks, and keeps its new place whichever of the
    two was announced first."""
    by_peer: dict[str, list[ServerEntry]] = {}
    for entries in found.values():
        for peer, entry in entries.items():
            by_peer.setdefault(peer, []).append(entry)
    current = {}
    for peer, entries in by_peer.items():
        serving = [e for e in entries if e.state != ServerState.OFFLINE]
        if not serving:
            current[peer] = max(entries, key=lambda e: e.updated_at)
            continue
        latest = max(serving, key=lambda e: e.updated_at)
        left = [e for e in entries if e.state == ServerState.OFFLINE and (e.start, e.end) == (latest.start, latest.end)]
        newest_left = max(left, key=lambda e: e.updated_at, default=None)
        current[peer] = latest if newest_left is None or newest_left.updated_at < latest.updated_at else newest_left
    return current


def serving(entries: Mapping[str, ServerEntry]) -> dict[str, ServerEntry]:
    """The servers that are JOINING or ONLINE (those that hold or are about to hold their blocks)."""
    return {peer: e for peer, e in entries.items() if e.state != ServerState.OFFLINE}


def block_servers(entries: Mapping[str, ServerEntry], num_blocks: int) -> dict[int, list[str]]:
    """Block -> the peer ids of the ONLINE servers covering it, for blocks [0, num_blocks)."""
    blocks: dict[int, list[str]] = {block: [] for block in range(num_blocks)}
    for peer, e in sorted(entries.items()):
        if e.state == ServerState.ONLINE:
            for block in range(max(e.start, 0), min(e.end, num_blocks)):
                blocks[block].append(peer)
    return blocks


def unserved_blocks(entries: Mapping[str, ServerEntry], num_blocks: int) -> list[int]:
    """The blocks of [0, num_blocks) that no ONLINE server covers."""
    return [block for block, peers in block_servers(entries, num_blocks).items() if not peers]
