"""Swarm state across separate processes on 127.0.0.1: announce, merge, model index, expiry."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from petald.p2p.dht import REQUEST_TIMEOUT_S, BootstrapError, open_swarm_dht
from petald.p2p.host import open_host, peer_id_of

REPO = Path(__file__).resolve().parents[1]
NODE_SCRIPT = REPO / "tests" / "dht_node_script.py"
REPLY_TIMEOUT_S = 60.0


class Node:
    """A dht_node_script.py process spoken to one JSON line at a time."""

    def __init__(self, log: IO[str], bootstrap: str | None = None) -> None:
        args = [sys.executable, str(NODE_SCRIPT)] + (["--bootstrap", bootstrap] if bootstrap else [])
        self.process = subprocess.Popen(
            args,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True).start()
        self.addr = ""

    def _pump(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.lines.put(line)

    def reply(self) -> dict[str, Any]:
        try:
            return json.loads(self.lines.get(timeout=REPLY_TIMEOUT_S))
        except queue.Empty:
            raise AssertionError(f"node {self.process.pid} gave no answer in {REPLY_TIMEOUT_S} s") from None

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer = self.reply()
        assert answer["ok"], answer
        return answer

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Any]:
    """Starts nodes; every one is killed by PID at the end, even if the test failed."""
    nodes: list[Node] = []
    log = (tmp_path / "nodes.log").open("w")

    def start(bootstrap: str | None = None) -> Node:
        node = Node(log, bootstrap)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()
        log.close()
        print((tmp_path / "nodes.log").read_text()[-4000:])


def started(nodes: list[Node]) -> None:
    for node in nodes:
        node.addr = node.reply()["addr"]


def servers_seen(reader: Node, start: int, end: int) -> dict[int, list[str]]:
    answer = reader.call(cmd="get", model="tiny-llama", start=start, end=end)
    return {int(block): peers for block, peers in answer["servers"].items()}


def test_reader_sees_both_servers_on_shared_blocks_and_not_after_expiry(start_node: Any) -> None:
    bootstrap = start_node()
    started([bootstrap])
    first, second, reader = (start_node(bootstrap.addr) for _ in range(3))
    started([first, second, reader])
    first_id, second_id = (node.addr.rsplit("/", 1)[1] for node in (first, second))

    first.call(cmd="announce", model="tiny-llama", start=0, end=6, num_blocks=8, ttl=60)
    # The second announcement expires soon; blocks 4 and 5 are served by both.
    second_ttl = 6.0
    announced_at = time.time()
    second.call(cmd="announce", model="tiny-llama", start=4, end=8, num_blocks=8, ttl=second_ttl)

    seen = servers_seen(reader, 0, 8)
    assert time.time() < announced_at + second_ttl, "the read came too late to see the short-lived entry"
    assert seen == {
        **{block: [first_id] for block in range(0, 4)},
        **{block: sorted([first_id, second_id]) for block in (4, 5)},
        **{block: [second_id] for block in (6, 7)},
    }
    assert reader.call(cmd="models")["models"] == {"tiny-llama": 8}

    time.sleep(max(0.0, announced_at + second_ttl - time.time()) + 0.5)
    assert servers_seen(reader, 0, 8) == {
        **{block: [first_id] for block in range(0, 6)},
        **{block: [] for block in (6, 7)},
    }
    # The first server's heartbeat keeps its entries and drops the expired ones of the second.
    first.call(cmd="announce", model="tiny-llama", start=0, end=6, num_blocks=8, ttl=60)
    assert servers_seen(reader, 4, 6) == {4: [first_id], 5: [first_id]}


def test_announce_and_read_of_30_blocks_stay_fast_even_with_a_hung_peer(start_node: Any) -> None:
    bootstrap = start_node()
    started([bootstrap])
    servers = [start_node(bootstrap.addr) for _ in range(3)]
    started(servers)

    announce = [servers[0].call(cmd="announce", model="thirty", start=0, end=30, num_blocks=30, ttl=60)]
    announce.append(servers[1].call(cmd="announce", model="thirty", start=0, end=30, num_blocks=30, ttl=60))
    read = servers[2].call(cmd="get", model="thirty", start=0, end=30)
    assert all(len(peers) == 2 for peers in read["servers"].values())
    announce_s = [round(a["elapsed"], 2) for a in announce]
    print(f"announce 30 blocks: {announce_s} s, read: {read['elapsed']:.2f} s")
    assert max(a["elapsed"] for a in announce) < 8.0 and read["elapsed"] < 5.0

    # A hung peer (stopped, its connections still open) costs one request timeout, not one per key.
    servers[0].process.send_signal(signal.SIGSTOP)
    read = servers[2].call(cmd="get", model="thirty", start=0, end=30)
    assert all(len(peers) == 2 for peers in read["servers"].values())
    print(f"read with a hung peer: {read['elapsed']:.2f} s")
    assert read["elapsed"] < REQUEST_TIMEOUT_S + 5.0


def test_unreachable_bootstrap_peers_raise_bootstrap_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    nobody = f"/ip4/127.0.0.1/tcp/{free_port}/p2p/{peer_id_of(create_new_key_pair())}"

    async def main() -> None:
        async with open_host(create_new_key_pair(), ("127.0.0.1", 0)) as host:
            with trio.fail_after(15):
                async with open_swarm_dht(host, [nobody]):
                    raise AssertionError("bootstrapped through a peer that does not exist")

    with pytest.raises(BootstrapError, match="none of the bootstrap peers answered"):
        trio.run(main)
