"""Fine-tuning: backward through spans, prompt tuning and classification, first in one process, then through
a swarm of real petald processes (gradients equal local training, a failed server is replaced, training
lowers the loss)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM

from petal_client.model import DistributedModelForCausalLM, DistributedModelForSequenceClassification
from petald.local_swarm import local_swarm
from petald.models.generic import positions_from_mask
from petald.serving.span import Span

FAST = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
BLOCKS = 6
PRE_SEQ_LEN = 4


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows of random tokens: input_ids and attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 120, (2, 7), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    return input_ids, mask


def randomize_prompts(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero deep prompts (they start at zero), the same for every model given the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.startswith("prompts."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def train(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    """`steps` Adam steps (lr 0.05) on the trainable parameters; the loss before each step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- one process


def test_span_backward_equals_autograd_through_its_forward(tiny_model):
    span = Span.load(tiny_model, 1, 5)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, span.hidden_size, generator=generator, requires_grad=True)
    prompts = (torch.randn(3, 1, 2, span.hidden_size, generator=generator) * 0.1).requires_grad_(True)
    mask = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
    grad_output = torch.randn(2, 6, span.hidden_size, generator=generator)

    output = span.forward(hidden, mask, slice(1, 4), prompts)  # blocks 2:5 of the model
    output.backward(grad_output)
    grad_hidden, grad_prompts = span.backward(hidden, grad_output, mask, slice(1, 4), prompts)
    torch.testing.assert_close(grad_hidden, hidden.grad)
    torch.testing.assert_close(grad_prompts, prompts.grad)


def test_ptune_computes_what_transformers_does_with_the_prefix_as_input_embeddings(tiny_llama):
    # Llama only: BLOOM's transformers model normalizes input embeddings, where Petal's prefix comes after that
    tiny_model = tiny_llama
    model = DistributedModelForCausalLM.from_local_spans(
        str(tiny_model), [(0, 2), (2, BLOCKS)], tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN
    )
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    input_ids, mask = batch()
    prefix = model.prompts.prefix.detach().expand(2, -1, -1)
    with torch.no_grad():
        embeds = torch.cat([prefix, reference.get_input_embeddings()(input_ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, PRE_SEQ_LEN, dtype=torch.long), mask], dim=1)
        positions = positions_from_mask(full_mask)  # as generate() numbers left-padded rows
        output = reference(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions)
        expected = output.logits[:, PRE_SEQ_LEN:]
        got = model(input_ids, mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_only_prompts_and_heads_are_trainable(tiny_llama):
    causal = DistributedModelForCausalLM.from_local_spans(
        str(tiny_llama), [(0, BLOCKS)], tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN
    )
    assert sorted(n for n, p in causal.named_parameters() if p.requires_grad) == ["prompts.deep", "prompts.prefix"]
    classifier = DistributedModelForSequenceClassification.from_local_spans(
        str(tiny_llama), [(0, BLOCKS)], tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN, num_labels=3
    )
    assert sorted(n for n, p in classifier.named_parameters() if p.requires_grad) == ["prompts.prefix", "score.weight"]
    input_ids, mask = batch()
    output = classifier(input_ids, mask, labels=torch.tensor([0, 2]))
    assert output.logits.shape == (2, 3) and output.loss.ndim == 0
    with pytest.raises(ValueError, match="pad sequences on the left"):
        classifier(input_ids, mask.flip(1))


def test_causal_lm_loss_is_transformers_loss(tiny_llama):
    model = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, BLOCKS)])
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    input_ids, _ = batch()
    labels = input_ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids, labels=labels).loss, reference(input_ids, labels=labels).loss, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("tuning_mode", ["ptune", "deep_ptune"])
def test_generation_continues_the_prompted_model(tiny_llama, tuning_mode):
    model = DistributedModelForCausalLM.from_local_spans(
        str(tiny_llama), [(0, 3), (3, BLOCKS)], tuning_mode=tuning_mode, pre_seq_len=PRE_SEQ_LEN
    )
    randomize_prompts(model)
    prompt = torch.tensor([[5, 17, 29, 41]])
    output = model.generate(prompt, max_new_tokens=6, eos_token_id=None)
    # greedy, token by token without a cache: each new token is the argmax of the full forward pass
    tokens = prompt
    for _ in range(6):
        with torch.no_grad():
            next_id = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_id], dim=1)
    assert torch.equal(output, tokens)


# ---------------------------------------------------------------- through a swarm


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PETAL_HOME": str(tmp_path / "home")}


def start_servers(swarm, model_dir, spans: list[str]):
    return swarm.start_spans(str(model_dir), spans, *FAST)


