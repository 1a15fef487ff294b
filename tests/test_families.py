"""Every supported family on its tiny random model (scripts/make_tiny_model): split execution over 3 spans equals
the whole transformers model; batched steps, chunked passes and sliding windows; LoRA and deep prompt tuning on
Qwen3; int8; clear errors for what is not supported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from petal_client.generation import Conversation, generate
from petal_client.local import LocalBlocks
from petal_client.model import DistributedModelForCausalLM
from petald.errors import UnsupportedModelError
from petald.models.checkpoints import TINY_FAMILIES, TINY_SLIDING_WINDOW, make_tiny_model
from petald.models.generic import SLIDING
from petald.models.loading import load_client_parts, load_config
from petald.models.registry import FAMILIES, family_for
from petald.serving.span import SessionStep, Span, run_jobs
from tests.test_adapters import base_model, make_adapter, peft_blocks
from tests.test_finetune import train

THREE_SPANS = [(0, 2), (2, 4), (4, 6)]
SLIDING_FAMILIES = ["mistral", "qwen2", "gemma2", "gemma3"]  # their tiny models have sliding-window layers
QWEN3_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_every_family_has_a_tiny_model_and_every_architecture_a_family():
    assert {family.name for family in FAMILIES} == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_three_spans_equal_the_whole_transformers_model(tiny_family, family):
    """Greedy tokens identical over 24 new tokens (prompts longer than the tiny models' sliding window, one
    left-padded row in a batch), logits within 1e-4."""
    model_dir = tiny_family(family)
    ref = reference(model_dir)
    parts, config = load_client_parts(model_dir)
    blocks = LocalBlocks.load(model_dir, THREE_SPANS)
    assert family_for(config).attn_implementation == ref.config._attn_implementation
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, config.vocab_size, (2, 13), generator=generator)
    with torch.no_grad():
        logits = parts.logits(blocks.forward(parts.embed(input_ids)))
        assert (logits - ref(input_ids).logits).abs().max() < 1e-4
    for length in (3, 17):
        input_ids = torch.randint(3, config.vocab_size, (2, length), generator=generator)
        mask = torch.ones_like(input_ids)
        mask[1, : length // 3] = 0  # a left-padded row
        expected = ref.generate(
            input_ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
            pad_token_id=config.pad_token_id,
        )  # fmt: skip
        conversation = Conversation(blocks.inference_session(2, 64))
        got = generate(parts, conversation, input_ids, mask, max_new_tokens=24, pad_token_id=config.pad_token_id)
        assert torch.equal(got, expected), (family, length)
    assert len(set(expected[0, length:].tolist())) > 3  # varied tokens: the cache is exercised


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_spans_load_only_their_blocks_and_name_them_as_the_checkpoint(tiny_family, family):
    model_dir = tiny_family(family)
    span = Span.load(model_dir, 2, 4)
    config = load_config(model_dir)
    prefix = family_for(config).block_prefix(3)
    assert span.module.local_name(prefix + "x.weight", 2) in ("layers.1.x.weight", "h.1.x.weight")
    assert len(list(span.module.children())) <= 2  # the layers (and the rotary embedding): no embeddings, no head
    with torch.device("meta"):
        assert family_for(config).span_class(config, 2, 4).state_dict().keys() == span.module.state_dict().keys()


def test_moe_checkpoints_are_read_in_the_hub_layout(tiny_family):
    """transformers saves Mixtral's experts one tensor each (as on the hub) and fuses them when it loads: so does a
    span (its router and experts run inside the span)."""
    model_dir = tiny_family("mixtral")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    span = Span.load(model_dir, 0, 1)
    ref = reference(model_dir)
    torch.testing.assert_close(
        span.module.layers[0].mlp.experts.gate_up_proj, ref.model.layers[0].mlp.experts.gate_up_proj, rtol=0, atol=0
    )


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_a_batched_step_equals_solo_steps_on_sliding_window_layers(tiny_family, family):
    """Span.step_batch: sessions of different lengths (shorter and longer than the window, one left-padded) each
    get what they get alone; a chunked pass (a DynamicCache, transformers' sliding-window cache layers) equals one
    pass."""
    span = Span.load(tiny_family(family), 1, 5)
    assert SLIDING in span.module.layer_types and span.config.sliding_window == TINY_SLIDING_WINDOW
    generator = torch.Generator().manual_seed(0)
    lengths = (3, 2 * TINY_SLIDING_WINDOW + 3, TINY_SLIDING_WINDOW)
    solo = [span.new_session(1, 64) for _ in lengths]
    batched = [span.new_session(1, 64) for _ in lengths]
    for n, length in enumerate(lengths):
        hidden = torch.randn(1, length, span.hidden_size, generator=generator)
        mask = torch.ones(1, length, dtype=torch.long)
        mask[:, : 4 if n == 1 else 0] = 0
        span.step(solo[n], hidden, mask)
        span.step(batched[n], hidden, mask)
    for _ in range(TINY_SLIDING_WINDOW + 2):  # every session passes its window
        tokens = [torch.randn(1, 1, span.hidden_size, generator=generator) for _ in lengths]
        expected = [span.step(session, token) for session, token in zip(solo, tokens, strict=True)]
        got = span.step_batch([SessionStep(s, token) for s, token in zip(batched, tokens, strict=True)])
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)

    hidden = torch.randn(2, 3 * TINY_SLIDING_WINDOW, span.hidden_size, generator=generator)
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    mask[1, :5] = 0
    chunked = run_jobs(span.forward_jobs(hidden, mask, chunk_tokens=TINY_SLIDING_WINDOW))
    torch.testing.assert_close(chunked[mask.bool()], span.forward(hidden, mask)[mask.bool()], rtol=1e-4, atol=1e-4)


def test_lora_on_qwen3_computes_what_peft_computes(tiny_family, tmp_path):
    model_dir = tiny_family("qwen3")
    path, peft_model = make_adapter(base_model(model_dir), tmp_path / "lora", target_modules=QWEN3_TARGETS)
    span = Span.load(model_dir, 1, 4, adapters={"lora": path})
    hidden = torch.randn(2, 7, span.hidden_size)
    with torch.no_grad():
        got = span.forward(hidden, adapter="lora")
        expected = peft_blocks(peft_model, hidden, 1, 4)
        without = span.forward(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (without - expected).norm() > 0.01 * expected.norm()  # the adapter does change the output


def test_deep_prompt_tuning_lowers_the_loss_on_qwen3(tiny_family):
    model = DistributedModelForCausalLM.from_local_spans(
        str(tiny_family("qwen3")), [(0, 3), (3, 6)], tuning_mode="deep_ptune", pre_seq_len=4
    )
    input_ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = train(model, input_ids, input_ids, steps=6)
    assert losses[-1] < losses[0], losses


def test_int8_top1_agreement_is_reported(tiny_family):
    """int8 on random tiny weights (MoE experts quantized too): the top-1 agreement with fp32 and the greedy tokens
    of a 3-span split that match fp32's are printed (`pytest -s`), not asserted exact."""
    for family in ("qwen3", "mixtral", "qwen2_moe", "qwen3_moe"):
        model_dir = tiny_family(family)
        parts, config = load_client_parts(model_dir)
        input_ids = torch.randint(3, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        fp32_blocks = LocalBlocks.load(model_dir, THREE_SPANS)
        int8_blocks = LocalBlocks.load(model_dir, THREE_SPANS, "int8")
        with torch.no_grad():
            fp32 = parts.logits(fp32_blocks.forward(parts.embed(input_ids)))
            int8 = parts.logits(int8_blocks.forward(parts.embed(input_ids)))
        agreement = (fp32.argmax(-1) == int8.argmax(-1)).float().mean().item()
        prompt, mask = input_ids[:, :8], torch.ones(1, 8, dtype=torch.long)
        greedy = [
            generate(parts, Conversation(blocks.inference_session(1, 32)), prompt, mask, max_new_tokens=16)[0, 8:]
            for blocks in (fp32_blocks, int8_blocks)
        ]
        same = (greedy[0] == greedy[1]).long()
        first, total = same.cumprod(0).sum().item(), same.sum().item()
        print(
            f"{family} int8: top-1 agreement with fp32 {agreement:.2f} over {input_ids.shape[1]} positions; greedy: "
            f"{first} of 16 new tokens equal before the first difference, {total} in all"
        )
        assert agreement > 0.3  # a sanity bound only: int8 is not broken


def _edited_copy(model_dir, out_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    out_dir.mkdir()
    (out_dir / "config.json").write_text(json.dumps(config))
    shutil.copy(model_dir / "model.safetensors", out_dir / "model.safetensors")
    return out_dir


def test_unsupported_variants_are_clear_errors(tiny_family, tmp_path):
    alibi = _edited_copy(tiny_family("falcon"), tmp_path / "alibi", alibi=True)
    with pytest.raises(UnsupportedModelError, match="alibi=True"):
        Span.load(alibi, 0, 1)
    with pytest.raises(UnsupportedModelError, match="alibi=True"):
        load_client_parts(alibi)
    unknown = _edited_copy(tiny_family("qwen3"), tmp_path / "unknown", model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*mixtral.*qwen3_moe.*gemma3_text.*falcon"):
        Span.load(unknown, 0, 1)


def test_make_tiny_model_writes_any_family_reproducibly(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_model"
    out = tmp_path / "tiny-qwen3-moe"
    command = [sys.executable, str(script), "--family", "qwen3_moe", "--out", str(out), "--layers", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert load_config(out).num_hidden_layers == 3 and load_config(out).model_type == "qwen3_moe"
    again = make_tiny_model("qwen3_moe", tmp_path / "again", num_layers=3)
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_building_parts_in_threads_leaves_other_modules_alone(tiny_family):
    """Spans and client parts are built on the meta device in a thread-local way: modules built at the same time in
    other threads (a server loading while a client builds its model, in one process) get real parameters."""
    model_dir = tiny_family("gemma2")
    errors: list[BaseException] = []

    def load() -> None:
        try:
            for _ in range(5):
                load_client_parts(model_dir)
                Span.load(model_dir, 0, 2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    built = []
    while any(thread.is_alive() for thread in threads):
        built.append(torch.nn.Linear(4, 4).weight.device.type)
    for thread in threads:
        thread.join()
    assert not errors and set(built) == {"cpu"}
    parts, _ = load_client_parts(model_dir)
    assert parts.embed_tokens.embed_scale.item() == 8.0  # Gemma's sqrt(hidden) scale, a real buffer
