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

import dataclasses
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
    """The indices of the queued items (oldest first) to run in the next pass: the oldest, then each later one
    with the same key while the pass stays within `max_rows` rows and `max_tokens` rows x tokens (rows shorter
    than the longest are padded to it). Empty if nothing is queued."""
    if not queued:
        return []
    first = queued[0]
    chosen, rows, tokens = [0], first.rows, first.tokens
    if first.alone:
        return chosen
    for index, shape in enumerate(queued[1:], start=1):
        if shape.alone or shape.key != first.key:
            continue
        if rows + shape.rows > max_rows or (rows + shape.rows) * max(tokens, shape.tokens) > max_tokens:
            break
        chosen.append(index)
        rows, tokens = rows + shape.rows, max(tokens, shape.tokens)
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
    # its wait for the lane, cancelled by the pass that ran it: every session of a pass goes on at once (waiting for
    # the lane in turn, they would leave one per hand-off, and push to the next server one by one)
    wait: trio.CancelScope = field(default_factory=trio.CancelScope)


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
            with queued.wait:
                async with self.compute:
                    while not queued.taken:
                        await self._run_next_pass()
        finally:
            if not queued.taken:
                self._queue.remove(queued)
        await queued.done.wait()  # set when its pass ends: only a pass cut short by a crash leaves it unset
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
                    queued.wait.cancel()

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


# ---------------------------------------------------------------- forward and backward requests (training)


def merge_sequences(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> tuple:
    """Sequences [B_i, L_i, ...] of several requests as one batch, right-padded to the longest, and its padding
    mask [sum B_i, L] (0 on the padding): positions come from the mask, so padding on the right moves no token."""
    length = max(t.shape[1] for t in tensors)
    padded, padded_masks = [], []
    for tensor, mask in zip(tensors, masks, strict=True):
        extra = length - tensor.shape[1]
        pad = (0, 0) * (tensor.ndim - 2) + (0, extra)
        padded.append(torch.nn.functional.pad(tensor.float(), pad))
        mask = torch.ones(tensor.shape[:2], dtype=torch.long) if mask is None else mask.long()
        padded_masks.append(torch.nn.functional.pad(mask, (0, extra)))
    return torch.cat(padded), torch.cat(padded_masks)


def split_rows(batch: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Each request's own rows and tokens of a merged batch (inverse of merge_sequences)."""
    out, begin = [], 0
    for shape in shapes:
        out.append(batch[begin : begin + shape[0], : shape[1]])
        begin += shape[0]
    return out


@dataclass
class QueuedRequest:
    span: Span
    request: object  # a checked ForwardRequest or BackwardRequest
    layers: slice
    shape: StepShape
    taken: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    result: object = None
    error: BaseException | None = None


class RequestQueue:
    """Forward and backward requests waiting for the compute lane; those of the same blocks and adapter queued
    together run as one request (right-padded), up to the kind's batch x tokens limit. Its jobs (one layer, or one
    chunk of a layer, each) take the lane one at a time, so inference steps run between them."""

    def __init__(
        self,
        compute: trio.CapacityLimiter,
        lane: LaneClock,
        max_forward_tokens: int,
        max_backward_tokens: int,
        batching: bool = True,
    ):
        self.compute, self.lane, self.batching = compute, lane, batching
        self.max_tokens = {False: max_forward_tokens, True: max_backward_tokens}  # by kind: backward or not
        self.stats = BatchStats()
        self._queue: list[QueuedRequest] = []

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken."""
        return len(self._queue)

    async def run(self, span: Span, request, layers: slice, jobs_of) -> object:
        """The last result of `jobs_of(span, merged request, layers)` for this request's rows (jobs_of: the
        Span.forward_jobs / backward_jobs call for a request, as handlers._jobs)."""
        backward = hasattr(request, "grad_output")
        key = (id(span), backward, layers.start, layers.stop, request.adapter)
        alone = not self.batching or request.prompts is not None
        rows, tokens = request.hidden.shape[:2]
        queued = QueuedRequest(span, request, layers, StepShape(key, rows, tokens, alone))
        self._queue.append(queued)
        try:
            while not queued.taken:  # the next merged request is the oldest's, which may not be this one's
                async with self.compute:
                    taken = None if queued.taken else self._take()
                if taken is not None:
                    with trio.CancelScope(shield=True):  # others' results ride on this run: it goes to its end
                        await self._run(taken, jobs_of)
        finally:
            if not queued.taken:
                self._queue.remove(queued)
        await queued.done.wait()
        if queued.error is not None:
            raise queued.error
        return queued.result

    def _take(self) -> list[QueuedRequest]:
        backward = self._queue[0].shape.key[1]
        shapes = [q.shape for q in self._queue]
        indices = choose_batch(shapes, max_rows=1 << 30, max_tokens=self.max_tokens[backward])
        batch = [self._queue[i] for i in indices]
        for queued in batch:
            queued.taken = True
        self._queue = [q for q in self._queue if not q.taken]
        return batch

    async def _run(self, batch: list[QueuedRequest], jobs_of) -> None:
        try:
            request = batch[0].request if len(batch) == 1 else _merged(batch)
            jobs, result = jobs_of(batch[0].span, request, batch[0].layers), None
            while result is None:
                async with self.compute:
                    started = time.monotonic()
                    result = await trio.to_thread.run_sync(next, jobs)
                    self.lane.record(time.monotonic() - started)
            self.stats.record(len(batch), sum(q.shape.rows for q in batch))
            shapes = [q.request.hidden.shape for q in batch]
            if len(batch) == 1:
                batch[0].result = result
            elif isinstance(result, tuple):  # backward: (grad hidden, grad prompts = None)
                for queued, grad in zip(batch, split_rows(result[0], shapes), strict=True):
                    queued.result = (grad, None)
            else:
                for queued, output in zip(batch, split_rows(result, shapes), strict=True):
                    queued.result = output
        except Exception as e:
            if len(batch) == 1:
                batch[0].error = e
            else:  # each alone: a failure reaches only the request that causes it
                log.warning("a merged request of %d failed (%r): running them one by one", len(batch), e)
                for queued in batch:
                    await self._run([queued], jobs_of)
        finally:
            for queued in batch:
                queued.done.set()


def _merged(batch: list[QueuedRequest]):
    """One request carrying the rows of every request of `batch` (same blocks, adapter and kind, no prompts)."""
    first = batch[0].request
    requests = [q.request for q in batch]
    hidden, mask = merge_sequences([r.hidden for r in requests], [r.attention_mask for r in requests])
    fields = {"hidden": hidden, "attention_mask": mask}
    if hasattr(first, "grad_output"):
        fields["grad_output"], _ = merge_sequences([r.grad_output for r in requests], [None] * len(requests))
    return dataclasses.replace(first, **fields)
