"""LoRA adapters served on a span: peft's adapter files read for blocks [start, end), the targeted Linear layers
wrapped, and one adapter (or none) chosen per computation.

Only plain LoRA is served: y = W x + scaling * B (A x), scaling = alpha / r (alpha / sqrt(r) with rsLoRA). An
adapter that needs anything else (DoRA, trained biases, embeddings, ...) is refused when it is loaded.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig

from petald.errors import AdapterError
from petald.models.loading import check_span, num_blocks
from petald.models.registry import family_for

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# peft saves `base_model.model.<module>.lora_A.weight`: the module's path in the transformers model
TENSOR_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")

# Options read by this module; every other option must keep its neutral value unless listed in IGNORED_OPTIONS.
HANDLED_OPTIONS = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
}
# Metadata, or how the adapter was initialised or trained: nothing that changes its output at inference.
IGNORED_OPTIONS = {
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "peft_version",
    "inference_mode",
    "lora_dropout",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "runtime_config",
}
# Initialisations that leave the base model's weights as they were (pissa, olora, corda, loftq rewrite them).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
NEUTRAL_VALUES = (None, False, "none", "", [], {})


@dataclass(frozen=True)
class LoraWeights:
    """The LoRA update of one Linear layer: scaling * b @ a, in float32."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float


@dataclass(frozen=True)
class LoraAdapter:
    """The part of a LoRA adapter that acts on blocks [start, end), keyed by the span module's local layer names
    (e.g. `layers.0.self_attn.q_proj`); empty where the adapter leaves these blocks alone."""

    path: Path
    start: int
    end: int
    layers: dict[str, LoraWeights]


def load_lora_adapter(path: str | Path, config: PretrainedConfig, start: int, end: int) -> LoraAdapter:
    """Read the LoRA adapter that peft's `save_pretrained` wrote to `path`, keeping blocks [start, end) of the model
    described by `config`. Raises AdapterError for a missing or corrupt adapter, an option Petal does not implement,
    or weights that do not fit the model's layers."""
    path = Path(path)
    check_span(config, start, end)
    options = _read_options(path)
    family = family_for(config)
    block_of = {family.block_prefix(i): i for i in range(num_blocks(config))}
    weights_file, names, tensors = _read_tensors(path, lambda module: start <= _block(module, block_of) < end)
    if not names:
        raise AdapterError(f"{weights_file} holds no LoRA weights")
    for module in sorted(names):
        if _block(module, block_of) < 0:
            raise AdapterError(
                f"{weights_file} has LoRA weights for {module}, which is not inside a block of this "
                f"{config.model_type} model with {num_blocks(config)} blocks (LoRA on embeddings or the LM head is "
                f"not supported): was the adapter made for another model?"
            )

    with torch.device("meta"):
        span = family.span_class(config, start, end)
    linears: dict[str, tuple[str, nn.Linear]] = {}  # checkpoint name -> (local name, layer) of each Linear
    for index in range(start, end):
        prefix = family.block_prefix(index)
        local_prefix = span.local_name(prefix + "_", start).removesuffix("_")
        for rest, layer in span.get_submodule(local_prefix.removesuffix(".")).named_modules():
            if isinstance(layer, nn.Linear):
                linears[prefix + rest] = (local_prefix + rest, layer)

    if strays := sorted(set(tensors) - set(linears)):
        raise AdapterError(f"{weights_file} has LoRA weights for {strays[0]}, which is not a Linear layer of the model")
    layers: dict[str, LoraWeights] = {}
    for module, (local, layer) in linears.items():
        targeted = _is_targeted(options, module)
        if module not in tensors:
            if targeted:
                raise AdapterError(
                    f"{path / CONFIG_FILE} targets {module}, but {weights_file} has no LoRA weights for it: "
                    f"is the file complete?"
                )
            continue
        if not targeted:
            raise AdapterError(
                f"{weights_file} has LoRA weights for {module}, which {CONFIG_FILE} does not target (target_modules"
                f"={options['target_modules']!r})"
            )
        layers[local] = _layer_weights(options, module, tensors[module], layer, weights_file)
    return LoraAdapter(path, start, end, layers)


