"""What every benchmark section of BENCHMARKS.md says besides its table: medians with min-max, the exact
command, the machine, the versions, the load of other processes; and replacing a section between markers."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def spread(values: list[float], digits: int = 1) -> str:
    """`median (min–max)` of `values`."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def command_line() -> str:
    """This process's command line, with paths inside the checkout made relative to it."""

    def short(path: str) -> str:
        absolute = Path(path).absolute()
        return str(absolute.relative_to(ROOT)) if absolute.is_relative_to(ROOT) else path

    return shlex.join([short(sys.executable), short(sys.argv[0]), *sys.argv[1:]])


def cpu_and_memory() -> str:
    """`2 cores (AMD EPYC ...), 24 GiB`."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    memory = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    memory_text = f", {int(memory.group(1)) / 2**20:.0f} GiB" if memory else ""
    return f"{os.cpu_count()} cores ({cpu.group(1) if cpu else platform.processor()}){memory_text}"


def versions(names: tuple[str, ...] = ("torch", "transformers", "libp2p", "trio", "msgpack")) -> str:
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in names) + (
        f", Python {platform.python_version()}"
    )


def write_section(section: str, start_mark: str, end_mark: str, path: Path = BENCHMARKS) -> None:
    """Replace the text between the markers in `path` (append it, or create the file, if missing)."""
    block = f"{start_mark}\n{section}\n{end_mark}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start_mark in text and end_mark in text:
        head, rest = text.split(start_mark, 1)
        text = head + block + rest.split(end_mark, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def cpu_snapshot() -> tuple[float, float, float]:
    """(now, CPU seconds all cores spent busy since boot, CPU seconds of this process and its reaped children).

    Busy includes steal: time the host gave our cores to someone else."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = Path("/proc/stat").read_text().split()[1:9]
    busy = sum(int(x) for x in (user, nice, system, irq, softirq, steal)) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system


def other_processes_load(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores kept busy on average, between two snapshots, by processes other than this one and its children."""
    (start, busy_before, own_before), (end, busy_after, own_after) = before, after
    return max(0.0, (busy_after - busy_before) - (own_after - own_before)) / (end - start)
