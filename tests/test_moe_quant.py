"""int8 and nf4 quantize the MoE experts of Mixtral, Qwen2-MoE and Qwen3-MoE (transformers 5 holds them as 3-D
parameters, not Linear layers): what a quantized MoE block costs (computed and measured), what its experts compute
(transformers' own experts module run on the same dequantized weights), and a quantized span against fp32."""

from __future__ import annotations

import copy
import logging

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from petald.models.loading import load_config
from petald.models.registry import family_for
from petald.serving.span import (
    QuantizedExperts,
    Span,
    _log_unquantized_experts,
    block_bytes,
    block_weight_bytes,
    quantize_linears,
    weight_bytes,
)

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
QUANTS = ["int8", "nf4"]
SPARSE_BLOCK = 1  # sparse in every tiny MoE model (the Qwen-MoE ones alternate dense and sparse blocks)


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight [out, in] that a bitsandbytes int8 or nf4 layer holds, recomputed from its stored form."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # moved on the first pass
        return layer.weight.data.float() * scales.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def routed(span: Span, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random hidden states [tokens, H] and the experts that the sparse block's router picks for them, with their
    weights: the experts module's arguments, as its MoE block passes them."""
    hidden = torch.randn(tokens, span.hidden_size, generator=torch.Generator().manual_seed(seed))
    _, weights, index = span.module.layers[0].mlp.gate(hidden)
    return hidden, index, weights


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_block_bytes_of_a_quantized_moe_span_are_what_it_holds(tiny_family, family, quant):
    """Every block's computed bytes equal its measured ones, before and after a pass (int8 scales move then); no
    full-precision experts tensor is left."""
    model_dir = tiny_family(family)
    config = load_config(model_dir)
    with torch.device("meta"):
        full = family_for(config).span_class(config, 0, 6)
    expected = [block_bytes(block, quant) for block in full.layers]
    assert block_weight_bytes(config, quant) == max(expected)
    span = Span.load(model_dir, 0, 6, quant)
    assert not [name for name, param in span.module.named_parameters() if param.dim() == 3]
    assert sum(isinstance(m, QuantizedExperts) for m in span.module.modules()) == (6 if family == "mixtral" else 3)
    assert [weight_bytes(block) for block in span.module.layers] == expected
    span.forward(torch.randn(2, 9, config.hidden_size))
    assert [weight_bytes(block) for block in span.module.layers] == expected


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantized_experts_hold_a_fraction_of_their_fp32_bytes(tiny_family, family):
    """Measured on the tiny models: int8 0.26-0.27x, nf4 0.15-0.22x (its code tables weigh on small experts);
    experts left in fp32 would be 1x."""
    model_dir = tiny_family(family)
    fp32 = weight_bytes(Span.load(model_dir, SPARSE_BLOCK, SPARSE_BLOCK + 1).module.layers[0].mlp.experts)
    bounds = {"int8": 0.3, "nf4": 0.25}
    for quant, bound in bounds.items():
        experts = Span.load(model_dir, SPARSE_BLOCK, SPARSE_BLOCK + 1, quant).module.layers[0].mlp.experts
        ratio = weight_bytes(experts) / fp32
        print(f"{family} {quant}: experts hold {ratio:.3f}x their fp32 bytes")
        assert ratio < bound, (quant, ratio)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantized_experts_compute_what_transformers_experts_compute_on_their_weights(tiny_family, family, quant):
    """transformers' experts module with each expert's weights replaced by the quantized layers' dequantized ones
    gives the quantized experts' output, on tokens routed by the block's own router to every expert."""
    span = Span.load(tiny_family(family), SPARSE_BLOCK, SPARSE_BLOCK + 1)
    experts = span.module.layers[0].mlp.experts
    quantized = QuantizedExperts(experts, quant)
    reference = copy.deepcopy(experts)
    reference.gate_up_proj.data = torch.stack([dequantized(layer) for layer in quantized.gate_up])
    reference.down_proj.data = torch.stack([dequantized(layer) for layer in quantized.down])
    hidden, index, weights = routed(span, 64, seed=0)
    assert set(index.unique().tolist()) == set(range(quantized.num_experts))
    with torch.no_grad():
        expected = reference(hidden, index, weights)
        got = quantized(hidden, index, weights)
        fp32 = experts(hidden, index, weights)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{family} {quant}: experts vs transformers' on the dequantized weights, max error {error:.1e} (relative)")
    assert error < 1e-5
    assert (got - fp32).norm() > 1e-3 * fp32.norm()  # the quantized weights are not the fp32 ones


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_quantized_moe_span_stays_close_to_fp32(tiny_family, family):
    """Relative error of the output (norm of the difference over the norm) on random inputs, measured: int8 over
    six blocks 0.023-0.046, nf4 on the sparse block alone 0.23-0.31. The tiny models' weights (std 0.2) are harsh
    on nf4: the dense tiny Mistral's one block is at 0.29 too."""
    model_dir = tiny_family(family)
    hidden = torch.randn(2, 9, load_config(model_dir).hidden_size, generator=torch.Generator().manual_seed(1))
    for quant, blocks, bound in (("int8", (0, 6), 0.1), ("nf4", (SPARSE_BLOCK, SPARSE_BLOCK + 1), 0.5)):
        with torch.no_grad():
            fp32 = Span.load(model_dir, *blocks).forward(hidden)
            got = Span.load(model_dir, *blocks, quant).forward(hidden)
        error = ((got - fp32).norm() / fp32.norm()).item()
        print(f"{family} {quant}: blocks {blocks[0]}:{blocks[1]} vs fp32, relative error {error:.4f}")
        assert error < bound, (quant, error)


def test_experts_of_another_layout_stay_in_full_precision_and_are_logged(tiny_family, caplog):
    span = Span.load(tiny_family("qwen3_moe"), SPARSE_BLOCK, SPARSE_BLOCK + 1)
    experts = span.module.layers[0].mlp.experts
    experts.is_transposed = True  # [E, H, 2I] weights: not the layout QuantizedExperts reads
    _log_unquantized_experts.cache_clear()  # logged once per class and process: not before this test
    with caplog.at_level(logging.WARNING, logger="petald.serving.span"):
        quantize_linears(span.module, "int8")
    assert span.module.layers[0].mlp.experts is experts and experts.gate_up_proj.dtype == torch.float32
    assert "Qwen3MoeExperts holds 3-D weights in a layout Petal does not quantize" in caplog.text
    assert not any(type(m) is nn.Linear for m in span.module.modules())  # its other layers are quantized
