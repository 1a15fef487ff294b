"""Batched inference steps: one forward pass over the steps of several sessions, each with its own cache length,
positions, padding and adapter, gives every session exactly what it gets alone; the choice of a batch; the queue
that runs them through one compute lane."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from petal_client import DistributedModelForCausalLM
from petald.local_swarm import local_swarm, wait_until
from petald.p2p.host import connect, open_host
from petald.p2p.wire import BackwardRequest, CloseSession, ForwardRequest, OpenSession, SessionOpened, Step, StepResult
from petald.serving.batching import (
    MAX_BATCHED_STEP_TOKENS,
    LaneClock,
    RequestQueue,
    StepQueue,
    StepShape,
    choose_batch,
)
from petald.serving.handlers import ServingOptions, SpanServer
from petald.serving.span import SessionStep, Span, run_jobs
from tests.test_adapters import LLAMA_TARGETS, base_model, make_adapter, peft_blocks
from tests.test_protocol_abuse import expect_closed, new_stream, receive, send
from tests.test_server_concurrency import serving_in_process

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

    compute = trio.CapacityLimiter(1)
    queue = StepQueue(compute, max_rows=64, max_tokens=4096)
    got: dict[int, list[torch.Tensor]] = {}
    gone = span.new_session(1, 64)  # a session whose client vanishes while its step waits

    async def client(n: int) -> None:
        hidden, mask = prompts(span)[n]
        session = span.new_session(1, 64)
        await queue.run(span, SessionStep(session, hidden, mask))
        got[n] = [await queue.run(span, SessionStep(session, token)) for token in inputs[n]]

    async def vanishing(scope: trio.CancelScope) -> None:
        with scope:
            await queue.run(span, SessionStep(gone, torch.randn(1, 17, span.hidden_size)))

    async def queued(count: int) -> None:
        with trio.fail_after(30):
            while queue.waiting != count:
                await trio.sleep(0.001)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await compute.acquire()  # as if a pass were running: every first step queues behind it
            for n in range(len(PROMPT_LENGTHS)):
                nursery.start_soon(client, n)
            scope = trio.CancelScope()
            nursery.start_soon(vanishing, scope)
            await queued(len(PROMPT_LENGTHS) + 1)
            scope.cancel()  # its client vanishes while its step waits: it never runs, the others are unaffected
            await queued(len(PROMPT_LENGTHS))
            compute.release()

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


# ---------------------------------------------------------------- a server, over libp2p streams


def serving_options(model: str) -> ServingOptions:
    return ServingOptions(
        model=model,
        max_cache_tokens=4096,
        max_batch_size=64,
        max_forward_tokens=4096,
        step_timeout=30,
        session_timeout=120,
    )


def test_eight_sessions_through_one_server_share_passes_and_get_their_solo_hidden_states(tiny_llama):
    """Sessions of different prompt lengths and lengths of generation, opening while others are mid-way, and one
    whose client vanishes mid-generation: every other one gets its solo hidden states, every cache is freed."""
    span = Span.load(tiny_llama, 0, 6)
    server = SpanServer(span, serving_options("tiny"))
    steps = [3 + n % 4 for n in range(len(PROMPT_LENGTHS))]  # sessions end at different times
    inputs = decode_inputs(span, max(steps))
    solo = []
    for n, (hidden, mask) in enumerate(prompts(span)):
        session = span.new_session(1, 64)
        solo.append([span.step(session, hidden, mask), *(span.step(session, t) for t in inputs[n][: steps[n]])])
    got: dict[int, list[torch.Tensor]] = {}
    started = trio.Event()  # the first sessions are mid-generation: the others open now

    async def client(host, peer, n: int) -> None:
        if n >= 4:
            await started.wait()
        stream = await new_stream(host, peer)
        await send(stream, OpenSession("tiny", 0, 6, 1, 64, f"session-{n}"))
        assert isinstance(await receive(stream), SessionOpened)
        hidden, mask = prompts(span)[n]
        outputs = []
        for index, new in enumerate([hidden, *inputs[n][: steps[n]]]):
            await send(stream, Step(index, new, mask if index == 0 else None))
            reply = await receive(stream)
            assert isinstance(reply, StepResult), reply
            outputs.append(reply.hidden)
            if index == 2 and n == 0:
                started.set()
        got[n] = outputs
        await send(stream, CloseSession())
        await expect_closed(stream)

    async def vanishing(host, peer) -> None:
        """Opens, steps along with the others, then its connection's stream is reset mid-generation."""
        await started.wait()
        stream = await new_stream(host, peer)
        await send(stream, OpenSession("tiny", 0, 6, 1, 64, "vanishing"))
        assert isinstance(await receive(stream), SessionOpened)
        await send(stream, Step(0, torch.randn(1, 4, span.hidden_size)))
        assert isinstance(await receive(stream), StepResult)
        await send(stream, Step(1, torch.randn(1, 1, span.hidden_size)))  # its answer is never read
        await stream.reset()

    async def main() -> None:
        async with serving_in_process(server) as (host, peer):
            async with trio.open_nursery() as nursery:
                for n in range(len(PROMPT_LENGTHS)):
                    nursery.start_soon(client, host, peer, n)
                nursery.start_soon(vanishing, host, peer)
            await wait_for(lambda: server.budget.sessions == 0, 10)

    trio.run(main)
    for n in range(len(PROMPT_LENGTHS)):
        for want, have in zip(solo[n], got[n], strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert server.steps.stats.batched_passes > 0 and server.steps.stats.passes < server.steps.stats.steps
    assert server.budget.sessions == 0 and server.budget.tokens_left == 4096  # every cache freed, the vanished's too


async def wait_for(predicate, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def test_two_adapters_and_the_base_model_in_one_batch_window_each_equal_peft(tiny_llama, tmp_path):
    first_dir, first = make_adapter(base_model(tiny_llama), tmp_path / "first", seed=1, target_modules=LLAMA_TARGETS)
    second_dir, second = make_adapter(base_model(tiny_llama), tmp_path / "second", seed=2, target_modules=LLAMA_TARGETS)
    span = Span.load(tiny_llama, 0, 6, adapters={"first": first_dir, "second": second_dir})
    generator = torch.Generator().manual_seed(4)
    sequence = torch.randn(1, 9, span.hidden_size, generator=generator)
    with torch.no_grad():
        expected = {
            None: base_blocks(first, sequence),
            "first": peft_blocks(first, sequence, 0, 6),
            "second": peft_blocks(second, sequence, 0, 6),
        }
    assert not torch.allclose(expected["first"], expected["second"], atol=1e-3)  # the adapters really differ
    queue = StepQueue(trio.CapacityLimiter(1), 64, 4096)
    got: dict[tuple, torch.Tensor] = {}

    async def session(adapter: str | None, copy: int) -> None:
        state = span.new_session(1, 16, adapter=adapter)
        outputs = [await queue.run(span, SessionStep(state, sequence[:, :5]))]
        for position in range(5, 9):  # decode steps: these share passes with the same adapter's
            outputs.append(await queue.run(span, SessionStep(state, sequence[:, position : position + 1])))
        got[adapter, copy] = torch.cat(outputs, dim=1)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for adapter in (None, "first", "second"):
                for copy in range(2):
                    nursery.start_soon(session, adapter, copy)

    trio.run(main)
    for (adapter, _), output in got.items():
        torch.testing.assert_close(output, expected[adapter], rtol=1e-4, atol=1e-4)
    assert queue.stats.batched_passes > 0


def base_blocks(peft_model, hidden: torch.Tensor) -> torch.Tensor:
    """Blocks 0:6 of the base model under `peft_model` (its adapter disabled) on `hidden`."""
    with peft_model.disable_adapter():
        return peft_blocks(peft_model, hidden, 0, 6)


# ---------------------------------------------------------------- load-aware routing, with real processes


class LoadOnServer:
    """`sessions` sessions stepping as fast as they can on one server (from a thread of the test), each step a
    block of new tokens at position 0, so its cache never grows: the server stays busy until stop()."""

    def __init__(self, node, model: str, sessions: int, tokens: int = 32):
        self.node, self.model, self.sessions, self.tokens = node, model, sessions, tokens
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _main(self) -> None:
        async with open_host(create_new_key_pair(), ("127.0.0.1", 0)) as host:
            peer = await connect(host, self.node.addr)
            async with trio.open_nursery() as nursery:
                for n in range(self.sessions):
                    nursery.start_soon(self._session, host, peer, n)

    async def _session(self, host, peer, n: int) -> None:
        stream = await new_stream(host, peer)
        await send(stream, OpenSession(self.model, 0, 6, 1, self.tokens, f"load-{n}"))
        assert isinstance(await receive(stream), SessionOpened)
        hidden = torch.randn(1, self.tokens, 64)
        step = 0
        while not self._stop.is_set():
            await send(stream, Step(step, hidden, position=0))
            assert isinstance(await receive(stream), StepResult)
            step, self.steps = step + 1, self.steps + 1
        await send(stream, CloseSession())


def greedy(model, route, ids: torch.Tensor, new_tokens: int, on_step=None) -> torch.Tensor:
    """Greedy tokens through `route` (a session of model.blocks), calling on_step(n) before step n."""
    hidden = route.step(model.parts.embed(ids))
    tokens = ids
    for n in range(new_tokens):
        token = model.parts.logits(hidden[:, -1:]).argmax(-1)
        tokens = torch.cat([tokens, token], dim=1)
        if n + 1 == new_tokens:
            break
        if on_step is not None:
            on_step(n)
        hidden = route.step(model.parts.embed(token))
    return tokens


def test_a_loaded_server_is_avoided_by_new_sessions_and_left_at_a_step_boundary(tiny_llama, tmp_path):
    ids = torch.tensor([[5, 17, 300, 42, 8, 99, 23]])
    with torch.no_grad():
        want = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)]).generate(
            ids, max_new_tokens=12, eos_token_id=None
        )
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}
    fast = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
    with local_swarm(tmp_path, env) as swarm:
        bootstrap, servers = swarm.start_spans(str(tiny_llama), ("0:6", "0:6"), *fast)
        with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [bootstrap.addr]) as model:
            client = model.blocks.swarm
            client.refresh_period = 1.0
            view = client.run(client.watch, model.model_name, 6)
            wait_until(lambda: all(s.peer_id in view.servers for s in servers), 30, what="both servers seen")
            route = model.blocks.inference_session(1, 64)
            load = None

            def load_its_server(n: int) -> None:
                nonlocal load
                if n != 2:
                    return
                loaded = next(s for s in servers if s.peer_id == route.route[0].hop.peer_id)
                load = LoadOnServer(loaded, model.model_name, sessions=6)
                # the client's pings report the load (the server's lane busy over the last seconds)
                wait_until(lambda: view.servers[loaded.peer_id].busy >= 0.4, 30, what="the load shows in pings")

            try:
                with torch.no_grad():
                    got = greedy(model, route, ids, 12, on_step=load_its_server)
                loaded_id = load.node.peer_id
                idle_id = next(s.peer_id for s in servers if s.peer_id != loaded_id)
                assert route.moves == 1 and route.route[0].hop.peer_id == idle_id  # it moved, once
                assert torch.equal(got, want)  # and its output is unchanged
                fresh = model.blocks.inference_session(1, 64)
                try:
                    fresh.step(model.parts.embed(ids))
                    assert fresh.route[0].hop.peer_id == idle_id  # a new session routes to the idle server
                finally:
                    fresh.close()
            finally:
                route.close()
                if load is not None:
                    load.stop()


