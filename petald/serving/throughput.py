"""How fast this server runs its span: measured once per machine and setup, cached on disk, announced so
clients can route and servers can balance.

Compute is measured once per machine and setup and cached; the network is probed at every start, to a
peer of the swarm (petald.p2p.bandwidth), not against internet servers as Petals' speedtest does (a
private swarm may reach none, and they say nothing of the links to the peers that call this server). As
in Petals, a server announces min(compute, network). Clients also ping each server and put the RTT into
the cost of a route, the figure that bounds single-token inference steps."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from petald.serving.span import Span

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the measurement changes, so old figures are not reused


def measure_inference_throughput(span: Span, steps: int = 8, prefix: int = 16) -> float:
    """Blocks x steps per second of single-token decoding through `span` (k blocks take k / result s)."""
    session = span.new_session(1, prefix + steps + 1)
    span.step(session, torch.randn(1, prefix, span.hidden_size))
    token = torch.randn(1, 1, span.hidden_size)
    span.step(session, token)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        span.step(session, token)
    step_seconds = (time.perf_counter() - started) / steps
    return span.num_blocks / step_seconds


def network_throughput(bytes_per_second: float, hidden_size: int, num_blocks: int, bytes_per_value: int = 4) -> float:
    """The span's throughput (blocks x tokens / s) that a link of `bytes_per_second` allows: every token's
    hidden states cross it twice (in and out), and one crossing serves all of the span's blocks."""
    return bytes_per_second / (2 * hidden_size * bytes_per_value) * num_blocks


def announced_throughput(compute: float, network: float | None) -> float:
    """What a server announces: the lower of its compute and network figures (compute alone if the
    network could not be measured)."""
    return compute if network is None else min(compute, network)


def throughput_cache_path() -> Path:
    """`$PETAL_HOME/throughput.json`, else `~/.cache/petal/throughput.json`."""
    home = os.environ.get("PETAL_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "petal") / "throughput.json"


def throughput_key(model: str, num_blocks: int, quant: str, device: str = "cpu") -> str:
    """Everything a measured figure depends on: torch, the device spans run on, threads, model, span size, quant."""
    return (
        f"v{CACHE_VERSION} torch={torch.__version__} device={_device_name(device)} "
        f"threads={torch.get_num_threads()} model={model} blocks={num_blocks} quant={quant}"
    )


def cached_throughput(key: str, path: Path | None = None) -> float | None:
    """The figure stored under `key`, or None."""
    value = _read_cache(path or throughput_cache_path()).get(key)
    return float(value) if _valid(value) else None


def measure_cached(key: str, measure: Callable[[], float], path: Path | None = None) -> float:
    """The figure stored under `key`; else `measure()`, stored under `key` so the next start skips it."""
    path = path or throughput_cache_path()
    found = cached_throughput(key, path)
    if found is not None:
        log.info("throughput %.1f blocks*steps/s, measured before (%s)", found, path)
        return found
    value = measure()
    cache = _read_cache(path)
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(scratch, path)  # atomic: servers starting together never read half a file
    except OSError as e:
        log.warning("could not cache the measured throughput in %s: %s", path, e)
    log.info("throughput %.1f blocks*steps/s, measured now", value)
    return value


def _read_cache(path: Path) -> dict[str, float]:
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the throughput cache %s: %s", path, e)
        return {}
    return {k: v for k, v in cache.items() if _valid(v)} if isinstance(cache, dict) else {}


def _valid(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
