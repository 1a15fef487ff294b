"""Build a span of blocks or the client's parts from a checkpoint directory, reading only their tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from petald.errors import CheckpointError, SpanError
from petald.models.registry import family_for


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config; a missing or unreadable config.json is a CheckpointError."""
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json: is it a Hugging Face checkpoint directory?")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"cannot read the config of {model_dir}: {e}") from e
    config._attn_implementation = family_for(config).attn_implementation
    return config


def num_blocks(config: PretrainedConfig) -> int:
    return config.num_hidden_layers


def check_span(config: PretrainedConfig, start: int, end: int) -> None:
    """Raise SpanError unless 0 <= start < end <= number of blocks."""
    total = num_blocks(config)
    if not 0 <= start < end <= total:
        raise SpanError(f"blocks {start}:{end} are outside the model, which has blocks 0:{total}")


def load_span_module(
    model_dir: Path, start: int, end: int, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, PretrainedConfig]:
    """Blocks [start, end) as one module, with only their tensors read from disk."""
    from petald.models.weights import read_tensors

    config = load_config(model_dir)
    check_span(config, start, end)
    family = family_for(config)
    prefixes = tuple(family.block_prefix(i) for i in range(start, end))
    tensors = family.convert_checkpoint(config, read_tensors(model_dir, lambda name: name.startswith(prefixes), dtype))
    with torch.device("meta"):
        span = family.span_class(config, start, end)
    state = {span.local_name(name, start): tensor for name, tensor in tensors.items()}
    _load_exactly(span, state, f"blocks {start}:{end} of {model_dir}")
    return span.eval(), config


def load_client_parts(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PretrainedConfig]:
    """Embeddings, final norm and LM head, without reading any block."""
    from petald.models.weights import read_tensors

    config = load_config(model_dir)
    family = family_for(config)
    with torch.device("meta"):
        parts = family.client_class(config)
    names = parts.checkpoint_names  # local name -> checkpoint name
    tensors = read_tensors(model_dir, lambda name: name in names.values(), dtype)
    local = {mine: tensors[theirs] for mine, theirs in names.items() if theirs in tensors}
    for mine, source in parts.tied.items():
        if mine not in local and getattr(config, "tie_word_embeddings", False) and source in local:
            local[mine] = local[source]
    _load_exactly(parts, local, f"the client parts of {model_dir}")
    return parts.eval(), config


def _load_exactly(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Assign every parameter of `module` from `state`; a missing, extra or misshapen tensor is an error."""
    expected = dict(module.named_parameters())
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{what}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, tensor in state.items():
        if name not in expected:
            raise CheckpointError(f"{what}: unexpected tensor {name} in the checkpoint")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{what}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    module.load_state_dict(state, assign=True, strict=False)
    for submodule in module.modules():
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            if buffer.is_meta:
                raise RuntimeError(f"{what}: buffer {name} was built on the meta device")
