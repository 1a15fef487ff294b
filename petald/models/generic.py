"""Modern decoder-only families (Llama, Mistral, Mixtral, Qwen2/3 and their MoE, Gemma 2/3, Phi-3, Falcon) run
by transformers' own classes: a span of decoder layers and the client's parts.

Nothing of a family's code is copied here. Its parts are found in transformers' model for the config, built
without decoder layers and without weights (its "skeleton"): the decoder layer class (`_no_split_modules`), the
base model's rotary embedding, final norm and token embeddings, the LM head, and transformers' own conversion of
checkpoint names (e.g. Mixtral's per-expert weights fused as its model holds them). A span instantiates only its
own decoder layers (numbered as in the model, so that per-layer choices such as Qwen-MoE's sparse layers or
Gemma's layer types are the model's, then renumbered from 0 for the cache), runs the family's rotary embedding
(one per layer type where the family has several, as Gemma 3's local and global rope) and transformers' mask
builders (a sliding-window mask for "sliding_attention" layers), and keeps a per-session cache."""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from petald.errors import UnsupportedModelError
from petald.models.prompts import add_prompt
from petald.serving.kv import StepCache

FULL, SLIDING = "full_attention", "sliding_attention"


def skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """transformers' causal LM for `config` without any decoder layer: parameters on the meta device (no memory),
    non-persistent buffers (Gemma's embedding scale, rotary frequencies) real, on the CPU, initialised by the
    model's own `_init_weights` as transformers' loading initialises them."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = 0
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = []
    with torch.device("meta"):  # a thread-local mode: other threads building modules meanwhile are not affected
        model = AutoModelForCausalLM.from_config(config)
    owners = {}
    for key, buffer in model.named_non_persistent_buffers():
        owner_name, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[name] = torch.empty_like(buffer, device="cpu")
        owners[id(owner)] = owner
    with torch.no_grad(), torch.device("cpu"):  # the device context overrides an enclosing meta one
        for owner in owners.values():
            model._init_weights(owner)
    return model


@dataclass(frozen=True)
class Anatomy:
    """Where transformers keeps the parts of one architecture, and the classes of those a span builds itself."""

    layer_class: type[nn.Module]
    rotary_class: type[nn.Module]
    layers_path: str  # the ModuleList of decoder layers, e.g. "model.layers"
    embed_path: str  # e.g. "model.embed_tokens"
    norm_path: str  # the final norm, e.g. "model.norm"
    head_path: str  # e.g. "lm_head"


def anatomy(model: PreTrainedModel) -> Anatomy:
    """The parts of skeleton `model` (see `skeleton`)."""
    names = {id(module): name for name, module in model.named_modules()}
    base = model.base_model
    layers = [child for child in base.children() if isinstance(child, nn.ModuleList)]
    rotary = getattr(base, "rotary_emb", None)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    others = [c for c in base.children() if c is not embed and c is not rotary and not isinstance(c, nn.ModuleList)]
    norms = [child for child in others if next(child.parameters(), None) is not None]
    module = sys.modules[type(model).__module__]
    layer_classes = [getattr(module, name) for name in model._no_split_modules or () if hasattr(module, name)]
    if len(layers) != 1 or rotary is None or len(norms) != 1 or len(layer_classes) != 1 or head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a plain decoder-only model with rotary embeddings (one stack of decoder "
            f"layers, a rotary embedding, a final norm and an LM head): Petal's generic span cannot run it"
        )
    return Anatomy(
        layer_classes[0], type(rotary), names[id(layers[0])], names[id(embed)], names[id(norms[0])], names[id(head)]
    )


def layer_types(config: PretrainedConfig) -> list[str]:
    """The attention type of every layer, as the family's model chooses its masks: `config.layer_types` where the
    family has them (Gemma, Qwen2/3), else sliding-window layers throughout if the config sets a window (Mistral,
    Mixtral, Phi-3, Qwen3-MoE)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = [SLIDING if sliding else FULL] * config.num_hidden_layers
    return list(types)


