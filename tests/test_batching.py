"""Batched inference steps: one forward pass over the steps of several sessions, each with its own cache length,
positions, padding and adapter, gives every session exactly what it gets alone; the choice of a batch; the queue
that runs them through one compute lane."""

from __future__ import annotations

import pytest
import torch
import trio

from petald.serving.batching import MAX_BATCHED_STEP_TOKENS, StepQueue, StepShape, choose_batch
from petald.serving.span import SessionStep, Span

PROMPT_LENGTHS = (3, 9, 1, 14, 6, 2, 11, 5)


def prompts(span: Span, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden [1, L, H], padding mask [1, L]) per session: different lengths, some left-padded."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n, length in enumerate(PROMPT_LENGTHS):
        mask = torch.ones(1, length, dtype=torch.long)
        if n % 3 == 1:
            mask[:, : length // 3] = 0  # a left-padded prompt, as a client batching prompts sends them
        out.append((torch.randn(1, length, span.hidden_size, generator=generator), mask))
    return out


def decode_inputs(span: Span, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 1, span.hidden_size, generator=generator) for _ in range(steps)] for _ in PROMPT_LENGTHS]


def test_a_batched_pass_gives_each_session_its_solo_output(tiny_model):
    span = Span.load(tiny_model, 0, 6)
    solo_sessions = [span.new_session(1, 64) for _ in PROMPT_LENGTHS]
    batched_sessions = [span.new_session(1, 64) for _ in PROMPT_LENGTHS]
    for (hidden, mask), solo, batched in zip(prompts(span), solo_sessions, batched_sessions, strict=True):
        span.step(solo, hidden, mask)
        span.step(batched, hidden, mask)
    inputs = decode_inputs(span, 5)
    for n in range(5):
        expected = [span.step(session, inputs[i][n]) for i, session in enumerate(solo_sessions)]
        got = span.step_batch([SessionStep(s, inputs[i][n]) for i, s in enumerate(batched_sessions)])
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert [s.length for s in batched_sessions] == [length + 5 for length in PROMPT_LENGTHS]


def test_batched_steps_of_several_tokens_and_rewinds(tiny_llama):
    """Speculative checks (several new tokens, some sessions rewinding first) share a pass too."""
    span = Span.load(tiny_llama, 0, 6)
    solo = [span.new_session(1, 64) for _ in range(3)]
    batched = [span.new_session(1, 64) for _ in range(3)]
    for n, (hidden, mask) in enumerate(prompts(span)[:3]):
        span.step(solo[n], hidden, mask)
        span.step(batched[n], hidden, mask)
    new = [torch.randn(1, 4, span.hidden_size) for _ in range(3)]
    positions = [None, 1, PROMPT_LENGTHS[2]]
    expected = [span.step(solo[n], new[n], position=positions[n]) for n in range(3)]
    got = span.step_batch([SessionStep(batched[n], new[n], position=positions[n]) for n in range(3)])
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert [s.length for s in batched] == [s.length for s in solo]


def test_sessions_of_other_layers_or_adapters_are_not_batched_together(tiny_llama):
    span = Span.load(tiny_llama, 0, 6)
    whole, part = span.new_session(1, 16), span.new_session(1, 16, start=2, end=4)
    hidden = torch.randn(1, 1, span.hidden_size)
    with pytest.raises(Exception, match="same layers"):
        span.step_batch([SessionStep(whole, hidden), SessionStep(part, hidden)])
    assert whole.length == part.length == 0  # nothing ran


def test_choose_batch_takes_the_oldest_and_what_can_share_its_pass():
    a, b = ("layers", "adapter a"), ("layers", "adapter b")
    queued = [StepShape(a, 1, 1), StepShape(b, 1, 1), StepShape(a, 2, 1), StepShape(a, 1, 1, alone=True)]
    assert choose_batch(queued, max_rows=64, max_tokens=1000) == [0, 2]
    assert choose_batch(queued[1:], max_rows=64, max_tokens=1000) == [0]
    assert choose_batch(queued, max_rows=2, max_tokens=1000) == [0]  # 1 + 2 rows is over the limit
    assert choose_batch(queued, max_rows=64, max_tokens=2) == [0]  # 3 rows x 1 token is over 2 tokens
    assert choose_batch([StepShape(a, 1, 40, alone=True), StepShape(a, 1, 40)], 64, 1000) == [0]
    assert choose_batch([], 64, 1000) == []


