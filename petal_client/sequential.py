"""RemoteSequential: the model's transformer blocks, served by the swarm, as one sliceable nn.Module."""

from __future__ import annotations

import torch
from torch import nn

from petal_client.autograd import RemoteBlocksFunction, RemoteCalls
from petal_client.session import RemoteInferenceSession
from petal_client.swarm import Swarm


class RemoteSequential(nn.Module):
    """Blocks [start, end) of `model` on the swarm. `blocks[a:b]` is a RemoteSequential too.

    Calling it runs hidden states [B, T, H] through its blocks with stateless forward requests, and autograd
    works through it (backward requests); `inference_session` keeps per-server caches for step-by-step
    generation. With `adapter`, only servers serving that LoRA adapter are used, and they apply it."""

    def __init__(
        self,
        swarm: Swarm,
        model: str,
        num_blocks: int,
        start: int | None = None,
        end: int | None = None,
        push: bool = True,
        adapter: str | None = None,
    ):
        """Blocks [start, end) (default: all) of `model`, which has `num_blocks` blocks."""
        super().__init__()
        start, end = 0 if start is None else start, num_blocks if end is None else end
        if not 0 <= start < end <= num_blocks:
            raise IndexError(f"blocks {start}:{end} are not inside {model}'s {num_blocks} blocks")
        self.swarm, self.model, self.num_blocks, self.start, self.end = swarm, model, num_blocks, start, end
        self.push = push  # server-to-server push (False: the client visits each server in turn)
        self.adapter = adapter
        self.calls = RemoteCalls(swarm, model, num_blocks, start, end, adapter)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(index, None)
        first, last, stride = index.indices(len(self))
        if stride != 1 or first >= last:
            raise IndexError(f"remote blocks take contiguous, non-empty slices; got {index}")
        return RemoteSequential(
            self.swarm, self.model, self.num_blocks, self.start + first, self.start + last, self.push, self.adapter
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def extra_repr(self) -> str:
        adapter = f", adapter={self.adapter!r}" if self.adapter else ""
        return f"model={self.model!r}, blocks={self.start}:{self.end}{adapter}"

    def inference_session(self, batch_size: int, max_length: int) -> RemoteInferenceSession:
        return RemoteInferenceSession(
            self.swarm,
            self.model,
            self.num_blocks,
            self.start,
            self.end,
            batch_size,
            max_length,
            self.push,
            self.adapter,
        )

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`hidden` [B, T, H] through the blocks; `prompts` [blocks, B or 1, P, H] are deep prompts added to the
        first P positions before each block. Differentiable w.r.t. `hidden` and `prompts`."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if prompts is not None and prompts.shape[0] != len(self):
            raise ValueError(f"prompts are for {prompts.shape[0]} blocks, these are {len(self)}")
        return RemoteBlocksFunction.apply(hidden.float(), prompts, attention_mask.long(), self.calls)
