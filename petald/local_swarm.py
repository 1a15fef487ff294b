"""Real petald processes on this machine (127.0.0.1 or a network namespace), for tests, benchmarks and demos:
started with logs in files, always stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ADDR = re.compile(r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$", re.M)


class NodeProcess:
    """One `petald` process; its stdout and stderr go to `log`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
        """`prefix` goes before the command (e.g. `ip netns exec NS`: it must exec, so the PID stays petald's)."""
        self.log = log
        self.args = args
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "petald.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Wait until the log matches `pattern`; fail with the log if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output(), re.M)
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"petald {self.args} exited with {self.process.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"petald {self.args}: no {pattern!r} within {timeout} s:\n{self.output()[-3000:]}")

    @property
    def addr(self) -> str:
        return self.wait_for(ADDR.pattern).group(1)

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/", 1)[1]

    @property
    def metrics_url(self) -> str:
        """http://HOST:PORT of its /metrics and /health (started with --metrics-port)."""
        return self.wait_for(r"metrics at (http://[\d.]+:\d+)/metrics").group(1)

    def wait_serving(self, timeout: float = 120.0) -> None:
        self.wait_for(r"serving blocks", timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "", interval: float = 0.2) -> T:
    """Poll `predicate` until it returns something true, and return that; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        time.sleep(interval)


class Swarm:
    """The nodes a test started; every one is killed at the end, even on failure."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir, self.env, self.nodes = log_dir, env, []

    def start(self, *args: str) -> NodeProcess:
        node = NodeProcess(list(args), self.log_dir / f"node{len(self.nodes)}.log", self.env)
        self.nodes.append(node)
        return node

    def start_spans(self, model: str, spans: Sequence[str], *options: str) -> tuple[NodeProcess, list[NodeProcess]]:
        """A DHT bootstrap node and one server per span ("A:B") of `model`, all serving; `options` go to every
        server. Returns (bootstrap, servers)."""
        bootstrap = self.start("dht", "--port", "0", "--new-swarm")
        servers = [
            self.start("start", "--model", model, "--blocks", span, "--initial-peers", bootstrap.addr, *options)
            for span in spans
        ]
        for server in servers:
            server.wait_serving()
        return bootstrap, servers

    def stop_all(self) -> None:
        for node in self.nodes:
            node.kill()


@contextmanager
def local_swarm(log_dir: Path, env: dict[str, str] | None = None):
    swarm = Swarm(log_dir, env)
    try:
        yield swarm
    finally:
        swarm.stop_all()