def check_config(config: PretrainedConfig) -> None:
    """UnsupportedModelError for options of a family that the generic span does not run."""
    if unknown := sorted(set(layer_types(config)) - {FULL, SLIDING}):
        raise UnsupportedModelError(
            f"{config.model_type} layers of type {', '.join(unknown)} are not supported by Petal (only full and "
            f"sliding-window attention)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{config.model_type} with use_bidirectional_attention is not supported by Petal")


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of `config` describing only blocks [start, end), renumbered from 0 (their cache and masks)."""
    config = copy.deepcopy(config)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[start:end])
    config.num_hidden_layers = end - start
    return config


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every token given the padding mask of the whole sequence so far (as transformers does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def convert_checkpoint(config: PretrainedConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the names, and in the layout, of transformers' model: its own conversion rules
    applied as its loading applies them (e.g. Mixtral's and Qwen-MoE's per-expert weights, saved one tensor per
    expert, stacked into the fused expert tensors). A checkpoint that needs no conversion comes back unchanged."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(skeleton(config))
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    converted: dict[str, torch.Tensor] = {}
    pending: dict[str, WeightConverter] = {}  # target name -> the conversion collecting its sources
    for name in sorted(tensors, key=dot_natural_key):  # expert 2 before expert 10, as transformers orders them
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            converted[target] = tensors[name]
            continue
        conversion = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        conversion.add_tensor(target, name, pattern, lambda tensor=tensors[name]: tensor)
    for target, conversion in pending.items():
        for name, value in conversion.convert(target, config=config).items():
            converted[name] = value[0] if isinstance(value, list) else value
    return converted


class GenericSpan(nn.Module):
    """Decoder layers [start, end) of a modern decoder-only model, built from transformers' own classes; layers
    are renumbered locally from 0."""

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__()
        check_config(config)
        model = skeleton(config)
        parts = anatomy(model)
        config = copy.deepcopy(config)  # with the attention and MoE experts implementations transformers chose
        config._attn_implementation = model.config._attn_implementation
        config._experts_implementation = model.config._experts_implementation
        self.layers_prefix = parts.layers_path + "."
        self.config = span_config(config, start, end)
        self.layer_types = tuple(layer_types(config)[start:end])
        # numbered as in the whole model: a layer's own choices (sparse or dense MLP, attention type) are the model's
        self.layers = nn.ModuleList(parts.layer_class(config, start + n) for n in range(end - start))
        for n, layer in enumerate(self.layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = n  # the span's cache holds its own layers only
        with torch.device("cpu"):  # buffers computed at init, not loaded: never built on meta
            self.rotary_emb = parts.rotary_class(config=self.config)
        self._rope_per_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters

    def local_name(self, name: str, start: int) -> str:
        """Map a checkpoint tensor name of this span (as transformers' model names it) to its name here."""
        index, rest = name.removeprefix(self.layers_prefix).split(".", 1)
        return f"layers.{int(index) - start}.{rest}"

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache | StepCache | None = None,
        layers: slice = slice(None),
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `layers` of the span on `hidden` [B, T, H]; `attention_mask` [B, past + T] covers cached tokens too.

        `prompts` [layers, B or 1, P, H] (deep prompt tuning) is added to the first P positions before each layer.
        Each attention type gets its mask, sized by the cache of the first layer of that type that runs. A StepCache
        (the rows of several sessions) brings its own masks and positions: `attention_mask` is ignored."""
        indices = range(len(self.layers))[layers]
        types = {self.layer_types[i] for i in indices}
        if isinstance(cache, StepCache):
            position_ids = cache.position_ids()
            masks = {
                kind: cache.attention_bias(hidden.dtype, self.config.sliding_window if kind == SLIDING else None)
                for kind in types
            }
        else:
            position_ids = positions_from_mask(attention_mask)[:, -hidden.shape[1] :]
            masks = {}
            for kind in types:
                build = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
                masks[kind] = build(
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask,
                    past_key_values=cache,
                    position_ids=position_ids,
                    layer_idx=next(i for i in indices if self.layer_types[i] == kind),
                )
        if self._rope_per_type:
            rotary = {kind: self.rotary_emb(hidden, position_ids, kind) for kind in types}
        else:
            shared = self.rotary_emb(hidden, position_ids=position_ids)
            rotary = dict.fromkeys(types, shared)
        for n, index in enumerate(indices):
            hidden = add_prompt(hidden, prompts, n)
            kind = self.layer_types[index]
            hidden = self.run_layer(self.layers[index], hidden, masks[kind], position_ids, cache, rotary[kind])
        return hidden

    def run_layer(self, layer, hidden, mask, position_ids, cache, position_embeddings) -> torch.Tensor:
        """One decoder layer, called as the family's model calls it."""
        output = layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            position_embeddings=position_embeddings,
        )
        return output[0] if isinstance(output, tuple) else output


class GenericClientParts(nn.Module):
    """What a client holds: the family's own token embeddings (Gemma's scaled one), final norm and LM head (tied
    to the embeddings or not), taken from transformers' model; Gemma 2's final logit soft-capping."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        check_config(config)
        self.config = config
        model = skeleton(config)
        parts = anatomy(model)
        self.embed_tokens = model.get_submodule(parts.embed_path)
        self.norm = model.get_submodule(parts.norm_path)
        self.lm_head = model.get_submodule(parts.head_path)
        if self.lm_head.weight is self.embed_tokens.weight:  # tied in the skeleton: loading ties them again
            self.lm_head.weight = nn.Parameter(torch.empty_like(self.lm_head.weight, device="meta"))
        # local name -> checkpoint name
        self.checkpoint_names = {
            f"{local}.{name}": f"{path}.{name}"
            for local, path in (
                ("embed_tokens", parts.embed_path),
                ("norm", parts.norm_path),
                ("lm_head", parts.head_path),
            )
            for name, _ in getattr(self, local).named_parameters()
        }
        self.tied = {"lm_head.weight": "embed_tokens.weight"}
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        if self.softcap is not None:  # as Gemma2ForCausalLM caps its logits
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def check_falcon(config: PretrainedConfig) -> None:
    if getattr(config, "alibi", False):
        raise UnsupportedModelError(
            "Falcon with alibi=True (the falcon-rw models) is not supported by Petal: only rotary Falcon models "
            "(falcon-7b/40b/180b, Falcon 2 and 3 style configs with alibi=false) run"
        )
    check_config(config)


class FalconSpan(GenericSpan):
    """Falcon's decoder layers [start, end) (rotary position embeddings): the generic span, with Falcon's layer
    call (its cache is `layer_past`, it takes an ALiBi tensor, None here, and returns a tuple)."""

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        check_falcon(config)
        super().__init__(config, start, end)

    def run_layer(self, layer, hidden, mask, position_ids, cache, position_embeddings) -> torch.Tensor:
        return layer(
            hidden,
            None,
            mask,
            position_ids=position_ids,
            layer_past=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )[0]


class FalconClientParts(GenericClientParts):
    def __init__(self, config: PretrainedConfig):
        check_falcon(config)
        super().__init__(config)
