"""Failover with real processes: a server killed with SIGKILL mid-generation is replaced, the
replacement rebuilds its cache from the client's history, and the output is unchanged."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from petal_client.model import DistributedModelForCausalLM
from petald.local_swarm import local_swarm, wait_until

FAST = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
NEW_TOKENS = 16


class KillAtStep:
    """A streamer that kills the server carrying `blocks_from` when the `step`-th token arrives."""

    def __init__(self, step: int, kill):
        self.step, self.kill, self.seen = step, kill, 0

    def put(self, value):
        if self.seen == self.step:
            self.kill()
        self.seen += 1

    def end(self):
        pass


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PETAL_HOME": str(tmp_path / "home")}


def expected_tokens(model_dir, prompt) -> torch.Tensor:
    local = DistributedModelForCausalLM.from_local_spans(str(model_dir), [(0, 6)])
    return local.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)


def test_kill_9_at_a_random_step_four_times_output_unchanged(tiny_llama, tmp_path, env):
    rng = random.Random(7)
    prompt = torch.tensor([[3, 14, 15, 92, 65, 35]])
    expected = expected_tokens(tiny_llama, prompt)
    with local_swarm(tmp_path, env) as swarm:
        first, nodes = swarm.start_spans(str(tiny_llama), ("0:6", "0:6"), *FAST)
        servers = {node.peer_id: node for node in nodes}
        model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[first.addr])
        try:
            for trial in range(4):  # each trial starts a replacement server: 10 took 4 min of the suite
                with model.inference_session(max_length=64) as conversation:

                    def kill_current():
                        victim = conversation.blocks.route[0].hop.peer_id
                        servers.pop(victim).kill()

                    kill_at = rng.randrange(1, NEW_TOKENS)  # put() number 0 is the prompt, before any step
                    output = model.generate(
                        prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, streamer=KillAtStep(kill_at, kill_current)
                    )
                    assert conversation.blocks.failovers >= 1, f"trial {trial}: no failover happened"
                assert torch.equal(output, expected), f"trial {trial}, killed at step {kill_at}"
                # keep two servers for the next trial
                node = swarm.start(
                    "start", "--model", str(tiny_llama), "--blocks", "0:6", "--initial-peers", first.addr, *FAST
                )
                node.wait_serving()
                servers[node.peer_id] = node
        finally:
            model.blocks.swarm.close()


def test_a_failed_server_is_replaced_by_two_servers_covering_its_span(tiny_llama, tmp_path, env):
    prompt = torch.tensor([[8, 6, 7, 5, 30, 9]])
    expected = expected_tokens(tiny_llama, prompt)
    with local_swarm(tmp_path, env) as swarm:
        first, (whole,) = swarm.start_spans(str(tiny_llama), ("0:6",), *FAST)
        model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[first.addr])
        try:
            with model.inference_session(max_length=64) as conversation:
                model.generate(prompt, max_new_tokens=5, eos_token_id=None)
                assert [s.hop.peer_id for s in conversation.blocks.route] == [whole.peer_id]
                halves = [
                    swarm.start(
                        "start", "--model", str(tiny_llama), "--blocks", blocks, "--initial-peers", first.addr, *FAST
                    )
                    for blocks in ("0:3", "3:6")
                ]
                for node in halves:
                    node.wait_serving()
                whole.kill()
                output = model.generate(conversation.token_ids, max_new_tokens=NEW_TOKENS - 5, eos_token_id=None)
                assert [s.hop.peer_id for s in conversation.blocks.route] == [n.peer_id for n in halves]
            assert torch.equal(output, expected)
        finally:
            model.blocks.swarm.close()


def test_a_draining_server_is_left_before_the_next_step(tiny_llama, tmp_path, env):
    prompt = torch.tensor([[11, 22, 33, 44]])
    expected = expected_tokens(tiny_llama, prompt)
    with local_swarm(tmp_path, env) as swarm:
        first, servers = swarm.start_spans(str(tiny_llama), ("0:6", "0:6"), "--drain-timeout", "60", *FAST)
        by_peer = {node.peer_id: node for node in servers}
        model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), initial_peers=[first.addr])
        try:
            with model.inference_session(max_length=64) as conversation:
                model.generate(prompt, max_new_tokens=6, eos_token_id=None)
                draining = by_peer[conversation.blocks.route[0].hop.peer_id]
                draining.process.send_signal(signal.SIGTERM)
                view = model.blocks.swarm.views[model.model_name]
                wait_until(
                    lambda: view.servers[draining.peer_id].state == "OFFLINE", 30, what="the view sees it OFFLINE"
                )
                assert draining.process.poll() is None  # still draining: our session holds it open
                output = model.generate(conversation.token_ids, max_new_tokens=NEW_TOKENS - 6, eos_token_id=None)
                assert conversation.blocks.route[0].hop.peer_id != draining.peer_id
            assert torch.equal(output, expected)
            # once we moved away, its last session closed and it left on its own
            assert draining.process.wait(30) == 0, draining.output()
        finally:
            model.blocks.swarm.close()
