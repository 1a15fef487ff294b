"""LoRA adapters on spans: the same results and gradients as peft, several adapters per span, clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from petal_client.model import DistributedModelForCausalLM
from petal_client.routing import MissingBlocksError
from petald.errors import AdapterError
from petald.local_swarm import local_swarm
from petald.serving.adapters import (
    LoraLinear,
    active_adapter,
    attach_adapters,
    load_lora_adapter,
    served_adapters,
)
from petald.serving.span import Span

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
BLOOM_TARGETS = ["query_key_value", "dense_4h_to_h"]


def make_adapter(model: PreTrainedModel, out_dir: Path, seed: int = 0, safe_serialization: bool = True, **options):
    """Save a LoRA adapter for `model` with random A and B (peft starts B at zero: a no-op); returns its directory
    and the peft model."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **options)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return out_dir, peft_model


def base_model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def peft_blocks(peft_model: PeftModel, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Blocks [start, end) of `peft_model` run on `hidden`: hooks swap the input of block `start` and catch the
    output of block `end - 1` in a pass of the whole model (autograd flows from the output back to `hidden`)."""
    model = peft_model.get_base_model()
    blocks = next(child for child in model.base_model.children() if isinstance(child, torch.nn.ModuleList))
    caught = []

    def swap_input(block, args, kwargs):
        return (hidden, *args[1:]), kwargs

    def catch_output(block, args, kwargs, output):
        caught.append(output[0] if isinstance(output, tuple) else output)

    hooks = [
        blocks[start].register_forward_pre_hook(swap_input, with_kwargs=True),
        blocks[end - 1].register_forward_hook(catch_output, with_kwargs=True),
    ]
    try:
        peft_model(input_ids=torch.full(hidden.shape[:2], 5))
    finally:
        for hook in hooks:
            hook.remove()
    return caught[0]


def span_with_adapters(model_dir: Path, start: int, end: int, adapters: dict[str, Path], quant: str = "none") -> Span:
    return Span.load(model_dir, start, end, quant, adapters)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


LLAMA_OPTIONS = {
    "list": dict(target_modules=LLAMA_TARGETS),
    "rslora": dict(target_modules=LLAMA_TARGETS, use_rslora=True),
    "regex": dict(target_modules=r".*\.(k_proj|o_proj|up_proj)"),
    "all-linear": dict(target_modules="all-linear"),
    "patterns": dict(
        target_modules=["q_proj", "gate_proj"],
        layers_to_transform=[1, 3],
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"q_proj": 16},
    ),
}


@pytest.mark.parametrize("options", LLAMA_OPTIONS.values(), ids=LLAMA_OPTIONS.keys())
def test_llama_span_with_adapter_computes_what_peft_computes(tiny_llama, tmp_path, options):
    path, peft_model = make_adapter(base_model(tiny_llama), tmp_path / "lora", **options)
    span = span_with_adapters(tiny_llama, 1, 4, {"lora": path})
    hidden = torch.randn(2, 7, span.hidden_size)
    with torch.no_grad():
        got = span.forward(hidden, adapter="lora")
    with torch.no_grad():
        expected = peft_blocks(peft_model, hidden, 1, 4)
        without = Span.load(tiny_llama, 1, 4).forward(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert relative_error(without, expected) > 0.01  # the adapter does change the output


def test_bloom_span_with_adapter_computes_what_peft_computes(tiny_bloom, tmp_path):
    path, peft_model = make_adapter(base_model(tiny_bloom), tmp_path / "lora", target_modules=BLOOM_TARGETS)
    span = span_with_adapters(tiny_bloom, 2, 5, {"lora": path})
    assert sum(isinstance(m, LoraLinear) for m in span.module.modules()) == 6
    hidden = torch.randn(2, 7, span.hidden_size)
    with torch.no_grad():
        got = span.forward(hidden, adapter="lora")
    with torch.no_grad():
        expected = peft_blocks(peft_model, hidden, 2, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapter_saved_as_bin_loads_like_safetensors(tiny_llama, tmp_path):
    make_adapter(base_model(tiny_llama), tmp_path / "bin", safe_serialization=False, target_modules=LLAMA_TARGETS)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    path, _ = make_adapter(base_model(tiny_llama), tmp_path / "st", target_modules=LLAMA_TARGETS)
    config = Span.load(tiny_llama, 0, 1).config
    from_bin, from_safetensors = (load_lora_adapter(p, config, 0, 6) for p in (tmp_path / "bin", path))
    assert from_bin.layers.keys() == from_safetensors.layers.keys()
    for name, weights in from_bin.layers.items():
        assert torch.equal(weights.a, from_safetensors.layers[name].a)
        assert torch.equal(weights.b, from_safetensors.layers[name].b)


def test_each_request_picks_one_adapter_or_none(tiny_llama, tmp_path):
    first, first_peft = make_adapter(base_model(tiny_llama), tmp_path / "first", seed=1, target_modules=LLAMA_TARGETS)
    second, second_peft = make_adapter(
        base_model(tiny_llama), tmp_path / "second", seed=2, target_modules=["k_proj", "up_proj", "v_proj"]
    )
    plain = Span.load(tiny_llama, 2, 5)
    span = span_with_adapters(tiny_llama, 2, 5, {"first": first, "second": second})
    assert served_adapters(span.module) == ("first", "second")
    hidden = torch.randn(1, 6, span.hidden_size)
    with torch.no_grad():
        base_output = plain.forward(hidden)
        assert torch.equal(span.forward(hidden), base_output)  # no adapter: bit-identical to the unwrapped span
        with active_adapter(span.module, None):
            assert torch.equal(span.forward(hidden), base_output)
        for name, peft_model in [("first", first_peft), ("second", second_peft)]:
            got = span.forward(hidden, adapter=name)
            step = span.step(span.new_session(1, 16, adapter=name), hidden)  # the cached inference path too
            expected = peft_blocks(peft_model, hidden, 2, 5)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="job failed"), active_adapter(span.module, "first"):
            raise RuntimeError("job failed")
        assert torch.equal(span.forward(hidden), base_output)  # the choice was restored after the failure


def test_gradient_through_adapter_matches_peft(tiny_llama, tmp_path):
    path, peft_model = make_adapter(base_model(tiny_llama), tmp_path / "lora", target_modules=LLAMA_TARGETS)
    span = span_with_adapters(tiny_llama, 1, 4, {"lora": path})
    assert not any(p.requires_grad for p in span.module.parameters())
    assert not any(b.requires_grad for b in span.module.buffers())
    hidden = torch.randn(2, 5, span.hidden_size, requires_grad=True)
    grad_output = torch.randn(2, 5, span.hidden_size)
    (got,) = torch.autograd.grad(span.forward(hidden, adapter="lora"), hidden, grad_output)
    grad_hidden, _ = span.backward(hidden, grad_output, adapter="lora")  # the server's backward request
    torch.testing.assert_close(grad_hidden, got)
    reference_input = hidden.detach().clone().requires_grad_(True)
    output = peft_blocks(peft_model, reference_input, 1, 4)
    (expected,) = torch.autograd.grad(output, reference_input, grad_output)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (without,) = torch.autograd.grad(span.forward(hidden), hidden, grad_output)
    assert relative_error(without, expected) > 0.01


def test_int8_span_with_adapter_is_close_to_fp32(tiny_llama, tmp_path):
    import bitsandbytes as bnb

    path, _ = make_adapter(base_model(tiny_llama), tmp_path / "lora", target_modules=LLAMA_TARGETS)
    fp32 = span_with_adapters(tiny_llama, 0, 6, {"lora": path})
    int8 = span_with_adapters(tiny_llama, 0, 6, {"lora": path}, quant="int8")
    wrapped = [m for m in int8.module.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 18 and all(isinstance(m.base, bnb.nn.Linear8bitLt) for m in wrapped)
    hidden = torch.randn(2, 5, fp32.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = fp32.step(fp32.new_session(2, 16, adapter="lora"), hidden)
    got = int8.step(int8.new_session(2, 16, adapter="lora"), hidden)
    without_adapter = int8.step(int8.new_session(2, 16), hidden)
    assert torch.isfinite(got).all()
    # int8 on six blocks of random weights is 0.03-0.06 off in relative terms (0.039 median over 200 random
    # inputs); leaving the adapter out is ~0.9 off
    assert relative_error(got, expected) < 0.1
    assert relative_error(without_adapter, expected) > 0.5


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama, tmp_path_factory) -> Path:
    path, _ = make_adapter(
        base_model(tiny_llama), tmp_path_factory.mktemp("adapters") / "lora", target_modules=LLAMA_TARGETS
    )
    return path


def edited_copy(adapter: Path, out_dir: Path, options: dict | None = None, tensors=None) -> Path:
    """A copy of `adapter` with `options` set in its config and `tensors(state)` applied to its weights."""
    shutil.copytree(adapter, out_dir)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    (out_dir / "adapter_config.json").write_text(json.dumps({**config, **(options or {})}))
    if tensors is not None:
        state = load_file(out_dir / "adapter_model.safetensors")
        tensors(state)
        save_file(state, out_dir / "adapter_model.safetensors")
    return out_dir


def test_missing_adapter_files_are_clear_errors(tiny_llama, llama_adapter, tmp_path):
    config = Span.load(tiny_llama, 0, 1).config
    with pytest.raises(AdapterError, match="has no adapter_config.json: is it a LoRA adapter"):
        load_lora_adapter(tmp_path / "nowhere", config, 0, 2)
    (tmp_path / "config-only").mkdir()
    shutil.copy(llama_adapter / "adapter_config.json", tmp_path / "config-only")
    with pytest.raises(AdapterError, match="has neither adapter_model.safetensors nor adapter_model.bin"):
        load_lora_adapter(tmp_path / "config-only", config, 0, 2)


def test_dora_adapter_is_refused(tiny_llama, tmp_path):
    path, _ = make_adapter(base_model(tiny_llama), tmp_path / "dora", target_modules=LLAMA_TARGETS, use_dora=True)
    config = Span.load(tiny_llama, 0, 1).config
    with pytest.raises(AdapterError, match="sets use_dora=True, which Petal does not implement"):
        load_lora_adapter(path, config, 0, 2)
    # its magnitude vectors are refused too, even if the config hides them
    edited = edited_copy(path, tmp_path / "hidden-dora", {"use_dora": False})
    with pytest.raises(AdapterError, match="lora_magnitude_vector.*not a LoRA A or B weight"):
        load_lora_adapter(edited, config, 0, 2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"peft_type": "IA3"}, "is a 'IA3' adapter: Petal serves LORA adapters only"),
        ({"bias": "all"}, "sets bias='all', which Petal does not implement"),
        ({"fan_in_fan_out": True}, "sets fan_in_fan_out=True"),
        ({"modules_to_save": ["lm_head"]}, "sets modules_to_save=\\['lm_head'\\]"),
        ({"a_future_option": 3}, "sets a_future_option=3, which Petal does not implement"),
        ({"init_lora_weights": "pissa"}, "rewrites the base model's weights"),
        ({"target_modules": ["q_proj"]}, "has LoRA weights for model.layers.0.*v_proj, which adapter_config"),
        ({"target_modules": LLAMA_TARGETS + ["k_proj"]}, "targets model.layers.0.self_attn.k_proj, but"),
        ({"target_modules": "(unclosed"}, "is not a valid regex"),
        ({"r": 8}, "lora_A of .* has shape \\(4, 64\\), .* needs \\(8, 64\\)"),
    ],
)
def test_unsupported_or_inconsistent_config_is_a_clear_error(tiny_llama, llama_adapter, tmp_path, options, message):
    config = Span.load(tiny_llama, 0, 1).config
    with pytest.raises(AdapterError, match=message):
        load_lora_adapter(edited_copy(llama_adapter, tmp_path / "edited", options), config, 0, 2)


def test_adapter_for_another_model_is_a_clear_error(tiny_llama, tiny_bloom, llama_adapter, tmp_path):
    # the same architecture with another hidden size
    other = base_model(tiny_llama).config.to_dict() | {"hidden_size": 32, "head_dim": 8}
    model = AutoModelForCausalLM.from_config(type(base_model(tiny_llama).config).from_dict(other))
    path, _ = make_adapter(model, tmp_path / "small", target_modules=LLAMA_TARGETS)
    llama_config = Span.load(tiny_llama, 0, 1).config
    with pytest.raises(AdapterError, match="has shape \\(4, 32\\), but .* needs \\(4, 64\\): was the adapter made"):
        load_lora_adapter(path, llama_config, 0, 2)
    # another architecture
    bloom_config = Span.load(tiny_bloom, 0, 1).config
    with pytest.raises(
        AdapterError, match="model.layers.0.mlp.down_proj, which is not inside a block of this bloom model"
    ):
        load_lora_adapter(llama_adapter, bloom_config, 0, 2)


def test_adapter_on_a_layer_that_is_not_linear_is_a_clear_error(tiny_llama, llama_adapter, tmp_path):
    def onto_layernorm(state):
        for factor in "AB":
            state[f"base_model.model.model.layers.1.input_layernorm.lora_{factor}.weight"] = torch.zeros(4, 4)

    config = Span.load(tiny_llama, 0, 1).config
    edited = edited_copy(llama_adapter, tmp_path / "edited", tensors=onto_layernorm)
    with pytest.raises(AdapterError, match="layers.1.input_layernorm, which is not a Linear layer"):
        load_lora_adapter(edited, config, 0, 2)


def test_unknown_adapter_name_is_a_clear_error(tiny_llama, llama_adapter):
    span = span_with_adapters(tiny_llama, 0, 2, {"chat": llama_adapter, "code": llama_adapter})
    with pytest.raises(AdapterError, match="adapter 'poems' is not served here \\(served adapters: chat, code\\)"):
        with active_adapter(span.module, "poems"):
            pass
    with pytest.raises(AdapterError, match="served adapters: none"):
        with active_adapter(Span.load(tiny_llama, 0, 2).module, "chat"):
            pass
    with pytest.raises(AdapterError, match="already served"):
        attach_adapters(span.module, {"chat": load_lora_adapter(llama_adapter, span.config, 0, 2)})
    smaller = Span.load(tiny_llama, 0, 1)
    with pytest.raises(AdapterError, match="blocks 0:2\\) does not fit layer layers.1.self_attn.q_proj"):
        attach_adapters(smaller.module, {"chat": load_lora_adapter(llama_adapter, span.config, 0, 2)})
    assert served_adapters(smaller.module) == () and not any(
        isinstance(m, LoraLinear) for m in smaller.module.modules()
    )


# ---------------------------------------------------------------- served by real petald processes


def test_a_served_adapter_changes_outputs_as_peft_does_and_only_its_servers_are_used(tiny_llama, tmp_path):
    path, peft_model = make_adapter(base_model(tiny_llama), tmp_path / "lora", target_modules=LLAMA_TARGETS)
    input_ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=input_ids).logits
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}
    fast = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
    with local_swarm(tmp_path, env) as swarm:
        first = swarm.start("dht", "--port", "0", "--new-swarm")
        common = ("start", "--model", str(tiny_llama), "--initial-peers", first.addr, *fast)
        with_adapter = [swarm.start(*common, "--blocks", "0:3", "--adapters", f"sentiment={path}")]
        with_adapter.append(swarm.start(*common, "--blocks", "3:6", "--adapters", f"sentiment={path}"))
        without = swarm.start(*common, "--blocks", "0:6")
        for node in [*with_adapter, without]:
            node.wait_serving()
        adapted = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [first.addr], active_adapter="sentiment")
        plain = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [first.addr])
        try:
            with torch.no_grad():
                torch.testing.assert_close(adapted(input_ids).logits, expected, rtol=0, atol=1e-4)
                torch.testing.assert_close(plain(input_ids).logits, base, rtol=0, atol=1e-4)
            adapter_peers = {node.peer_id for node in with_adapter}
            assert {hop.peer_id for hop in adapted.blocks.calls.requests} == adapter_peers

            # generation (inference sessions) with the adapter: greedy tokens of the peft model
            output = adapted.generate(input_ids, max_new_tokens=5, eos_token_id=None)
            tokens = input_ids
            for _ in range(5):
                with torch.no_grad():
                    tokens = torch.cat([tokens, peft_model(input_ids=tokens).logits[:, -1:].argmax(-1)], dim=1)
            assert torch.equal(output, tokens)

            adapted.blocks.adapter = "no-such-adapter"
            adapted.blocks.calls.adapter = "no-such-adapter"
            with pytest.raises(MissingBlocksError, match="with adapter 'no-such-adapter'"):
                adapted(input_ids)
        finally:
            adapted.blocks.swarm.close()
            plain.blocks.swarm.close()
