"""`petald status`: which servers hold which blocks of which model, read from the DHT."""

from __future__ import annotations

import json
import sys
import time

import trio

from petald.p2p.dht import ServerEntry, SwarmReadError, open_swarm_dht
from petald.p2p.host import load_or_create_identity, open_host, quiet_libp2p_logs
from petald.p2p.swarm_map import block_servers, current_entries


async def read_swarm(initial_peers: list[str], model: str | None) -> dict[str, dict]:
    """{model: {"num_blocks": n, "servers": {peer_id: entry}, "blocks": {block: [peer_id]}, "unread": [block]}}:
    every server's current entry (`current_entries`), the ONLINE servers of each block, and the blocks the
    swarm did not answer for (unknown, which is not the same as served by no one)."""
    async with open_host(load_or_create_identity(None), ("127.0.0.1", 0)) as host:
        async with open_swarm_dht(host, initial_peers, client=True) as dht:
            models = await dht.list_models()
            if model is not None:
                models = {model: models.get(model, 0)}
            result = {}
            for name, total in models.items():
                found, unread = await read_blocks(dht, name, total)
                servers = current_entries(found)
                result[name] = {
                    "num_blocks": total,
                    "servers": servers,
                    "blocks": block_servers(servers, total),
                    "unread": unread,
                }
            return result


STATUS_REREADS = 3


async def read_blocks(dht, model: str, total: int) -> tuple[dict[int, dict[str, ServerEntry]], list[int]]:
    """Every block's entries, and the blocks the swarm did not answer for; blocks that came back empty or
    unanswered are read again (up to 3 times, 0.5/1/2 s apart), because one read of a busy swarm can lose
    answers, and a blocks-less report would be wrong."""
    found: dict[int, dict[str, ServerEntry]] = {block: {} for block in range(total)}
    missing, unread = list(range(total)), []
    for attempt in range(STATUS_REREADS + 1):
        if attempt:
            await trio.sleep(0.25 * 2**attempt)
        try:
            read = await dht.get_servers(model, missing)
        except SwarmReadError as e:
            read = e.found
        found.update(read)
        unread = [block for block in missing if block not in read]
        missing = [block for block in missing if not found[block]]
        if not missing:
            break
    return found, unread


def print_status(initial_peers: list[str], model: str | None, as_json: bool) -> int:
    quiet_libp2p_logs()
    swarm = trio.run(read_swarm, initial_peers, model)
    if as_json:
        print(json.dumps({name: _jsonable(info) for name, info in swarm.items()}, indent=2))
        return 0
    if not swarm:
        print("no models are served in this swarm")
    now = time.time()
    for name, info in swarm.items():
        total = info["num_blocks"]
        print(f"{name}: {total} blocks, {len(info['servers'])} servers")
        for peer_id, e in sorted(info["servers"].items(), key=lambda item: (item[1].start, item[0])):
            print(
                f"  [{block_bar(e.start, e.end, total, e.state)}]  {peer_id}  {e.public_name or '-':<12} "
                f"blocks {e.start:>3}:{e.end:<3} {e.state:<8} {e.throughput:8.1f} blocks*steps/s  "
                f"cache {e.cache_tokens_left:>7} tokens free  {e.quant:<4} {e.weight_bytes / 2**20:6.0f} MB  "
                f"{reachability_text(e):<8} "
                f"expires in {e.expires_at - now:4.0f} s"
            )
        print(f"  [{coverage_bar(info['blocks'], info['unread'])}]  ONLINE servers per block (! none, ? unknown)")
        if info["unread"]:
            print(f"  ?? the swarm did not answer for blocks {_ranges(info['unread'])}: try again")
        missing = [b for b, peers in info["blocks"].items() if not peers and b not in info["unread"]]
        if missing:
            print(f"  !! blocks served by no one: {_ranges(missing)}")
    return 0


def reachability_text(entry) -> str:
    """How peers reach a server: public, relayed, ..., and how many peers it reaches directly by hole punching."""
    if entry.direct_peers:
        return f"{entry.reachability} ({len(entry.direct_peers)} direct)"
    return entry.reachability


BAR_MARKS = {"ONLINE": "#", "JOINING": "+", "OFFLINE": "-"}


def block_bar(start: int, end: int, num_blocks: int, state: str) -> str:
    """One character per block: the server's state mark (# ONLINE, + JOINING, - OFFLINE) on its blocks, '.'
    elsewhere."""
    mark = BAR_MARKS.get(str(state), "?")
    return "".join(mark if start <= block < end else "." for block in range(num_blocks))


def coverage_bar(blocks: dict[int, list[str]], unread: list[int]) -> str:
    """One character per block: how many ONLINE servers hold it (9 at most shown), '!' none, '?' unknown."""
    return "".join(
        "?" if block in unread else "!" if not peers else str(min(len(peers), 9))
        for block, peers in sorted(blocks.items())
    )


def _ranges(blocks: list[int]) -> str:
    spans, start = [], blocks[0]
    for prev, block in zip(blocks, blocks[1:] + [None], strict=True):
        if block != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = block
    return ", ".join(spans)


def _jsonable(info: dict) -> dict:
    return {
        "num_blocks": info["num_blocks"],
        "servers": {p: e.to_wire() | {"public_key": None, "signature": None} for p, e in info["servers"].items()},
        "blocks": {str(b): peers for b, peers in info["blocks"].items()},
        "unserved_blocks": [b for b, peers in info["blocks"].items() if not peers and b not in info["unread"]],
        "unread_blocks": info["unread"],
    }


if __name__ == "__main__":
    sys.exit(print_status(sys.argv[1:], None, False))
