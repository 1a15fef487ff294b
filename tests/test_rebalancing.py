"""Servers started with --num-blocks spread over the model, and close the gap that leaving servers open: real
petald processes on 127.0.0.1, a tiny Llama with 30 blocks, six servers of 10 blocks started all at once."""

from __future__ import annotations

import os
import re
import time

import pytest
import trio

from petald.local_swarm import NodeProcess, local_swarm
from petald.models.checkpoints import make_tiny_llama
from petald.p2p.dht import ServerState, open_swarm_dht
from petald.p2p.host import load_or_create_identity, open_host
from petald.p2p.swarm_map import current_entries

BLOCKS = 30
# Slower than the --heartbeat 2 --expiry 6 of smaller tests: seven nodes re-announcing every 2 s and reading all 30
# blocks every 3 s keep two CPU cores busy, and DHT requests then time out.
SERVER_FLAGS = [
    *("--num-blocks", "10", "--throughput", "100", "--port", "0"),
    *("--heartbeat", "5", "--expiry", "15", "--balance-period", "10", "--log-level", "debug"),
]


@pytest.fixture(scope="module")
def tiny_llama_30(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-30", num_layers=BLOCKS)


SERVING = re.compile(r"serving blocks (\d+):(\d+)")


def online_spans(addr: str, model: str) -> dict[str, tuple[int, int]]:
    """Peer id -> span of every server ONLINE in the DHT, read as a client reads it ({} if that took over 60 s)."""

    async def read() -> dict[str, tuple[int, int]]:
        with trio.move_on_after(60):
            async with open_host(load_or_create_identity(None), ("127.0.0.1", 0)) as host:
                async with open_swarm_dht(host, [addr], client=True) as dht:
                    found = await dht.get_servers(model, range(BLOCKS))
            return {p: (e.start, e.end) for p, e in current_entries(found).items() if e.state == ServerState.ONLINE}
        return {}

    return trio.run(read)


def coverage(spans: dict[str, tuple[int, int]]) -> list[int]:
    """How many servers hold each block."""
    return [sum(start <= block < end for start, end in spans.values()) for block in range(BLOCKS)]


def serving_now(server: NodeProcess) -> tuple[int, int] | None:
    """The span a server process serves, from its log: its last "serving blocks", unless it began to move or
    stop since."""
    log = server.output()
    found = list(SERVING.finditer(log))
    if not found or re.search("moving from|stopping", log[found[-1].end() :]):
        return None
    return int(found[-1][1]), int(found[-1][2])


def wait_until_settled(addr: str, model: str, servers: dict[str, NodeProcess], timeout: float) -> dict:
    """The spans once every one of `servers` serves (none mid-move), every block is served, and the DHT shows
    exactly that to clients."""
    deadline = time.monotonic() + timeout
    while True:
        spans = {peer: serving_now(server) for peer, server in servers.items()}
        if all(spans.values()) and min(coverage(spans)) > 0 and online_spans(addr, model) == spans:
            if spans == {peer: serving_now(server) for peer, server in servers.items()}:  # none began to move
                return spans
        assert time.monotonic() < deadline, f"not settled after {timeout} s: {spans}"
        time.sleep(3)


def test_servers_spread_over_the_model_then_close_the_gap_left_by_leaving_servers(tiny_llama_30, tmp_path):
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}
    model = tiny_llama_30.name
    with local_swarm(tmp_path, env) as swarm:
        bootstrap = swarm.start("dht", "--port", "0", "--new-swarm")
        servers = [
            swarm.start("start", "--model", str(tiny_llama_30), "--initial-peers", bootstrap.addr, *SERVER_FLAGS)
            for _ in range(6)
        ]
        by_id = {server.peer_id: server for server in servers}

        # six servers of 10 blocks serve all 30 (joining together, some pick the same span at first; the
        # balance checks then move them)
        spans = wait_until_settled(bootstrap.addr, model, by_id, timeout=240)

        # the servers of the least served block leave (one, or the two of a twice-served swarm): a real gap
        counts = coverage(spans)
        weakest = counts.index(min(counts))
        leaving = {peer for peer, (start, end) in spans.items() if start <= weakest < end}
        staying = {peer: server for peer, server in by_id.items() if peer not in leaving}
        for peer in leaving:
            assert by_id[peer].stop() == 0, by_id[peer].output()

        # within a few balance periods, servers that stay serve every block again: one of them moved to the gap
        spans = wait_until_settled(bootstrap.addr, model, staying, timeout=180)
        mover = next(peer for peer, (start, end) in spans.items() if start <= weakest < end)
        log = staying[mover].output()
        moved = list(re.finditer(rf"moving from blocks \d+:\d+ to {spans[mover][0]}:{spans[mover][1]}", log))
        assert moved, log[-3000:]
        steps = ["announcing JOINING for blocks", "draining the sessions", "loading blocks", "serving blocks"]
        assert re.search(".*".join(steps), log[moved[-1].end() :], re.S), log[-3000:]
