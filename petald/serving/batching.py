"""Batching the inference steps of concurrent sessions: which queued steps share a forward pass, and the queue
that runs them through the server's one compute lane.

A step is queued, then waits for the compute lane. Whoever gets the lane runs the oldest queued step together
with every later one that can share its pass (same layers, adapter and number of new tokens), up to the row and
token limits, and hands each session its own rows; a session whose step went out in someone else's pass finds
its result when it gets the lane. Nothing waits on a timer: a pass takes what is queued when the lane frees, so a
step waits at most for the pass in progress and those of steps queued before it.

Prefills (steps of more than MAX_BATCHED_STEP_TOKENS new tokens) and steps with deep prompts run alone: a long
prefill is compute-bound, batching it saves little, and it would hold every decode step batched with it for its
whole duration."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import trio

from petald.serving.span import SessionStep, Span

log = logging.getLogger(__name__)

MAX_BATCHED_STEP_TOKENS = 32  # new tokens per row of a step that may share a pass (decoding, speculative checks)
ACTIVE_WINDOW = 5.0  # seconds: a session that stepped this recently counts in the server's load


@dataclass(frozen=True)
class StepShape:
    """What the choice of a batch needs to know about a queued step."""

    key: Hashable  # steps with equal keys can share a pass
    rows: int  # its batch size
    tokens: int  # its new tokens per row
    alone: bool = False  # it must run in a pass of its own (a prefill, deep prompts)


def choose_batch(queued: Sequence[StepShape], max_rows: int, max_tokens: int) -> list[int]:
    """The indices of the queued steps (oldest first) to run in the next pass: the oldest, then each later one
    with the same key while the pass stays within `max_rows` rows and `max_tokens` rows x tokens. Empty if
    nothing is queued."""
    if not queued:
        return []
    first = queued[0]
    chosen, rows = [0], first.rows
    if first.alone:
        return chosen
    for index, shape in enumerate(queued[1:], start=1):
        if shape.alone or shape.key != first.key:
            continue
        if rows + shape.rows > max_rows or (rows + shape.rows) * first.tokens > max_tokens:
            break
        chosen.append(index)
        rows += shape.rows
    return chosen


def shape_of(span: Span, step: SessionStep, batching: bool) -> StepShape:
    rows, tokens = step.hidden.shape[:2]
    alone = not batching or step.prompts is not None or tokens > MAX_BATCHED_STEP_TOKENS
    return StepShape((id(span), step.batch_key), rows, tokens, alone)


@dataclass
class QueuedStep:
    span: Span
    step: SessionStep
    shape: StepShape
    taken: bool = False  # a pass took it: it is running or done
    done: trio.Event = field(default_factory=trio.Event)
    output: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    """Counters of the passes run (read by tests, benchmarks and the node's info)."""

    passes: int = 0  # forward passes run for inference steps
    batched_passes: int = 0  # ... of which carried the steps of more than one session
    steps: int = 0  # steps run
    rows: int = 0  # rows run, over all passes

    def record(self, steps: int, rows: int) -> None:
        self.passes += 1
        self.batched_passes += steps > 1
        self.steps += steps
        self.rows += rows


class LaneClock:
    """How busy the compute lane has been: the fraction of the last ACTIVE_WINDOW seconds it ran torch work."""

    def __init__(self) -> None:
        self._jobs: deque[tuple[float, float]] = deque()  # (end, seconds) of recent jobs, oldest first

    def record(self, seconds: float, now: float | None = None) -> None:
        self._jobs.append((time.monotonic() if now is None else now, seconds))

    def busy(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._jobs and self._jobs[0][0] < now - ACTIVE_WINDOW:
            self._jobs.popleft()
        return min(1.0, sum(seconds for _, seconds in self._jobs) / ACTIVE_WINDOW)


class StepQueue:
    """The inference steps waiting for the server's compute lane, run in shared passes.

    Owns the queue and the counters; the compute lane (a CapacityLimiter of 1, shared with the server's other torch
    work) is the one lock: only its holder takes steps out of the queue and touches session caches."""

    def __init__(self, compute: trio.CapacityLimiter, max_rows: int, max_tokens: int, batching: bool = True):
        self.compute = compute
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.batching = batching
        self.stats = BatchStats()
        self.lane = LaneClock()  # the server's other torch work records its time here too
        self._queue: list[QueuedStep] = []
        self._last_steps: dict[int, tuple[float, int]] = {}  # id of a session -> (time of its last step, its rows)

    @property
    def waiting(self) -> int:
        """Steps queued and not yet taken by a pass."""
        return len(self._queue)

    def active_rows(self, now: float | None = None) -> int:
        """Rows of the sessions that stepped in the last ACTIVE_WINDOW seconds: what a new session's steps share
        their passes with (open sessions that are idle cost nothing)."""
        now = time.monotonic() if now is None else now
        self._last_steps = {k: v for k, v in self._last_steps.items() if now - v[0] <= ACTIVE_WINDOW}
        return sum(rows for _, rows in self._last_steps.values())

    async def run(self, span: Span, step: SessionStep) -> torch.Tensor:
        """Run `step` on `span`, in a pass shared with other queued steps where it can; its output [B, T, H].
        Errors of its own step are raised here; a cancelled wait leaves the queue as if it had never come."""
        queued = QueuedStep(span, step, shape_of(span, step, self.batching))
        self._last_steps[id(step.session)] = (time.monotonic(), queued.shape.rows)
        self._queue.append(queued)
        try:
            async with self.compute:
                while not queued.taken:
                    await self._run_next_pass()
        finally:
            if not queued.taken:
                self._queue.remove(queued)
        await queued.done.wait()  # set before the lane is released: only a pass cut short by a crash leaves it unset
        if queued.error is not None:
            raise queued.error
        return queued.output

    async def _run_next_pass(self) -> None:
        """Under the compute lane: take the next batch out of the queue, run it in a worker thread, deliver."""
        indices = choose_batch([q.shape for q in self._queue], self.max_rows, self.max_tokens)
        batch = [self._queue[i] for i in indices]
        for queued in batch:
            queued.taken = True
        self._queue = [q for q in self._queue if not q.taken]
        with trio.CancelScope(shield=True):  # the pass runs to its end, and every session in it hears of it
            started = time.monotonic()
            try:
                await trio.to_thread.run_sync(self._run_pass, batch)
            finally:
                self.lane.record(time.monotonic() - started)
                for queued in batch:
                    queued.done.set()

    def _run_pass(self, batch: list[QueuedStep]) -> None:
        """In a worker thread: one forward pass over the batch; if it fails, each step again alone, so a failure
        reaches only the step that causes it."""
        span = batch[0].span
        try:
            outputs = span.step_batch([q.step for q in batch])
        except Exception as e:
            if len(batch) == 1:
                batch[0].error = e
                self.stats.record(1, batch[0].shape.rows)
                return
            log.warning("a batched pass of %d steps failed (%r): running them one by one", len(batch), e)
            for queued in batch:
                self._run_pass([queued])
            return
        self.stats.record(len(batch), sum(q.shape.rows for q in batch))
        for queued, output in zip(batch, outputs, strict=True):
            queued.output = output
