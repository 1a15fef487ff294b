"""Llama family (SmolLM2, Llama 2/3, Mistral-style): a span of decoder layers and the client's parts."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from petald.models.prompts import add_prompt
from petald.serving.kv import StepCache

MODEL_TYPES = ("llama", "mistral")


def block_prefix(index: int) -> str:
    """The checkpoint name prefix of block `index`."""
    return f"model.layers.{index}."


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of `config` describing only blocks [start, end), renumbered from 0."""
    config = copy.deepcopy(config)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[start:end])
    config.num_hidden_layers = end - start
    return config


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every token given the padding mask of the whole sequence so far (as transformers does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class LlamaSpan(nn.Module):
    """Decoder layers [start, end) of a Llama-family model; layers are renumbered locally from 0."""

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__()
        self.config = span_config(config, start, end)
        self.layers = nn.ModuleList(LlamaDecoderLayer(self.config, i) for i in range(end - start))
        with torch.device("cpu"):  # a buffer computed at init, not loaded: never build it on meta
            self.rotary_emb = LlamaRotaryEmbedding(self.config)

    @staticmethod
    def local_name(name: str, start: int) -> str:
        """Map a checkpoint tensor name of this span to its name in this module."""
        index, rest = name.removeprefix("model.layers.").split(".", 1)
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
        The cache is indexed by local layer number, so a sub-range sizes its mask by its own first layer. A
        StepCache (the rows of several sessions) brings its own mask and positions: `attention_mask` is ignored."""
        if isinstance(cache, StepCache):
            position_ids = cache.position_ids()
            mask = cache.attention_bias(hidden.dtype)
        else:
            length = hidden.shape[1]
            first = range(len(self.layers))[layers][0]
            position_ids = positions_from_mask(attention_mask)[:, -length:]
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=first,
            )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for index, layer in enumerate(self.layers[layers]):
            hidden = add_prompt(hidden, prompts, index)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden


class LlamaClientParts(nn.Module):
    """What a client holds: token embeddings, the final norm and the LM head."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # local name -> checkpoint name
    checkpoint_names = {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    tied = {"lm_head.weight": "embed_tokens.weight"}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))
