"""Token generation over any chain of blocks that keeps per-session caches (local spans or remote servers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from petald.errors import PetalError


class BlockSession(Protocol):
    """Runs hidden states through every block of the model, extending each block's cache (with `position`: after
    the first `position` cached tokens, the rest dropped first)."""

    max_length: int

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        position: int | None = None,
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


class GenerationError(PetalError, ValueError):
    """Generation was asked for something it cannot do."""


@dataclass
class Conversation:
    """One inference session as the client sees it: the blocks' session and every token so far.

    Tokens in `token_ids[:, fed:]` were produced (or given) but have not yet been run through the blocks."""

    blocks: BlockSession
    token_ids: torch.Tensor | None = None  # [batch, tokens]
    attention_mask: torch.Tensor | None = None  # [batch, tokens]
    fed: int = 0
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.blocks.close()

    def add_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Append new tokens; a prompt that repeats the conversation so far adds only its new suffix."""
        if self.token_ids is None:
            self.token_ids, self.attention_mask = input_ids, attention_mask
            return
        if input_ids.shape[0] != self.token_ids.shape[0]:
            raise GenerationError(
                f"this session holds a batch of {self.token_ids.shape[0]}, got input_ids for {input_ids.shape[0]}"
            )
        seen = self.token_ids.shape[1]
        if input_ids.shape[1] >= seen and torch.equal(input_ids[:, :seen], self.token_ids):
            input_ids, attention_mask = input_ids[:, seen:], attention_mask[:, seen:]
        self.token_ids = torch.cat([self.token_ids, input_ids], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, attention_mask], dim=1)


def sampling_processors(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


@torch.inference_mode()
def generate(
    parts: nn.Module,
    conversation: Conversation,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend the conversation by up to `max_new_tokens` tokens per row; return every token of it.

    `parts` is the client's embeddings / final norm / LM head; `input_ids` [B, T] are left-padded
    where `attention_mask` says so. Greedy unless `do_sample`. `streamer` follows transformers'
    streamer protocol (put the prompt, then each new token; end). `generator` draws the samples (default:
    torch's global one), so concurrent generations can each be reproducible."""
    if input_ids.ndim != 2:
        raise GenerationError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise GenerationError("max_new_tokens must be >= 0")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    conversation.add_tokens(input_ids, attention_mask.long())
    total = conversation.token_ids.shape[1] + max_new_tokens
    if total > conversation.blocks.max_length:
        raise GenerationError(
            f"the conversation would reach {total} tokens, over this session's max_length "
            f"{conversation.blocks.max_length}: open the session with a larger max_length"
        )
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    processors = sampling_processors(temperature, top_k, top_p) if do_sample else None
    batch = conversation.token_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool)
    if streamer is not None:
        streamer.put(input_ids)
    for _ in range(max_new_tokens):
        new_ids = conversation.token_ids[:, conversation.fed :]
        new_mask = conversation.attention_mask[:, conversation.fed :]
        hidden = conversation.blocks.step(parts.embed(new_ids), new_mask)
        conversation.fed = conversation.token_ids.shape[1]
        logits = parts.logits(hidden[:, -1]).float()
        if do_sample:
            scores = processors(conversation.token_ids, logits)
            next_ids = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(dim=-1)
        if pad_token_id is not None:
            next_ids = torch.where(finished, torch.tensor(pad_token_id), next_ids)
        conversation.token_ids = torch.cat([conversation.token_ids, next_ids[:, None]], dim=1)
        conversation.attention_mask = torch.cat(
            [conversation.attention_mask, torch.ones(batch, 1, dtype=torch.long)], dim=1
        )
        if streamer is not None:
            streamer.put(next_ids)
        finished |= torch.isin(next_ids, eos)
        if finished.all():
            break
    if streamer is not None:
        streamer.end()
    return conversation.token_ids
