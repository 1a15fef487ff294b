"""Servers behind NAT, for real: two homes behind masquerading routers (nftables, in network namespaces) and a
public network with two relays and a client. The servers cannot be dialled, learn it, reserve at both relays and
serve through them; the client's steps go through a relay and the push between the two homes too, until hole
punching makes the connection between the homes direct (both servers report it, from their live connections);
relay A dies mid-session, the servers re-announce themselves through relay B, the session goes on through B with
the same output, and the direct connection between the homes outlives relay A. Processes and namespaces are
removed at the end, even on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from libp2p.crypto.ed25519 import create_new_key_pair

from petal_client.model import DistributedModelForCausalLM
from petald.local_swarm import NodeProcess, wait_until
from petald.p2p.host import peer_id_of, write_identity
from scripts.natemu import PUBLIC_IP, NatNetwork
from scripts.netemu import require_root_and_netns

FAST = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
PROMPT = [3, 14, 15, 92, 65, 35]
NEW_TOKENS = 12
PAUSE_AT = 5
ROOT = Path(__file__).resolve().parent.parent


RELAY_PORTS = (31401, 31402)


def start_relay(identity: Path, port: int, start, *initial_peers: str) -> tuple[NodeProcess, str]:
    key_pair = create_new_key_pair()
    write_identity(identity, key_pair)
    peers = ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
    listen = ["--host", PUBLIC_IP, "--port", str(port), "--identity", str(identity)]
    return start("public", "dht", "--relay", *listen, *peers), f"/ip4/{PUBLIC_IP}/tcp/{port}/p2p/{peer_id_of(key_pair)}"


def listening_port(node: NodeProcess) -> int:
    return int(node.wait_for(r"listening on /ip4/[\d.]+/tcp/(\d+)/p2p/", 60).group(1))


def tcp_connects(net: NatNetwork, ip: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(({ip!r}, {port}), timeout=3)"
    return subprocess.run(net.command("public", [sys.executable, "-c", probe]), capture_output=True).returncode == 0


def status(net: NatNetwork, peer: str) -> dict:
    out = subprocess.run(
        net.command("public", [sys.executable, "-m", "petald.cli", "status", "--initial-peers", peer, "--json"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode:
        return {}
    return next(iter(json.loads(out.stdout).values()), {}).get("servers", {})


def test_servers_behind_two_nats_serve_through_relays_and_a_session_survives_a_relay_dying(tiny_llama, tmp_path):
    require_root_and_netns()  # fails with what is missing: this test needs root and `ip netns`, as in CI
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    nodes: list[NodeProcess] = []
    with NatNetwork(homes=2) as net:

        def start(where: str, *args: str) -> NodeProcess:
            node = NodeProcess(
                list(args), tmp_path / f"node{len(nodes)}.log", env, prefix=tuple(net.command(where, []))
            )
            nodes.append(node)
            return node

        try:
            # relay A first (B joins the swarm through it), at addresses known in advance: their own namespace
            relay_a, a = start_relay(tmp_path / "a.key", RELAY_PORTS[0], start)
            expected = (
                DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)])
                .generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, eos_token_id=None)[0]
                .tolist()
            )
            relay_a.wait_for(r"DHT node \w+ ready", 60)
            relay_b, b = start_relay(tmp_path / "b.key", RELAY_PORTS[1], start, a)
            relay_b.wait_for(r"DHT node \w+ ready", 60)
            model = str(tiny_llama)
            home = ["--model", model, "--initial-peers", a, b, "--relay-peers", a, *FAST]
            first = start("home0", "start", "--blocks", "0:3", "--host", "0.0.0.0", *home)  # as in the README
            last = start("home1", "start", "--blocks", "3:6", "--host", net.home_ip(1), *home)
            for server in (first, last):
                server.wait_for(r"reachability: private")
                server.wait_serving()
            port = listening_port(first)
            assert not tcp_connects(net, net.home_ip(0), port), "the home server is reachable without NAT"
            assert not tcp_connects(net, net.router_ip(0), port), "the home router forwards inbound connections"

            servers = wait_until(lambda: (found := status(net, a)) and len(found) == 2 and found, 30, "both in status")
            assert {e["reachability"] for e in servers.values()} == {"relayed"}
            assert all("/p2p-circuit/" in addr for e in servers.values() for addr in e["addrs"])

            client = subprocess.Popen(
                net.command(
                    "public",
                    [sys.executable, str(ROOT / "tests/nat_client_script.py"), model, a, json.dumps(PROMPT)]
                    + [str(NEW_TOKENS), str(PAUSE_AT)],
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(tmp_path / "client.log", "wb"),
                text=True,
                env=env,
            )
            try:
                assert json.loads(client.stdout.readline()) == {"paused": PAUSE_AT}, (
                    tmp_path / "client.log"
                ).read_text()
                # the push first -> last opened a relayed connection; hole punching made it direct, on both ends
                # (each server reports the peers it holds a direct connection to, which it had reached relayed)
                ids = {e["start"]: p for p, e in servers.items()}
                punched = {ids[0]: [ids[3]], ids[3]: [ids[0]]}
                wait_until(
                    lambda: {p: e["direct_peers"] for p, e in status(net, a).items()} == punched,
                    20,
                    "the connection between the two homes is direct",
                )
                # the push first -> last went through relay A (reserved first): it dies with the sessions on it
                relay_a.kill()
                client.stdin.write("go\n")
                client.stdin.flush()
                result = json.loads(client.stdout.readline() or "{}")
                client.wait(30)
            finally:
                if client.poll() is None:
                    client.kill()
            assert result.get("tokens") == expected, (tmp_path / "client.log").read_text()[-3000:]
            assert result["failovers"] >= 1
            for server in (first, last):
                server.wait_for(r"lost the reservation at relay", 20)
            wait_until(
                lambda: all(
                    addrs and all(f"/p2p/{b.rsplit('/', 1)[1]}/p2p-circuit/" in addr for addr in addrs)
                    for addrs in (e["addrs"] for e in status(net, b).values() if e["state"] == "ONLINE")
                ),
                30,
                "the servers re-announced themselves through relay B only",
            )
            # the direct connection outlived relay A, which carried the relayed one: the pushes after it went direct
            assert {p: e["direct_peers"] for p, e in status(net, b).items() if e["state"] == "ONLINE"} == punched
        finally:
            for node in nodes:
                node.kill()


def test_the_readme_nat_commands_parse(monkeypatch):
    """The README's NAT block uses only flags petald has (the flow itself is the test above, on the tiny model)."""
    from petald import cli
    from tests.test_readme import readme_commands

    seen = []
    monkeypatch.setattr(cli, "_run_node", lambda args: seen.append(args.command) or 0)
    monkeypatch.setattr("petald.status.print_status", lambda *args: seen.append("status") or 0)
    for argv in readme_commands("Behind a home router (NAT)"):
        assert argv[0] == "petald" and cli.main(argv[1:]) == 0
    assert seen == ["dht", "start", "status"]
