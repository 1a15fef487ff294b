"""BLOOM family: a span of BloomBlocks (ALiBi rebuilt per span from the mask) and the client's parts."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from petald.models.prompts import add_prompt
from petald.serving.kv import StepCache

MODEL_TYPES = ("bloom",)


def block_prefix(index: int) -> str:
    """The checkpoint name prefix of block `index`."""
    return f"transformer.h.{index}."


class BloomSpan(nn.Module):
    """BloomBlocks [start, end), renumbered locally from 0."""

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.config.n_layer = end - start
        self.h = nn.ModuleList(BloomBlock(self.config, i) for i in range(end - start))

    @staticmethod
    def local_name(name: str, start: int) -> str:
        """Map a checkpoint tensor name of this span to its name in this module."""
        index, rest = name.removeprefix("transformer.h.").split(".", 1)
        return f"h.{int(index) - start}.{rest}"

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
        A StepCache (the rows of several sessions) brings its own mask: `attention_mask` is ignored."""
        if isinstance(cache, StepCache):
            alibi = build_alibi_tensor(cache.key_mask, self.config.n_head, dtype=hidden.dtype)
            mask = cache.attention_bias(hidden.dtype)
        else:
            first = range(len(self.h))[layers][0]
            alibi = build_alibi_tensor(attention_mask, self.config.n_head, dtype=hidden.dtype)
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                past_key_values=cache,
                layer_idx=first,
            )
        for index, block in enumerate(self.h[layers]):
            hidden = add_prompt(hidden, prompts, index)
            hidden = block(hidden, alibi, mask, layer_past=cache, use_cache=cache is not None)[0]
        return hidden


class BloomClientParts(nn.Module):
    """What a client holds: word embeddings with their LayerNorm, the final LayerNorm and the LM head."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    checkpoint_names = {
        "word_embeddings.weight": "transformer.word_embeddings.weight",
        "word_embeddings_layernorm.weight": "transformer.word_embeddings_layernorm.weight",
        "word_embeddings_layernorm.bias": "transformer.word_embeddings_layernorm.bias",
        "ln_f.weight": "transformer.ln_f.weight",
        "ln_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    }
    tied = {"lm_head.weight": "word_embeddings.weight"}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))
