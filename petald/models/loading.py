"""Build a span of blocks or the client's parts from a checkpoint directory, reading only their tensors."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
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
    model_dir: Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    prepare_block: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, PretrainedConfig]:
    """Blocks [start, end) as one module, with only their tensors read from disk, one block at a time.

    Without `prepare_block`, the weights are views of the checkpoint's memory mapping (nothing is copied). With
    it, each block is handed to `prepare_block(span)` right after its tensors are assigned (e.g. to quantize its
    Linear layers: what is still on the meta device is blocks not read yet), then every tensor of it that is still
    a plain parameter is copied out of the mapping: the full-precision tensors and the file pages they pinned are
    released before the next block is read, so the peak is the prepared blocks plus one block in full precision."""
    from petald.models.weights import read_tensors, weight_files

    config = load_config(model_dir)
    check_span(config, start, end)
    family = family_for(config)
    what = f"blocks {start}:{end} of {model_dir}"
    with torch.device("meta"):
        span = family.span_class(config, start, end).eval()  # before preparing: what that makes keeps its own mode
    files = weight_files(model_dir)  # the checkpoint's names, from its headers
    prefixes = tuple(family.block_prefix(i) for i in range(start, end))
    for prefix in prefixes:
        # the family's conversion (e.g. per-expert MoE tensors fused) works on one block's tensors
        tensors = family.convert_checkpoint(
            config, read_tensors(model_dir, lambda name, prefix=prefix: name.startswith(prefix), dtype, files)
        )
        state = {span.local_name(name, start): tensor for name, tensor in tensors.items()}
        del tensors
        _assign(span, state, what)
        if prepare_block is not None:
            prepare_block(span)
            _copy_out_of_mapping(span, state)
        del state  # the last references to this block's full-precision tensors (and, prepared, to the mapping)
    _check_loaded(span, what)
    if prepare_block is not None:
        release_free_memory()
    return span, config


def _copy_out_of_mapping(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter of `state` that is still a plain one (not replaced by the block's preparation) its own
    memory, so that nothing of the block refers to the checkpoint's mapping any more."""
    for name in state:
        owner, _, attr = name.rpartition(".")
        param = getattr(module.get_submodule(owner), attr, None)
        if type(param) is nn.Parameter and param.data_ptr() == state[name].data_ptr():
            param.data = param.data.clone()


def release_free_memory() -> None:
    """Hand the memory that the C allocator holds free back to the system (glibc's malloc keeps freed heap memory,
    e.g. a block's full-precision tensors after quantization, in its arenas); elsewhere nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


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
    _check_names(module, set(state), what)
    _assign(module, state, what)
    _check_loaded(module, what)


def _check_names(module: nn.Module, names: set[str], what: str) -> None:
    """CheckpointError unless `names` (local names) cover every parameter of `module`."""
    missing = sorted(set(dict(module.named_parameters())) - names)
    if missing:
        raise CheckpointError(f"{what}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Assign the parameters of `state` (local names) to `module`; an extra or misshapen tensor is an error."""
    expected = dict(module.named_parameters())
    for name, tensor in state.items():
        if name not in expected:
            raise CheckpointError(f"{what}: unexpected tensor {name} in the checkpoint")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{what}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    module.load_state_dict(state, assign=True, strict=False)


def _check_loaded(module: nn.Module, what: str) -> None:
    """Nothing of `module` is left on the meta device: every parameter was in the checkpoint."""
    missing = sorted(name for name, param in module.named_parameters() if param.is_meta)
    if missing:
        raise CheckpointError(f"{what}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for submodule in module.modules():
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            if buffer.is_meta:
                raise RuntimeError(f"{what}: buffer {name} was built on the meta device")
