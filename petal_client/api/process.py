"""A `petal-api` process on this machine, for tests, benchmarks and demos: its output in a file, its URL read
from it, always stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

URL = re.compile(r"at (http://[\d.]+:\d+)/v1 ")


class ApiProcess:
    """`petal-api ARGS` in a subprocess; stdout and stderr go to `log`. Use as a context manager."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args, self.log = args, log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "petal_client.api.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_url(self, timeout: float = 180.0) -> str:
        """The base URL (http://HOST:PORT) once it listens; AssertionError with its output if it dies or is late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = URL.search(self.output())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"petal-api {self.args} exited with {self.process.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"petal-api {self.args} did not listen within {timeout} s:\n{self.output()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it is still there after `timeout` s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(10)

    def __enter__(self) -> ApiProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
