"""A node's life with real processes and the tiny Llama: bootstrap through `petald dht`, serve, and on
SIGTERM announce OFFLINE, refuse new sessions, let the open one finish, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import trio

from petal_client.model import DistributedModelForCausalLM
from petald.local_swarm import local_swarm
from petald.p2p.wire import OpenSession
from petald.serving.span import Span
from tests.test_protocol_abuse import client, expect_error, hidden_states, new_stream, open_session, send, step


def status_of(addr: str, env: dict, model: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "petald.cli", "status", "--initial-peers", addr, "--json", "--model", model],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[model]


def test_sigterm_drains_open_sessions_and_refuses_new_ones(tiny_llama, tmp_path):
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}
    model = tiny_llama.name
    with local_swarm(tmp_path, env) as swarm:
        bootstrap = swarm.start("dht", "--port", "0", "--new-swarm")
        server = swarm.start(
            "start",
            "--model",
            str(tiny_llama),
            "--blocks",
            "0:6",
            "--port",
            "0",
            "--initial-peers",
            bootstrap.addr,
            "--throughput",
            "100",
            "--heartbeat",
            "2",
            "--expiry",
            "6",
            "--drain-timeout",
            "20",
            "--log-format",
            "json",
        )
        server.wait_serving()
        server_id = server.peer_id
        assert status_of(bootstrap.addr, env, model)["servers"][server_id]["state"] == "ONLINE"

        # a client that found the server through the DHT node generates exactly as the local engine does
        remote = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[bootstrap.addr])
        local = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)])
        prompt = torch.tensor([[5, 17, 42, 99, 7]])
        assert torch.equal(remote.generate(prompt, max_new_tokens=12), local.generate(prompt, max_new_tokens=12))
        remote.blocks.swarm.close()

        span = Span.load(tiny_llama, 0, 6)
        first, second = hidden_states(4, seed=1), hidden_states(1, seed=2)
        reference = span.new_session(1, 16)
        expected = [span.step(reference, first), span.step(reference, second)]

        async def drain():
            async with client(server) as (host, peer):
                stream = await open_session(host, peer, model, max_length=16)
                torch.testing.assert_close(await step(stream, 0, first), expected[0])
                server.process.send_signal(signal.SIGTERM)
                await trio.sleep(1.5)
                refused = await new_stream(host, peer)
                await send(refused, OpenSession(model, 0, 6, 1, 8, "late"))
                await expect_error(refused, "unavailable")
                # the open session still runs, then ends, and the node goes once it has
                torch.testing.assert_close(await step(stream, 1, second), expected[1])
                assert server.process.poll() is None

        trio.run(drain)
        assert server.process.wait(30) == 0, server.output()
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        assert any("OFFLINE" in line["message"] for line in lines)
        entry = status_of(bootstrap.addr, env, model)["servers"].get(server_id)
        assert entry is None or entry["state"] == "OFFLINE"
        assert bootstrap.stop() == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--blocks", "40:20"], "blocks 40:20 is empty or negative"),
        (["--blocks", "0:99"], "blocks 0:99 are outside the model, which has blocks 0:6"),
        (["--num-blocks", "9"], "num_blocks is 9, but tiny-llama has 6 blocks"),
        (["--blocks", "0:6", "--adapters", "chat=/nonexistent/adapter"], "/nonexistent/adapter has no adapter_config"),
    ],
)
def test_start_refuses_blocks_or_adapters_the_model_cannot_serve_before_it_starts(
    tiny_llama, tmp_path, options, message
):
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "petald.cli",
            "start",
            "--model",
            str(tiny_llama),
            "--port",
            "0",
            "--new-swarm",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PETAL_HOME": str(tmp_path / "home")},
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "/ip4/" not in result.stdout + result.stderr  # no host was started
    assert time.monotonic() - started < 30  # the imports, a config read and no network: never the 15 s of a start