@pytest.mark.parametrize("tuning_mode", ["ptune", "deep_ptune"])
def test_gradients_through_the_swarm_equal_local_training(tiny_model, tuning_mode, tmp_path, env):
    local = DistributedModelForCausalLM.from_local_spans(
        str(tiny_model), [(0, BLOCKS)], tuning_mode=tuning_mode, pre_seq_len=PRE_SEQ_LEN
    )
    input_ids, mask = batch()
    labels = input_ids.masked_fill(mask == 0, -100)
    with local_swarm(tmp_path, env) as swarm:
        first, _ = start_servers(swarm, tiny_model, ["0:2", "2:6"])
        remote = DistributedModelForCausalLM.from_pretrained(
            str(tiny_model), [first.addr], tuning_mode=tuning_mode, pre_seq_len=PRE_SEQ_LEN
        )
        try:
            for model in (local, remote):
                randomize_prompts(model)
                model(input_ids, mask, labels=labels).loss.backward()
            assert [(h.start, h.end) for h in remote.blocks.calls.requests] == [(0, 2), (2, 6), (2, 6), (0, 2)]
            # the tuned prompts also steer generation through the swarm (inference sessions)
            prompt = torch.tensor([[9, 18, 27, 36]])
            expected_tokens = local.generate(prompt, max_new_tokens=6, eos_token_id=None)
            assert torch.equal(remote.generate(prompt, max_new_tokens=6, eos_token_id=None), expected_tokens)
        finally:
            remote.blocks.swarm.close()
    expected, got = gradients(local), gradients(remote)
    trained = {"prompts.prefix", "prompts.deep"} if tuning_mode == "deep_ptune" else {"prompts.prefix"}
    assert set(got) == set(expected) == trained
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


def test_batches_spread_over_servers_and_one_that_dies_between_forward_and_backward_is_replaced(
    tiny_llama, tmp_path, env
):
    local = DistributedModelForCausalLM.from_local_spans(
        str(tiny_llama), [(0, BLOCKS)], tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN
    )
    input_ids, mask = batch(3)
    with local_swarm(tmp_path, env) as swarm:
        first, servers = start_servers(swarm, tiny_llama, ["0:6", "0:6"])
        by_peer = {server.peer_id: server for server in servers}
        remote = DistributedModelForCausalLM.from_pretrained(
            str(tiny_llama), [first.addr], tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN
        )
        try:
            # a large batch is cut into chunks that run at once, each routed by throughput: both servers work
            calls = remote.blocks.calls
            calls.max_tokens_per_request = 8
            hidden = torch.randn(32, 4, remote.config.hidden_size)
            with torch.no_grad():
                torch.testing.assert_close(remote.blocks(hidden), local.blocks.forward(hidden), atol=1e-5, rtol=1e-4)
            assert len(calls.requests) == 16
            assert {hop.peer_id for hop in calls.requests} == set(by_peer)  # all on one: 2 ** -15
            calls.max_tokens_per_request, calls.requests = 4096, []

            for model in (local, remote):
                randomize_prompts(model)
            local(input_ids, mask, labels=input_ids).loss.backward()
            loss = remote(input_ids, mask, labels=input_ids).loss
            (forward_hop,) = calls.requests
            by_peer[forward_hop.peer_id].kill()
            loss.backward()
            backward_hop = remote.blocks.calls.requests[-1]
            assert backward_hop.peer_id != forward_hop.peer_id
        finally:
            remote.blocks.swarm.close()
    for name, expected in gradients(local).items():
        torch.testing.assert_close(gradients(remote)[name], expected, atol=1e-5, rtol=1e-4)


def test_prompt_tuning_a_classifier_through_the_swarm_lowers_its_loss(tiny_llama, tmp_path, env):
    torch.manual_seed(0)
    input_ids = torch.randint(3, 120, (8, 6))
    labels = torch.tensor([0, 1] * 4)
    with local_swarm(tmp_path, env) as swarm:
        first, _ = start_servers(swarm, tiny_llama, ["0:3", "3:6"])
        model = DistributedModelForSequenceClassification.from_pretrained(
            str(tiny_llama), [first.addr], tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN, num_labels=2
        )
        try:
            losses = train(model, input_ids, labels, steps=8)
        finally:
            model.blocks.swarm.close()
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_client_can_put_its_own_trainable_lora_on_its_local_layers(tiny_llama):
    # the client's layers are plain torch modules: peft's LoRA goes on them as on any model
    model = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, BLOCKS)])
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["lm_head"]), model.parts)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["parts.lm_head.lora_A.default.weight", "parts.lm_head.lora_B.default.weight"]
    input_ids, _ = batch()
    losses = train(model, input_ids, input_ids, steps=5)
    assert losses[-1] < losses[0], losses
