"""A swarm DHT node driven over stdin/stdout, one JSON object per line (for multi-process tests).

Usage: python tests/dht_node_script.py [--bootstrap /ip4/127.0.0.1/tcp/P/p2p/ID]
Prints {"addr": ...} once listening, then answers each command line:
  {"cmd": "announce", "model": M, "start": S, "end": E, "num_blocks": N, "ttl": T}
  {"cmd": "get", "model": M, "start": S, "end": E}
  {"cmd": "models"}
  {"cmd": "quit"}
with {"ok": true, "elapsed": seconds, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from petald.p2p.dht import ServerEntry, ServerState, SwarmDHT, open_swarm_dht
from petald.p2p.host import full_addrs, load_or_create_identity, open_host, peer_id_of


def reply(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def serve_commands(swarm: SwarmDHT, key_pair: Any) -> None:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        cmd = json.loads(line)
        started = time.perf_counter()
        try:
            if cmd["cmd"] == "quit":
                reply({"ok": True})
                return
            if cmd["cmd"] == "announce":
                entry = ServerEntry(
                    peer_id=str(peer_id_of(key_pair)),
                    state=ServerState.ONLINE,
                    start=cmd["start"],
                    end=cmd["end"],
                    throughput=100.0,
                    addrs=full_addrs(swarm.host),
                    cache_tokens_left=4096,
                    quant="none",
                    version="test",
                )
                stored = await swarm.announce(
                    cmd["model"], entry, key_pair, num_blocks=cmd["num_blocks"], ttl=cmd["ttl"]
                )
                result: dict[str, Any] = {"stored": stored}
            elif cmd["cmd"] == "get":
                servers = await swarm.get_servers(cmd["model"], range(cmd["start"], cmd["end"]))
                result = {"servers": {str(b): sorted(peers) for b, peers in servers.items()}}
            elif cmd["cmd"] == "models":
                result = {"models": await swarm.list_models()}
            else:
                raise ValueError(f"unknown command {cmd['cmd']!r}")
        except Exception as e:
            reply({"ok": False, "error": repr(e)})
            continue
        reply({"ok": True, "elapsed": time.perf_counter() - started, **result})


async def main(bootstrap: list[str]) -> None:
    key_pair = load_or_create_identity(None)
    async with open_host(key_pair, ("127.0.0.1", 0)) as host:
        async with open_swarm_dht(host, bootstrap) as swarm:
            reply({"addr": full_addrs(host)[0], "peer_id": str(host.get_id())})
            await serve_commands(swarm, key_pair)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", action="append", default=[])
    trio.run(main, parser.parse_args().bootstrap)
