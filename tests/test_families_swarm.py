"""Families through real petald processes: tiny Mixtral and Qwen3 over 3 servers each, a tiny Gemma 3 (sliding-window
layers) over 2 with a prompt longer than its window; greedy tokens equal the whole transformers model's. One
swarm (every server on one torch thread) serves the three models at once."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from petal_client.model import DistributedModelForCausalLM
from petald.local_swarm import local_swarm
from petald.models.checkpoints import TINY_SLIDING_WINDOW

FAST = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0", "--torch-threads", "1"]
SERVED = {"mixtral": ("0:2", "2:4", "4:6"), "qwen3": ("0:2", "2:4", "4:6"), "gemma3": ("0:3", "3:6")}


@pytest.fixture(scope="module")
def swarm(tiny_family, tmp_path_factory):
    """A swarm address; the servers of every model in SERVED, all started at once (the first one is the swarm's
    bootstrap node: no process of its own for the DHT)."""
    tmp = tmp_path_factory.mktemp("families-swarm")
    spans = [(family, blocks) for family, all_blocks in SERVED.items() for blocks in all_blocks]
    with local_swarm(tmp, {**os.environ, "PETAL_HOME": str(tmp / "home")}) as nodes:

        def server(family: str, blocks: str, *join: str):
            return nodes.start("start", "--model", str(tiny_family(family)), "--blocks", blocks, *FAST, *join)

        first = server(*spans[0], "--new-swarm")
        servers = [first, *(server(*span, "--initial-peers", first.addr) for span in spans[1:])]
        for node in servers:
            node.wait_serving()
        yield first.addr


@pytest.mark.parametrize(
    ("family", "prompt_length"), [("mixtral", 9), ("qwen3", 9), ("gemma3", 3 * TINY_SLIDING_WINDOW)]
)
def test_greedy_through_the_swarm_equals_transformers(swarm, tiny_family, family, prompt_length):
    model_dir = tiny_family(family)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = torch.randint(
        3, reference.config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(5)
    )
    expected = reference.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
    with DistributedModelForCausalLM.from_pretrained(str(model_dir), [swarm]) as model:
        got = model.generate(prompt, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(got, expected)
    assert len(set(expected[0, prompt_length:].tolist())) > 3