def _read_options(path: Path) -> dict[str, Any]:
    """adapter_config.json, checked: a LORA adapter that sets no option Petal does not implement."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}: is it a LoRA adapter saved by peft's save_pretrained?")
    try:
        options = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {config_file}: {e}") from e
    if not isinstance(options, dict):
        raise AdapterError(f"{config_file} is not a JSON object")
    if options.get("peft_type") != "LORA":
        raise AdapterError(f"{config_file} is a {options.get('peft_type')!r} adapter: Petal serves LORA adapters only")
    for key, value in options.items():
        if key not in HANDLED_OPTIONS | IGNORED_OPTIONS and value not in NEUTRAL_VALUES:
            raise AdapterError(
                f"{config_file} sets {key}={value!r}, which Petal does not implement: only plain LoRA (no DoRA, "
                f"biases, modules_to_save, trainable tokens or other variants) is served"
            )
    if options.get("init_lora_weights", True) not in PLAIN_INITS:
        raise AdapterError(
            f"{config_file} sets init_lora_weights={options['init_lora_weights']!r}, which rewrites the base model's "
            f"weights; convert the adapter to plain LoRA with save_pretrained(path_initial_model_for_weight_conversion"
            f"=...) first"
        )
    r, alpha = options.get("r"), options.get("lora_alpha")
    if not (isinstance(r, int) and r > 0 and isinstance(alpha, int | float)):
        raise AdapterError(f"{config_file} needs a positive integer r and a number lora_alpha, not {r!r}, {alpha!r}")
    targets = options.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{config_file}: target_modules must be a list of names or a regex, not {targets!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(options.get(key) or {}, dict):
            raise AdapterError(f"{config_file}: {key} must map module names to values, not {options[key]!r}")
    regexes = [options[key] for key in ("target_modules", "exclude_modules") if isinstance(options.get(key), str)]
    for regex in [*regexes, *(options.get("rank_pattern") or {}), *(options.get("alpha_pattern") or {})]:
        try:
            re.compile(regex)
        except re.error as e:
            raise AdapterError(f"{config_file}: {regex!r} is not a valid regex: {e}") from e
    return options


def _read_tensors(
    path: Path, wanted: Callable[[str], bool]
) -> tuple[Path, set[str], dict[str, dict[str, torch.Tensor]]]:
    """The weights file; the names of all modules it has LoRA weights for; and the A and B of the `wanted` ones."""
    weights_file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights_file is None:
        raise AdapterError(f"{path} has neither {' nor '.join(WEIGHT_FILES)}: save the adapter with save_pretrained")
    try:
        if weights_file.suffix == ".safetensors":
            with safe_open(str(weights_file), framework="pt") as f:
                keys = list(f.keys())
                parsed = {key: _parse_tensor_name(key, weights_file) for key in keys}
                state = {key: f.get_tensor(key) for key, (module, _) in parsed.items() if wanted(module)}
        else:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
            parsed = {key: _parse_tensor_name(key, weights_file) for key in state}
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise AdapterError(f"{weights_file} is not a readable adapter file (corrupt or truncated?): {e}") from e
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, (module, factor) in parsed.items():
        if wanted(module):
            tensors.setdefault(module, {})[factor] = state[key].float()
    return weights_file, {module for module, _ in parsed.values()}, tensors


def _parse_tensor_name(key: str, weights_file: Path) -> tuple[str, str]:
    """(module name, "A" or "B") of one tensor of a LoRA file."""
    match = TENSOR_NAME.fullmatch(key)
    if match is None:
        raise AdapterError(
            f"{weights_file} holds {key}, which is not a LoRA A or B weight of a Linear layer: only plain LoRA (no "
            f"DoRA magnitudes, LoRA biases, embeddings or modules_to_save) is served"
        )
    return match["module"], match["factor"]


def _block(module: str, block_of: Mapping[str, int]) -> int:
    """The block that checkpoint module name `module` is in, or -1."""
    return next((index for prefix, index in block_of.items() if module.startswith(prefix)), -1)


def _is_targeted(options: Mapping[str, Any], module: str) -> bool:
    """Whether peft puts LoRA on `module` given the adapter's options (as peft's check_target_module_exists)."""
    exclude = options.get("exclude_modules")
    if exclude and _names_match(exclude, module):
        return False
    targets = options["target_modules"]
    if isinstance(targets, str):  # a regex: layers_to_transform does not apply
        return re.fullmatch(targets, module) is not None
    if not _names_match(targets, module):
        return False
    layers = options.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = options.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex in regexes:
        if match := re.match(regex, module):
            index = int(match["idx"])
            return index == layers if isinstance(layers, int) else index in layers
    return False


def _names_match(names: str | list[str], module: str) -> bool:
    """peft's matching of a target or exclusion: a regex matching the whole name, or a list of name suffixes."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == name or module.endswith(f".{name}") for name in names)


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of rank_pattern or alpha_pattern for `module` (the first key matching the end of its name)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _layer_weights(
    options: Mapping[str, Any], module: str, factors: dict[str, torch.Tensor], layer: nn.Linear, weights_file: Path
) -> LoraWeights:
    """The checked A, B and scaling of `module`, whose base layer is `layer`."""
    if set(factors) != {"A", "B"}:
        missing = "B" if "A" in factors else "A"
        raise AdapterError(f"{weights_file} has no lora_{missing} weight for {module}: is the file complete?")
    r = _pattern_value(options.get("rank_pattern") or {}, module, options["r"])
    alpha = _pattern_value(options.get("alpha_pattern") or {}, module, options["lora_alpha"])
    a, b = factors["A"], factors["B"]
    expected = {"A": (r, layer.in_features), "B": (layer.out_features, r)}
    for factor, tensor in factors.items():
        if tuple(tensor.shape) != expected[factor]:
            raise AdapterError(
                f"{weights_file}: lora_{factor} of {module} has shape {tuple(tensor.shape)}, but this model's layer "
                f"({layer.in_features} -> {layer.out_features}) with rank {r} needs {expected[factor]}: was the "
                f"adapter made for another model?"
            )
    scaling = alpha / math.sqrt(r) if options.get("use_rslora") else alpha / r
    return LoraWeights(a.contiguous(), b.contiguous(), scaling)


