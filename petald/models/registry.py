"""Which adapter runs which architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from petald.errors import UnsupportedModelError
from petald.models import bloom, generic


def _unchanged(config: PretrainedConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return tensors


def _layers(prefix: str) -> Callable[[int], str]:
    return lambda index: f"{prefix}.{index}."


@dataclass(frozen=True)
class Family:
    """How to build and name the parts of one architecture family."""

    name: str
    model_types: tuple[str, ...]
    block_prefix: Callable[[int], str]  # the checkpoint name prefix of block `index`
    span_class: type[nn.Module]
    client_class: type[nn.Module]
    attn_implementation: str  # as transformers runs this family by default, so outputs match it
    # a block's checkpoint tensors under the names (and in the layout) of the model's parameters
    convert_checkpoint: Callable[[PretrainedConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _unchanged


def _generic(name: str, *model_types: str, attn_implementation: str = "sdpa") -> Family:
    return Family(
        name,
        model_types or (name,),
        _layers("model.layers"),
        generic.GenericSpan,
        generic.GenericClientParts,
        attn_implementation,
        generic.convert_checkpoint,
    )


FAMILIES = (
    _generic("llama"),
    _generic("mistral"),
    _generic("mixtral"),
    _generic("qwen2"),
    _generic("qwen2_moe"),
    _generic("qwen3"),
    _generic("qwen3_moe"),
    _generic("gemma2", attn_implementation="eager"),  # transformers' sdpa cannot soft-cap attention logits
    _generic("gemma3", "gemma3_text"),
    _generic("phi3"),
    Family(
        "falcon",
        ("falcon",),
        _layers("transformer.h"),
        generic.FalconSpan,
        generic.FalconClientParts,
        "sdpa",
        generic.convert_checkpoint,
    ),
    Family("bloom", bloom.MODEL_TYPES, bloom.block_prefix, bloom.BloomSpan, bloom.BloomClientParts, "eager"),
)


def family_for(config: PretrainedConfig) -> Family:
    """The family whose adapter runs `config`'s architecture."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"architecture {config.model_type!r} is not supported by Petal (supported: {supported})"
    )
