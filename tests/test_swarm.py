"""End to end: real petald processes serving SmolLM2 on 127.0.0.1, found through the DHT, generating."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petald.local_swarm import local_swarm
from petald.models.loading import load_config
from petald.serving.span import block_weight_bytes

pytestmark = pytest.mark.real_model
PROMPT = "The three most important inventions of the twentieth century are"
FAST = ["--heartbeat", "2", "--expiry", "6", "--throughput", "100"]


def petal(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", args[0], *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture
def env(petal_test_home, smollm2):
    import os

    return {**os.environ, "PETAL_HOME": str(petal_test_home)}


def local_greedy_text(model_dir, prompt: str, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def status(addr: str, env: dict) -> dict:
    result = petal("petald.cli", "status", "--initial-peers", addr, "--json", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["smollm2-135m"]


def test_three_nodes_generate_exactly_what_transformers_generates(smollm2, env, tmp_path):
    expected = local_greedy_text(smollm2, PROMPT, 64)
    with local_swarm(tmp_path, env) as swarm:
        first = swarm.start("start", "--model", "smollm2-135m", "--blocks", "0:10", "--port", "0", "--new-swarm")
        others = [
            swarm.start(
                "start", "--model", "smollm2-135m", "--blocks", blocks, "--port", "0", "--initial-peers", first.addr
            )
            for blocks in ("10:20", "20:30")
        ]
        for node in [first, *others]:
            node.wait_serving()
        result = petal(
            "petal_client.generate_cli",
            "--model",
            "smollm2-135m",
            "--initial-peers",
            first.addr,
            "--greedy",
            "--raw",
            "--max-new-tokens",
            "64",
            PROMPT,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected.strip()
        assert len(expected.split()) > 10  # a real continuation, not an early end
        for node in [first, *others]:
            assert node.stop() == 0, node.output()


def test_joining_and_leaving_servers_are_seen_and_routed_around(smollm2, env, tmp_path):
    with local_swarm(tmp_path, env) as swarm:
        first = swarm.start("start", "--model", "smollm2-135m", "--blocks", "0:10", "--port", "0", "--new-swarm", *FAST)
        middle = swarm.start(
            "start", "--model", "smollm2-135m", "--blocks", "10:20", "--port", "0", "--initial-peers", first.addr, *FAST
        )
        last = swarm.start(
            "start", "--model", "smollm2-135m", "--blocks", "20:30", "--port", "0", "--initial-peers", first.addr, *FAST
        )
        for node in (first, middle, last):
            node.wait_serving()
        assert len(status(first.addr, env)["servers"]) == 3

        # the fourth in int8, its blocks checked against a memory limit: it announces what its weights take
        int8 = ("--quant", "int8", "--max-memory", "400MB")
        joining = ("--port", "0", "--initial-peers", first.addr)
        fourth = swarm.start("start", "--model", "smollm2-135m", "--blocks", "10:20", *joining, *FAST, *int8)
        fourth.wait_serving()
        fourth_id = fourth.peer_id
        # visible as ONLINE within one heartbeat: a concurrent re-announce by another server may carry
        # its JOINING entry for a moment, and its own next heartbeat repairs that
        deadline = time.monotonic() + 2 * 2 + 30  # two heartbeats, plus the status command's own start-up
        while (servers := status(first.addr, env)["servers"]).get(fourth_id, {}).get("state") != "ONLINE":
            assert time.monotonic() < deadline, "the fourth server never showed up ONLINE"
        config = load_config(smollm2)
        for peer, quant in ((fourth_id, "int8"), (middle.peer_id, "none")):
            announced, computed = servers[peer]["weight_bytes"], 10 * block_weight_bytes(config, quant)
            assert computed <= announced <= computed + 2**20, (quant, announced, computed)  # + the rotary tables

        middle_id = middle.peer_id
        assert middle.stop() == 0, middle.output()
        # gone from routing: OFFLINE at once, and absent once its entry expires
        deadline = time.monotonic() + 6 + 30
        while True:
            entry = status(first.addr, env)["servers"].get(middle_id)
            if entry is None or entry["state"] == "OFFLINE":
                break
            assert time.monotonic() < deadline, entry
        result = petal(
            "petal_client.generate_cli",
            "--model",
            "smollm2-135m",
            "--initial-peers",
            first.addr,
            "--greedy",
            "--max-new-tokens",
            "12",
            "What is the capital of France?",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout
