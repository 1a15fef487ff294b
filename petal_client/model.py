"""DistributedModelForCausalLM: the client's embeddings and LM head around blocks that run elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import EllipsisType

import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig

from petal_client.generation import Conversation, generate
from petal_client.local import LocalBlocks
from petald.models.checkpoints import checkpoint_dir, swarm_model_name
from petald.models.loading import load_client_parts


class DistributedModelForCausalLM(nn.Module):
    """A causal LM whose transformer blocks are `blocks` (remote servers or local spans).

    The client holds only the embeddings, the final norm and the LM head (`parts`)."""

    def __init__(self, parts: nn.Module, config: PretrainedConfig, tokenizer, blocks, model_name: str):
        super().__init__()
        self.parts = parts
        self.config = config
        self.tokenizer = tokenizer
        self.blocks = blocks
        self.model_name = model_name
        self._conversation: Conversation | None = None

    @classmethod
    def from_pretrained(
        cls, model: str, initial_peers: list[str], *, swarm_name: str | None = None, server_push: bool = True
    ) -> DistributedModelForCausalLM:
        """Load the client's parts of `model` locally and reach its blocks through the swarm.

        `model` is a built-in name, a local checkpoint directory or a hub id; the swarm knows it as
        `swarm_name` (default: the built-in or hub name, or a directory's last part). With `server_push`,
        each server sends its output straight to the next one (the client still gets every output, for
        failover); without, the client visits each server in turn."""
        from petal_client.sequential import RemoteSequential
        from petal_client.swarm import Swarm

        model_dir = checkpoint_dir(model)
        parts, config = load_client_parts(model_dir)
        name = swarm_name or swarm_model_name(model)
        blocks = RemoteSequential(Swarm(initial_peers), name, 0, config.num_hidden_layers, server_push)
        return cls(parts, config, _tokenizer(model_dir), blocks, name)

    @classmethod
    def from_local_spans(
        cls, model: str, bounds: list[tuple[int, int]], quant: str = "none"
    ) -> DistributedModelForCausalLM:
        """The split engine in one process: blocks cut into `bounds` spans, run locally."""
        model_dir = checkpoint_dir(model)
        parts, config = load_client_parts(model_dir)
        return cls(parts, config, _tokenizer(model_dir), LocalBlocks.load(model_dir, bounds, quant), model)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[Conversation]:
        """Reserve caches for `max_length` tokens; `generate` calls inside continue one conversation."""
        if self._conversation is not None:
            raise RuntimeError("an inference session is already open on this model")
        conversation = Conversation(self.blocks.inference_session(batch_size, max_length))
        self._conversation = conversation
        try:
            yield conversation
        finally:
            self._conversation = None
            conversation.close()

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        streamer=None,
        eos_token_id: int | list[int] | None | EllipsisType = ...,
    ) -> torch.Tensor:
        """Generate like transformers: returns the prompt followed by the new tokens, [B, T + new].

        Stops at the model's end-of-sequence token unless `eos_token_id` names others (None: never)."""
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=self.config.eos_token_id if eos_token_id is ... else eos_token_id,
            pad_token_id=self.config.pad_token_id,
            streamer=streamer,
        )
        if self._conversation is not None:
            return generate(self.parts, self._conversation, input_ids, attention_mask, **kwargs)
        with self.inference_session(input_ids.shape[1] + max_new_tokens, input_ids.shape[0]) as conversation:
            return generate(self.parts, conversation, input_ids, attention_mask, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position of `input_ids` (no cache)."""
        hidden = self.blocks.forward(self.parts.embed(input_ids), attention_mask)
        return self.parts.logits(hidden)


def _tokenizer(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    return tokenizer
