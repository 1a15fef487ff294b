"""Read chosen tensors from a safetensors checkpoint without touching the others."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from petald.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint to the file that holds it (reads headers only)."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {e}") from e
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no *.safetensors weights (only safetensors checkpoints are read)")
    names: dict[str, Path] = {}
    for file in files:
        with _open(file) as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def read_tensors(
    model_dir: Path,
    wanted: Callable[[str], bool],
    dtype: torch.dtype | None = None,
    files: dict[str, Path] | None = None,
) -> dict[str, torch.Tensor]:
    """Load only the tensors whose checkpoint name satisfies `wanted`, optionally cast to `dtype`; `files` is
    `weight_files(model_dir)` if the caller has it already.

    A tensor read in its own dtype is a view of the file's memory mapping (its pages are read when first used
    and shared with the page cache); the mapping stays while any tensor read from it lives."""
    by_file: dict[Path, list[str]] = {}
    for name, file in (weight_files(model_dir) if files is None else files).items():
        if wanted(name):
            by_file.setdefault(file, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        if not file.exists():
            raise CheckpointError(f"weight file {file} named by the checkpoint index is missing")
        with _open(file) as f:
            for name in names:
                try:
                    tensor = f.get_tensor(name)
                except SafetensorError as e:
                    raise CheckpointError(f"cannot read tensor {name} from {file}: {e}") from e
                tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file (corrupt or truncated?): {e}") from e
