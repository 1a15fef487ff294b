"""RemoteSequential: the model's transformer blocks, served by the swarm, as one sliceable nn.Module."""

from __future__ import annotations

import torch
from torch import nn

from petal_client.session import RemoteInferenceSession
from petal_client.swarm import Swarm


class RemoteSequential(nn.Module):
    """Blocks [start, end) of `model` on the swarm. `blocks[a:b]` is a RemoteSequential too.

    Calling it runs hidden states [B, T, H] through its blocks (no cache); `inference_session` keeps
    per-server caches for step-by-step generation."""

    def __init__(self, swarm: Swarm, model: str, start: int, end: int, push: bool = True):
        super().__init__()
        self.swarm, self.model, self.start, self.end = swarm, model, start, end
        self.push = push  # server-to-server push (False: the client visits each server in turn)

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(index, None)
        first, last, stride = index.indices(len(self))
        if stride != 1 or first >= last:
            raise IndexError(f"remote blocks take contiguous, non-empty slices; got {index}")
        return RemoteSequential(self.swarm, self.model, self.start + first, self.start + last, self.push)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def extra_repr(self) -> str:
        return f"model={self.model!r}, blocks={self.start}:{self.end}"

    def inference_session(self, batch_size: int, max_length: int) -> RemoteInferenceSession:
        return RemoteInferenceSession(self.swarm, self.model, self.start, self.end, batch_size, max_length, self.push)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        session = self.inference_session(hidden.shape[0], hidden.shape[1])
        try:
            return session.step(hidden, attention_mask)
        finally:
            session.close()