# ---------------------------------------------------------------- forward and backward requests


def test_concurrent_forward_and_backward_requests_are_merged_and_each_gets_its_own_answer(tiny_model):
    from petald.serving.handlers import _jobs

    span = Span.load(tiny_model, 0, 6)
    generator = torch.Generator().manual_seed(9)
    lengths = (5, 12, 3, 8)
    forwards = []
    backwards = []
    for n, length in enumerate(lengths):
        hidden = torch.randn(1 + n % 2, length, span.hidden_size, generator=generator)
        mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if n == 1:
            mask[:, :2] = 0  # a left-padded request stays exact when merged with others
        forwards.append(ForwardRequest("tiny", 0, 6, hidden, mask))
        grad = torch.randn(hidden.shape, generator=generator)
        backwards.append(BackwardRequest("tiny", 2, 5, hidden, mask, grad_output=grad))
    want_forward = [run_jobs(_jobs(span, r, slice(0, 6))) for r in forwards]
    want_backward = [run_jobs(_jobs(span, r, slice(2, 5)))[0] for r in backwards]

    compute = trio.CapacityLimiter(1)
    queue = RequestQueue(compute, LaneClock(), max_forward_tokens=4096, max_backward_tokens=4096)
    got: dict[tuple[str, int], torch.Tensor] = {}

    async def forward(n: int) -> None:
        got["forward", n] = await queue.run(span, forwards[n], slice(0, 6), _jobs)

    async def backward(n: int) -> None:
        got["backward", n] = (await queue.run(span, backwards[n], slice(2, 5), _jobs))[0]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await compute.acquire()  # as if a job were running: the requests queue up together
            for n in range(len(lengths)):
                nursery.start_soon(forward, n)
                nursery.start_soon(backward, n)
            with trio.fail_after(30):
                while queue.waiting != 2 * len(lengths):
                    await trio.sleep(0.001)
            compute.release()

    trio.run(main)
    for n in range(len(lengths)):
        torch.testing.assert_close(got["forward", n], want_forward[n], rtol=1e-4, atol=1e-4)
        # gradients pass through a recomputation with a dense mask when merged: float noise grows a little
        torch.testing.assert_close(got["backward", n], want_backward[n], rtol=1e-3, atol=1e-3)
    assert queue.stats.passes == 2 and queue.stats.batched_passes == 2  # one merged forward, one merged backward
