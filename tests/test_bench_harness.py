"""scripts/bench works end to end: the tiny model over one emulated link, one run, everything removed after.

A check of the harness and of the emulator's delay, not of speed: no figure of the benchmark is asserted.
Needs root (network namespaces, TUN devices), as CI has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scripts.netemu import owned_devices, owned_netns, require_root_and_netns

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_tiny_model_on_a_shaped_link_and_removes_its_network(tmp_path: Path) -> None:
    require_root_and_netns()  # fails with what is missing: this test needs root and `ip netns`, as in CI
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench"), "--model", "tiny", "--conditions", "100mbit-20ms"]
    command += ["--baselines", "local", "--prompt-lengths", "16", "--batches", "2", "--steps", "2"]
    command += ["--repeats", "1", "--long-repeats", "1", "--no-write", "--json", str(out)]
    bench = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert bench.returncode == 0, f"scripts/bench failed:\n{bench.stdout[-3000:]}\n{bench.stderr[-5000:]}"

    results = json.loads(out.read_text())
    [row] = results["conditions"]
    assert row["condition"] == {"name": "100mbit-20ms", "rate_bps": 100e6, "rtt_s": 0.02}
    for target in ("push", "star"):
        assert set(row[target]) == {"steps@16", "forward@2"}
        assert all(len(times) == 1 and times[0] > 0 for times in row[target].values())
    assert set(results["baselines"]["local"]) == {"steps@16", "forward@2"}
    assert 15 <= row["link"]["rtt_ms"] <= 200, f"emulated 20 ms RTT measured as {row['link']['rtt_ms']:.1f} ms"
    assert row["link"]["mbit_s"] > 0
    assert "| Petal, 3 servers, 100 Mbit/s, 20 ms RTT, server push |" in bench.stdout

    run_pid = int(results["namespaces"][0].split("-")[1])
    assert owned_netns(run_pid) == [], "namespaces of the run are left behind"
    assert owned_devices(run_pid) == [], "TUN devices of the run are left behind"
    alive = [f"{name} {pid}" for name, pid in results["pids"].items() if _runs_python(pid)]
    assert alive == [], f"processes of the run are still running: {alive}"


def _runs_python(pid: int) -> bool:
    """Whether `pid` is still a Python process (a new process that reused the PID is something else)."""
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
