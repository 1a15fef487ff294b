"""A chain of spans run in this process: the split engine without a network (tests, demo, baselines)."""

from __future__ import annotations

from pathlib import Path

import torch

from petald.serving.span import Span, SpanSession


class LocalSession:
    """One inference session across local spans; the BlockSession protocol of petal_client.generation."""

    def __init__(self, spans: list[Span], batch_size: int, max_length: int):
        self.max_length = max_length
        self._steps: list[tuple[Span, SpanSession]] = [(s, s.new_session(batch_size, max_length)) for s in spans]

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        """New tokens through every span; with `position`, after the first `position` tokens only (a rewind)."""
        first = self._steps[0][0].start if self._steps else 0
        for span, session in self._steps:
            span_prompts = None if prompts is None else prompts[span.start - first : span.end - first]
            hidden = span.step(session, hidden, attention_mask, span_prompts, position)
        return hidden

    def close(self) -> None:
        self._steps = []


class LocalBlocks:
    """Blocks of a model split into spans, all held in this process."""

    def __init__(self, spans: list[Span]):
        self.spans = spans

    @classmethod
    def load(cls, model_dir: Path, bounds: list[tuple[int, int]], quant: str = "none") -> LocalBlocks:
        return cls([Span.load(model_dir, start, end, quant) for start, end in bounds])

    def inference_session(self, batch_size: int, max_length: int) -> LocalSession:
        return LocalSession(self.spans, batch_size, max_length)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every span on `hidden`, no cache; `prompts` [blocks, B or 1, P, H] are deep prompts (autograd works)."""
        first = self.spans[0].start
        for span in self.spans:
            span_prompts = None if prompts is None else prompts[span.start - first : span.end - first]
            hidden = span.forward(hidden, attention_mask, prompts=span_prompts)
        return hidden
