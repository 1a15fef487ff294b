"""Which adapter runs which architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from petald.errors import UnsupportedModelError
from petald.models import bloom, llama


@dataclass(frozen=True)
class Family:
    """How to build and name the parts of one architecture family."""

    name: str
    model_types: tuple[str, ...]
    block_prefix: Callable[[int], str]
    span_class: type[nn.Module]
    client_class: type[nn.Module]
    attn_implementation: str  # as transformers runs this family by default, so outputs match it


FAMILIES = (
    Family("llama", llama.MODEL_TYPES, llama.block_prefix, llama.LlamaSpan, llama.LlamaClientParts, "sdpa"),
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
