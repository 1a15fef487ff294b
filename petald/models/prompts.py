"""Deep prompt tuning: trainable per-block prompts added to the hidden states of the first positions."""

from __future__ import annotations

import torch


def add_prompt(hidden: torch.Tensor, prompts: torch.Tensor | None, index: int) -> torch.Tensor:
    """`hidden` with the deep prompt of local layer `index` added to its first positions (autograd-friendly)."""
    if prompts is None:
        return hidden
    prompt = prompts[index].to(hidden.dtype)
    length = prompt.shape[1]
    return torch.cat([hidden[:, :length] + prompt, hidden[:, length:]], dim=1)