class AdapterChoice:
    """The adapters served on one span module."""

    def __init__(self) -> None:
        self.served: list[str] = []


# The adapter of the computation running in this thread, with the span it is for (None: the base model). A context
# variable, set by the computation itself: each worker thread runs in its own context, so two passes with different
# adapters never see each other's choice.
_ACTIVE: ContextVar[tuple[AdapterChoice, str] | None] = ContextVar("active_adapter", default=None)


class LoraLinear(nn.Module):
    """A frozen Linear layer (plain or bitsandbytes) plus the LoRA weights of the adapters that target it; it adds
    the update of the active adapter, if it has one, and is exactly its base layer otherwise."""

    def __init__(self, base: nn.Linear, choice: AdapterChoice):
        super().__init__()
        self.base = base
        self.choice = choice  # shared by every LoraLinear of the span; a plain attribute, not a submodule
        # adapter name -> (n, scaling), its A and B being the buffers lora_a<n> and lora_b<n>
        self.slots: dict[str, tuple[int, float]] = {}

    def add(self, name: str, weights: LoraWeights) -> None:
        slot = len(self.slots)
        device = self.base.weight.device
        # buffers, so that they follow the module's .to(device); frozen, and not in its state_dict
        self.register_buffer(f"lora_a{slot}", weights.a.to(device), persistent=False)
        self.register_buffer(f"lora_b{slot}", weights.b.to(device), persistent=False)
        self.slots[name] = (slot, weights.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        active = _ACTIVE.get()
        if active is None or active[0] is not self.choice or active[1] not in self.slots:
            return output
        slot, scaling = self.slots[active[1]]
        a, b = self.get_buffer(f"lora_a{slot}"), self.get_buffer(f"lora_b{slot}")
        update = F.linear(F.linear(x.to(a.dtype), a), b) * scaling
        return output + update.to(output.dtype)


def attach_adapters(module: nn.Module, adapters: Mapping[str, LoraAdapter]) -> None:
    """Serve `adapters` (by name) on span `module`, whose Linear layers may already be quantized: each targeted
    layer is wrapped in a LoraLinear. The adapters must have been loaded for the blocks this module holds; on an
    error, nothing is attached."""
    choice = getattr(module, "adapter_choice", None) or AdapterChoice()
    for name, adapter in adapters.items():
        if not name or name in choice.served:
            raise AdapterError(f"adapter name {name!r} is empty or already served on this span")
        for local, weights in adapter.layers.items():
            try:
                layer = module.get_submodule(local)
            except AttributeError:
                layer = None
            base = layer.base if isinstance(layer, LoraLinear) else layer
            if not (
                isinstance(base, nn.Linear)
                and weights.b.shape[0] == base.out_features
                and weights.a.shape[1] == base.in_features
            ):
                raise AdapterError(
                    f"adapter {name!r} (blocks {adapter.start}:{adapter.end}) does not fit layer {local} of this span: "
                    f"was it loaded for other blocks or another model?"
                )
    module.adapter_choice = choice
    for name, adapter in adapters.items():
        for local, weights in adapter.layers.items():
            parent_name, _, child_name = local.rpartition(".")
            parent = module.get_submodule(parent_name)
            layer = getattr(parent, child_name)
            if not isinstance(layer, LoraLinear):
                layer = LoraLinear(layer, choice)
                setattr(parent, child_name, layer)
            layer.add(name, weights)
        choice.served.append(name)


def served_adapters(module: nn.Module) -> tuple[str, ...]:
    """The names of the adapters attached to span `module`."""
    choice = getattr(module, "adapter_choice", None)
    return tuple(choice.served) if choice is not None else ()


def check_adapter(module: nn.Module, name: str | None) -> None:
    """AdapterError unless `name` is None or an adapter served on span `module`."""
    if name is not None and name not in served_adapters(module):
        served = ", ".join(served_adapters(module)) or "none"
        raise AdapterError(f"adapter {name!r} is not served here (served adapters: {served})")


@contextmanager
def active_adapter(module: nn.Module, name: str | None) -> Iterator[None]:
    """Run span `module` with adapter `name` (None: the base model) inside the block, in this thread only; the
    previous choice comes back on exit, exception or not. An adapter that is not served here is an AdapterError."""
    check_adapter(module, name)
    choice: AdapterChoice | None = getattr(module, "adapter_choice", None)
    token = _ACTIVE.set(None if choice is None or name is None else (choice, name))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