def test_the_queue_batches_concurrent_sessions_and_each_gets_its_solo_output(tiny_model):
    span = Span.load(tiny_model, 0, 6)
    steps = 6
    inputs = decode_inputs(span, steps)
    expected = []
    for n, (hidden, mask) in enumerate(prompts(span)):
        session = span.new_session(1, 64)
        span.step(session, hidden, mask)
        expected.append([span.step(session, token) for token in inputs[n]])

    queue = StepQueue(trio.CapacityLimiter(1), max_rows=64, max_tokens=4096)
    got: dict[int, list[torch.Tensor]] = {}
    gone = span.new_session(1, 64)  # a session whose client vanishes while its step waits

    async def client(n: int) -> None:
        hidden, mask = prompts(span)[n]
        session = span.new_session(1, 64)
        await queue.run(span, SessionStep(session, hidden, mask))
        got[n] = [await queue.run(span, SessionStep(session, token)) for token in inputs[n]]

    async def vanishing(nursery: trio.Nursery) -> None:
        """Cancelled while its step waits behind the others': it never runs, and the others are unaffected."""
        with trio.CancelScope() as scope:
            nursery.start_soon(cancel_once_queued, scope)
            await queue.run(span, SessionStep(gone, torch.randn(1, 17, span.hidden_size)))

    async def cancel_once_queued(scope: trio.CancelScope) -> None:
        while not any(queued.step.session is gone for queued in queue._queue):  # it waits for the lane
            await trio.sleep(0.001)
        scope.cancel()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(len(PROMPT_LENGTHS)):
                nursery.start_soon(client, n)
            nursery.start_soon(vanishing, nursery)

    trio.run(main)
    for n in range(len(PROMPT_LENGTHS)):
        for want, have in zip(expected[n], got[n], strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert gone.length == 0 and queue.waiting == 0
    assert queue.stats.batched_passes > 0  # counted passes, not log lines
    assert queue.stats.steps == len(PROMPT_LENGTHS) * (steps + 1)
    assert queue.stats.passes < queue.stats.steps


def test_prefills_and_no_batching_run_alone(tiny_llama):
    span = Span.load(tiny_llama, 0, 6)

    async def run(queue: StepQueue, tokens: int) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                session = span.new_session(1, 64)
                nursery.start_soon(queue.run, span, SessionStep(session, torch.randn(1, tokens, span.hidden_size)))

    prefills = StepQueue(trio.CapacityLimiter(1), 64, 4096)
    trio.run(run, prefills, MAX_BATCHED_STEP_TOKENS + 1)
    unbatched = StepQueue(trio.CapacityLimiter(1), 64, 4096, batching=False)
    trio.run(run, unbatched, 1)
    for queue in (prefills, unbatched):
        assert queue.stats.passes == queue.stats.steps == 4 and queue.stats.batched_passes == 0


def test_a_failing_step_in_a_batch_fails_only_its_own_session(tiny_llama):
    span = Span.load(tiny_llama, 0, 6)
    good = span.new_session(1, 8)
    bad = span.new_session(1, 3)  # too short for the step it will send
    span.step(good, torch.randn(1, 2, span.hidden_size))
    span.step(bad, torch.randn(1, 2, span.hidden_size))
    token = torch.randn(1, 2, span.hidden_size)
    queue = StepQueue(trio.CapacityLimiter(1), 64, 4096)
    results: dict[str, object] = {}

    async def step(name, session) -> None:
        try:
            results[name] = await queue.run(span, SessionStep(session, token))
        except Exception as e:  # noqa: BLE001
            results[name] = e

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, "good", good)
            nursery.start_soon(step, "bad", bad)

    trio.run(main)
    assert isinstance(results["good"], torch.Tensor) and good.length == 4
    assert isinstance(results["bad"], Exception) and "max_length" in str(results["bad"]) and bad.length == 2
