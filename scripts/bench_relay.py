"""`scripts/bench --targets relay`: decode steps/s through a server behind NAT reached through a relay, against
the same server reached directly (its router forwarding the port), on the same emulated links.

Network: scripts/netemu.py's switch joins namespaces `client`, `relay` and `router` (every link shaped as the
condition says); a `home` namespace sits behind `router` (scripts/natemu.py: masquerade, no inbound). The server
(all blocks) runs in `home`; the relay (the bootstrap node, `petald dht --relay`) in `relay`; the client measures
in `client` as scripts/bench's push target does. Relayed: the router forwards nothing, the server finds itself
private and serves through the relay (client -> relay -> router -> home: two links). Direct: the router forwards
the server's port and the server announces the router's address (client -> router -> home: one link). The bytes
the relay carried come from its log (one line per closed circuit).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from scripts.bench_report import spread
from scripts.natemu import put_home_behind, router_rules, set_router_rules
from scripts.netemu import NETNS_PREFIX, EmulatedNetwork, _ip, _kill_netns_processes, list_netns

HOSTS = ("client", "relay", "router")
SERVER_PORT = 31330
RELAY_PORT = 31331
CASES = ("direct", "relayed")
MARKS = "<!-- bench_relay:start -->", "<!-- bench_relay:end -->"
BUSY = 0.25  # as scripts/bench: cores used by other processes past which a run on 2 cores says little


def measure_relay(model_dir: Path, conditions, plan, work: Path, measure_in, note) -> list[dict]:
    """For each condition: steps/s of `plan` through the direct and the relayed server, and the relay's bytes."""
    from petald.local_swarm import NodeProcess

    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    rows: list[dict] = []
    with EmulatedNetwork(list(HOSTS), conditions[0].shape) as network:
        home = f"{NETNS_PREFIX}{network.tag}-home"
        router = network.netns["router"]
        _ip("netns", "add", home)
        try:
            home_ip = put_home_behind(router, network.devices["router"], home, 0)
            relay_args = ["dht", "--relay", "--host", network.addresses["relay"], "--port", str(RELAY_PORT)]
            relay = NodeProcess(
                [*relay_args, "--new-swarm"], work / "relay.log", prefix=tuple(network.command("relay", []))
            )
            relay_addr = relay.wait_for(r"^(/ip4/[\d.]+/tcp/\d+/p2p/\w+)$").group(1)
            for condition in conditions:
                network.set_shape(condition.shape)
                row: dict = {"label": condition.label}
                for case in CASES:
                    forward = (SERVER_PORT, home_ip) if case == "direct" else None
                    set_router_rules(router, router_rules(network.devices["router"], forward))
                    args = ["start", "--model", str(model_dir), "--blocks", f"0:{num_layers}", "--throughput", "100"]
                    args += ["--host", home_ip, "--port", str(SERVER_PORT), "--initial-peers", relay_addr]
                    args += ["--public-host", network.addresses["router"]] if case == "direct" else []
                    log = work / f"server-{case}-{len(rows)}.log"
                    server = NodeProcess(args, log, prefix=("ip", "netns", "exec", home))
                    try:
                        expected = "public" if case == "direct" else "private"
                        server.wait_for(rf"reachability: {expected}", 120)
                        server.wait_serving()
                        before = relayed_bytes(relay.output())
                        row[case] = measure_in(network, model_dir, "push", [relay_addr], plan)
                    finally:
                        server.stop(timeout=20)
                    if case == "relayed":  # the circuits close with the server: their lines are logged then
                        row["relay_bytes"] = relayed_bytes(relay.output()) - before
                note(f"{condition.label}: {case} {summary(row[case], plan)}")
                rows.append(row)
            relay.stop(timeout=20)
        finally:
            if home in list_netns():
                _kill_netns_processes(home)
                _ip("netns", "del", home)
    return rows


def relayed_bytes(log: str) -> int:
    return sum(int(n) for n in re.findall(r"closed: relayed (\d+) bytes", log))


def steps_per_s(seconds: list[float], plan) -> list[float]:
    return [plan.steps / s for s in seconds]


def summary(times: dict[str, list[float]], plan) -> str:
    return ", ".join(f"{case} {spread(steps_per_s(s, plan), 2)} steps/s" for case, s in decode_cases(times).items())


def decode_cases(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """The `steps@N` cases (scripts/bench's measuring process also times forward passes: not reported here)."""
    return {case: s for case, s in times.items() if case.startswith("steps@")}


def report(results: dict) -> str:
    """The markdown section of a `--targets relay` run."""
    plan = results["plan"]
    steps = plan["steps"]
    header = ["network", "prompt", "direct, steps/s", "relayed, steps/s", "relayed ÷ direct", "relay bytes per token"]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for row in results["relay"]:
        relayed_runs = decode_cases(row["relayed"])
        warm = {case: 0 if int(case.split("@")[1]) >= 1024 else 1 for case in relayed_runs}
        tokens = sum((len(runs) + warm[case]) * (steps + 1) for case, runs in relayed_runs.items())
        for case in decode_cases(row["direct"]):
            direct = [steps / s for s in row["direct"][case]]
            relayed = [steps / s for s in row["relayed"][case]]
            ratio = statistics.median(relayed) / statistics.median(direct)
            cells = [row["label"], case.split("@")[1], spread(direct, 2), spread(relayed, 2), f"{ratio:.2f}"]
            lines.append(f"| {' | '.join(cells)} | {row['relay_bytes'] / tokens / 1e3:.1f} kB |")
    return "\n".join(
        [
            "## Through a relay (`scripts/bench --targets relay`)",
            "",
            f"Model {results['model']} (fp32), one server with all blocks in a home network behind a masquerading "
            "router (nftables), a relay and the client on the switch of scripts/netemu.py (every link shaped). "
            "Direct: the router forwards the server's port (client → router → home). Relayed: no forwarding, the "
            "server reserves at the relay (client → relay → router → home, one more link). Greedy one-token steps "
            f"after the prompt, {steps} per run, median (min–max) of {plan['repeats']} runs. Relay bytes per token: "
            "all the relay carried during the relayed runs (prompts, warm-ups and set-up included) over the tokens "
            "they generated.",
            "",
            *lines,
            "",
            f"- command: `{results['command']}` (checkout {results.get('checkout', 'not recorded')})",
            f"- date: {results['date']}",
            f"- machine: {results['machine']}",
            f"- other processes on the machine kept {results['other_load']:.2f} cores busy on average during the run"
            + (" — **too busy: run it again on a quiet machine**" if results["other_load"] > BUSY else ""),
            f"- versions: {results['versions']}",
        ]
    )
