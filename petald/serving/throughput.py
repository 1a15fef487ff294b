"""How fast this server runs its span: measured at start, announced so clients can route."""

from __future__ import annotations

import time

import torch

from petald.serving.span import Span


def measure_inference_throughput(span: Span, steps: int = 8, prefix: int = 16) -> float:
    """Blocks x steps per second of single-token decoding through `span` (k blocks take k / result s)."""
    session = span.new_session(1, prefix + steps + 1)
    span.step(session, torch.randn(1, prefix, span.hidden_size))
    token = torch.randn(1, 1, span.hidden_size)
    span.step(session, token)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        span.step(session, token)
    step_seconds = (time.perf_counter() - started) / steps
    return span.num_blocks / step_seconds
