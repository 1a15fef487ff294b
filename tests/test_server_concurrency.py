"""A server under concurrent and hostile load: adapters chosen per computation, pushes from many sessions over one
link per next server, long training requests that do not starve inference, lifecycle operations."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from petald.config import NodeConfig
from petald.local_swarm import NodeProcess, local_swarm
from petald.p2p.host import connect, full_addrs, open_host
from petald.p2p.wire import (
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    MAX_PUSHES,
    BackwardRequest,
    BackwardResult,
    ForwardRequest,
    ForwardResult,
    InfoRequest,
    NextHop,
    OpenSession,
    ServerInfo,
    SessionOpened,
    Step,
    StepResult,
)
from petald.serving.handlers import MAX_BACKWARD_TOKENS, ServingOptions, SpanServer, pushes_in_frame
from petald.serving.span import Span
from tests.test_adapters import LLAMA_TARGETS, base_model, make_adapter
from tests.test_protocol_abuse import expect_closed, expect_error, hidden_states, open_session, receive, send, step


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    """Return once `predicate()` holds; AssertionError if it does not within `timeout` s."""
    deadline = trio.current_time() + timeout
    while not predicate():
        assert trio.current_time() < deadline, f"not true within {timeout} s: {predicate}"
        await trio.sleep(interval)


@asynccontextmanager
async def serving_in_process(server: SpanServer):
    """`server` on a host of this process, and a client host connected to it: yields (client host, server peer)."""
    async with open_host(create_new_key_pair(), ("127.0.0.1", 0)) as host, trio.open_nursery() as nursery:
        server.attach(host, nursery)
        async with open_host(create_new_key_pair(), ("127.0.0.1", 0)) as client_host:
            yield client_host, await connect(client_host, full_addrs(host)[0])
        await server.stop()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- adapters


def test_two_threads_with_different_adapters_each_get_their_own_output(tiny_llama, tmp_path):
    first, _ = make_adapter(base_model(tiny_llama), tmp_path / "first", seed=1, target_modules=LLAMA_TARGETS)
    second, _ = make_adapter(base_model(tiny_llama), tmp_path / "second", seed=2, target_modules=LLAMA_TARGETS)
    span = Span.load(tiny_llama, 0, 6, adapters={"first": first, "second": second})
    hidden = torch.randn(1, 24, span.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        solo = {name: span.forward(hidden, adapter=name) for name in ("first", "second", None)}
    assert not torch.allclose(solo["first"], solo["second"], atol=1e-3)  # the adapters really differ
    wrong: list[str] = []
    ready = threading.Barrier(3)

    def run(adapter: str | None) -> None:
        ready.wait()
        for _ in range(40):
            with torch.no_grad():
                forward = span.forward(hidden, adapter=adapter)
            step = span.step(span.new_session(1, 24, adapter=adapter), hidden)  # the cached path too
            for got in (forward, step):
                if not torch.allclose(got, solo[adapter], atol=1e-5, rtol=1e-5):
                    wrong.append(f"{adapter}: off by {(got - solo[adapter]).abs().max():.3g}")

    threads = [threading.Thread(target=run, args=(name,)) for name in ("first", "second", None)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert not wrong, wrong[:5]


# ---------------------------------------------------------------- long training requests


def test_chunked_forward_and_backward_equal_the_whole_pass(tiny_model):
    span = Span.load(tiny_model, 0, 4)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 70, span.hidden_size, generator=generator)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 40:43] = 0  # and a hole
    prompts = torch.randn(2, 1, 3, span.hidden_size, generator=generator) * 0.1
    # a loss over real tokens only: padding positions' outputs are unspecified (transformers lets a query that may
    # attend to nothing attend to whatever keys the pass has, which differs chunk by chunk)
    real = mask.bool()
    grad_output = torch.randn(2, 70, span.hidden_size, generator=generator) * real[..., None]
    layers = slice(1, 3)
    with torch.no_grad():
        whole = span.forward(hidden, mask, layers, prompts)
    jobs = list(span.forward_jobs(hidden, mask, layers, prompts, chunk_tokens=32))
    assert len(jobs) == 2 * 5 + 1 and all(job is None for job in jobs[:-1])  # 2 layers x 5 chunks of 16 rows
    torch.testing.assert_close(jobs[-1][real], whole[real], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        unpadded = list(span.forward_jobs(hidden, None, layers, prompts, chunk_tokens=32))
        assert len(unpadded) == 2 + 1  # without padding a layer is one job
        torch.testing.assert_close(unpadded[-1], span.forward(hidden, None, layers, prompts), rtol=1e-4, atol=1e-4)

    inputs = [hidden.clone().requires_grad_(True), prompts.clone().requires_grad_(True)]
    expected = torch.autograd.grad(span.forward(inputs[0], mask, layers, inputs[1]), inputs, grad_output)
    got = list(span.backward_jobs(hidden, grad_output, mask, layers, prompts, chunk_tokens=32))[-1]
    torch.testing.assert_close(got[0][real], expected[0][real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak) of process `pid`, in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def test_a_long_padded_forward_lets_inference_steps_through_and_stays_in_bounded_memory(tiny_llama, tmp_path):
    with local_swarm(tmp_path, {"PETAL_HOME": str(tmp_path / "home")}) as swarm:
        node = start_server(swarm, tiny_llama, "0:6")
        tokens = 8192  # ~3 s on the tiny model: ~50 jobs of 1024 tokens through one layer
        hidden = hidden_states(tokens, seed=3)
        mask = torch.ones(1, tokens, dtype=torch.long)
        mask[0, 0] = 0  # one padding position: the case that took a dense tokens x tokens mask

        async def main() -> tuple[float, list[float]]:
            async with open_host(create_new_key_pair(), ("127.0.0.1", 0)) as host:
                peer = await connect(host, node.addr)
                session = await open_session(host, peer, "tiny-llama", max_length=256)
                await step(session, 1, hidden_states(4, seed=1))
                latencies: list[float] = []
                forward_done = trio.Event()

                async def forward() -> float:
                    started = trio.current_time()
                    with trio.fail_after(120):
                        stream = await host.new_stream(peer, ["/petal/forward/1.0.0"])
                        await send(stream, ForwardRequest("tiny-llama", 0, 6, hidden, mask))
                        reply = await receive(stream, timeout=120)
                    assert isinstance(reply, ForwardResult) and reply.hidden.shape == hidden.shape, reply
                    forward_done.set()
                    return trio.current_time() - started

                async def steps() -> None:
                    await trio.sleep(0.3)  # the forward is under way
                    step_id = 1
                    while not forward_done.is_set():
                        step_id += 2
                        started = trio.current_time()
                        await step(session, step_id, hidden_states(1, seed=step_id))
                        latencies.append(trio.current_time() - started)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(steps)
                    took = await forward()
                return took, latencies

        rss_before = memory_kb(node.pid, "VmRSS")
        took, latencies = trio.run(main)
        growth_mb = (memory_kb(node.pid, "VmHWM") - rss_before) / 1024
        assert len(latencies) >= 5, (took, latencies)  # steps kept flowing while the forward ran
        assert max(latencies) < min(1.0, took / 3), (took, latencies)
        assert growth_mb < 250, growth_mb  # one pass took +366 MB for its dense mask and attention


# ---------------------------------------------------------------- pushes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(swarm, model_dir, blocks: str, *options: str) -> NodeProcess:
    node = swarm.start(
        "start",
        *("--model", str(model_dir), "--blocks", blocks, "--port", "0", "--new-swarm", "--throughput", "100"),
        *("--log-level", "debug", *options),
    )
    node.wait_serving()
    return node


class PushedRoute:
    """One client session over blocks 0:3 on server A and 3:6 on server B, every step pushed from A to B; checked
    step by step against a local run of the six blocks."""

    def __init__(self, name: str, host, a: NodeProcess, b: NodeProcess, reference: Span, batch: int, max_length: int):
        self.name, self.host, self.a, self.b, self.batch, self.max_length = name, host, a, b, batch, max_length
        self.reference, self.local = reference, reference.new_session(batch, max_length)
        self.step_id = -1

    async def open(self) -> None:
        self.streams = []
        for node, (start, end) in ((self.a, (0, 3)), (self.b, (3, 6))):
            with trio.fail_after(10):
                stream = await self.host.new_stream(ID.from_base58(node.peer_id), [INFERENCE_PROTOCOL])
            await send(stream, OpenSession("tiny-llama", start, end, self.batch, self.max_length, self.name))
            assert isinstance(await receive(stream), SessionOpened)
            self.streams.append(stream)

    async def step(self, hidden: torch.Tensor) -> None:
        """A pushed step: A answers pushed=True, B answers the output of all six blocks."""
        self.step_id += 2
        hop = NextHop(self.b.peer_id, [self.b.addr], self.name, 3)
        await send(self.streams[0], Step(self.step_id, hidden, push_to=[hop]))
        from_a, from_b = await receive(self.streams[0]), await receive(self.streams[1], timeout=30)
        assert isinstance(from_a, StepResult) and from_a.pushed, f"{self.name} step {self.step_id}: {from_a!r}"
        assert isinstance(from_b, StepResult) and from_b.step == self.step_id, f"{self.name}: {from_b!r}"
        expected = await trio.to_thread.run_sync(self.reference.step, self.local, hidden)
        torch.testing.assert_close(from_b.hidden, expected, rtol=1e-4, atol=1e-4)


def test_concurrent_pushes_share_one_stream_and_every_step_arrives_whole(tiny_llama, tmp_path):
    reference = Span.load(tiny_llama, 0, 6)
    env = {"PETAL_HOME": str(tmp_path / "home")}
    with local_swarm(tmp_path, env) as swarm:
        a = start_server(swarm, tiny_llama, "0:3")
        b_options = ("--identity", str(tmp_path / "b.key"), "--port", str(free_port()))  # B restarts as itself
        b = start_server(swarm, tiny_llama, "3:6", *b_options)

        async def main() -> None:
            async with open_host(create_new_key_pair(), ("127.0.0.1", 0)) as host:
                for node in (a, b):
                    await connect(host, node.addr)
                prefills = [PushedRoute(f"prefill{i}", host, a, b, reference, 1, 1024) for i in range(4)]
                wide = [PushedRoute(f"wide{i}", host, a, b, reference, 2, 640) for i in range(2)]
                decode = [PushedRoute(f"decode{i}", host, a, b, reference, 1, 32) for i in range(2)]
                for route in prefills + wide + decode:
                    await route.open()

                async def run(route: PushedRoute, steps: list[int]) -> None:
                    for seed, tokens in enumerate(steps):
                        await route.step(hidden_states(tokens, seed=seed, batch=route.batch))

                with trio.fail_after(120):
                    async with trio.open_nursery() as nursery:
                        for route in prefills:
                            nursery.start_soon(run, route, [1024])
                        for route in wide:
                            nursery.start_soon(run, route, [160] * 4)
                        for route in decode:
                            nursery.start_soon(run, route, [4] + [1] * 20)

                # steps that shared a pass on A share one on B: A pushes a pass's outputs to B in one frame, and B
                # hands them to their sessions at once (one frame per push, B would start on the first alone)
                lockstep = [PushedRoute(f"lockstep{i}", host, a, b, reference, 1, 32) for i in range(6)]
                for route in lockstep:
                    await route.open()
                before = [await server_info(host, node) for node in (a, b)]
                with trio.fail_after(60):
                    for seed in range(8):  # every round: all six sessions step at once
                        async with trio.open_nursery() as nursery:
                            for route in lockstep:
                                nursery.start_soon(route.step, hidden_states(4 if seed == 0 else 1, seed=seed))
                after = [await server_info(host, node) for node in (a, b)]
                passes_a, passes_b = (after[i].passes - before[i].passes for i in (0, 1))
                assert after[0].batched_passes > before[0].batched_passes, (before, after)  # A did batch them
                assert passes_b <= passes_a, (passes_a, passes_b)

                # B restarts: A notices its push stream ended, and opens a fresh one for the next push
                b.kill()
                await wait_until(lambda: "push stream closed by the receiver" in a.output(), timeout=10)
                restarted = start_server(swarm, tiny_llama, "3:6", *b_options)
                await host.disconnect(ID.from_base58(b.peer_id))  # the client's own connection to B died with it
                await connect(host, restarted.addr)
                after = PushedRoute("after-restart", host, a, restarted, reference, 1, 32)
                await after.open()
                with trio.fail_after(30):
                    await run(after, [4, 1, 1])

        trio.run(main)
        for log in (node.output() for node in swarm.nodes):
            assert "ProtocolError" not in log and "cannot take a pushed step" not in log and "dropped" not in log
        assert "push to" not in a.output()  # no push failed, so none fell back to the client
        assert a.output().count("push stream to") == 2  # one stream to B, one to B restarted: none leaked
        assert b.output().count("push stream accepted") == 1


def test_a_push_frame_takes_the_oldest_waiting_pushes_within_its_count_and_bytes():
    assert pushes_in_frame([]) == 0
    assert pushes_in_frame([10, 10, 10], max_pushes=2, max_bytes=100) == 2
    assert pushes_in_frame([60, 30, 20], max_pushes=8, max_bytes=100) == 2
    assert pushes_in_frame([500, 1], max_pushes=8, max_bytes=100) == 1  # the oldest goes, whatever its size
    assert pushes_in_frame([1] * 100) == MAX_PUSHES


async def server_info(host, node: NodeProcess) -> ServerInfo:
    with trio.fail_after(10):
        stream = await host.new_stream(ID.from_base58(node.peer_id), [INFO_PROTOCOL])
    await send(stream, InfoRequest())
    info = await receive(stream)
    await stream.close()
    assert isinstance(info, ServerInfo), info
    return info


def test_a_push_to_an_unreachable_server_falls_back_and_leaves_no_link(tiny_llama):
    server = SpanServer(Span.load(tiny_llama, 0, 3), ServingOptions.from_config(NodeConfig(), "m"))
    nobody = str(ID.from_pubkey(create_new_key_pair().public_key))
    hop = NextHop(nobody, [f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{nobody}"], "s", 3)

    async def main() -> None:
        async with serving_in_process(server) as (client_host, peer):
            stream = await open_session(client_host, peer, "m", end=3, max_length=16)
            await send(stream, Step(1, hidden_states(4, seed=1), push_to=[hop]))
            reply = await receive(stream)
            assert isinstance(reply, StepResult) and not reply.pushed  # the client sends this step on itself
            assert not server.push_links

    trio.run(main)


# ---------------------------------------------------------------- lifecycle


def test_a_drain_that_times_out_closes_open_sessions_with_a_reason_and_frees_their_cache(tiny_llama):
    server = SpanServer(Span.load(tiny_llama, 0, 6), ServingOptions.from_config(NodeConfig(max_cache_tokens=256), "m"))

    async def main() -> None:
        async with serving_in_process(server) as (client_host, peer):
            stream = await open_session(client_host, peer, "m", max_length=16)
            await step(stream, 1, hidden_states(4, seed=1))
            assert server.budget.tokens_left == 256 - 16
            reason = "this server moved to blocks 2:4; the session's cache is gone: open a new session"
            with trio.fail_after(10):
                await server.drain(0.5, "moved", reason)
            assert (await expect_error(stream, "moved")).reason == reason
            await expect_closed(stream)
            assert server.budget.tokens_left == 256 and not server.live
            assert server.state == "OFFLINE" and server.info().state == "OFFLINE"

            server.swap_span(Span.load(tiny_llama, 2, 4))
            server.resume()
            moved = await open_session(client_host, peer, "m", start=2, end=4, max_length=16)
            await step(moved, 1, hidden_states(4, seed=1))
            assert server.info().state == "ONLINE" and (server.info().start, server.info().end) == (2, 4)

    trio.run(main)


def test_a_backward_request_over_its_token_bound_is_too_large(tiny_llama):
    server = SpanServer(Span.load(tiny_llama, 0, 2), ServingOptions.from_config(NodeConfig(), "m"))

    async def main() -> None:
        async with serving_in_process(server) as (client_host, peer):
            for tokens in (MAX_BACKWARD_TOKENS, MAX_BACKWARD_TOKENS + 1):
                hidden = hidden_states(tokens, seed=1)
                stream = await client_host.new_stream(peer, ["/petal/backward/1.0.0"])
                await send(stream, BackwardRequest("m", 0, 2, hidden, grad_output=torch.ones_like(hidden)))
                if tokens == MAX_BACKWARD_TOKENS:
                    assert isinstance(await receive(stream), BackwardResult)
                else:
                    reply = await expect_error(stream, "too_large")
                    assert f"limit of {MAX_BACKWARD_TOKENS} per backward request" in reply.reason

    trio.run(main)
