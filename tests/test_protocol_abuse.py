"""A real petald node under abuse: garbage, oversized frames, invalid messages, vanished and idle clients.

Every case checks the node's answer (an error frame with its code, or a closed stream), then that the node is
still up, that a normal session still works, and that no cache was leaked."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import msgpack
import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.io.exceptions import IOException
from libp2p.peer.id import ID

from petald.local_swarm import NodeProcess, local_swarm
from petald.p2p.dht import (
    MAX_ENTRIES_PER_VALUE,
    ServerEntry,
    ServerState,
    SwarmDHT,
    block_key,
    decode_block_value,
    open_swarm_dht,
    sign_entry,
)
from petald.p2p.host import connect, open_host, peer_id_of
from petald.p2p.wire import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
    BackwardRequest,
    BackwardResult,
    CloseSession,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    InfoRequest,
    Limits,
    Message,
    OpenSession,
    ServerInfo,
    SessionOpened,
    Step,
    StepResult,
    pack_tensor,
    read_message,
    write_message,
)

BLOCKS = 6
HIDDEN = 64
CACHE_TOKENS = 256
STEP_TIMEOUT = 3.0
WAIT = 10.0  # bound on any one await of the client
FREED_WITHIN = 5.0  # how long a vanished client's cache may stay reserved


@pytest.fixture(scope="module")
def node(tiny_llama, tmp_path_factory):
    """One petald serving all 6 blocks of the tiny Llama with a 256-token cache budget."""
    home = tmp_path_factory.mktemp("petal-home")
    with local_swarm(tmp_path_factory.mktemp("abuse-logs"), {"PETAL_HOME": str(home)}) as swarm:
        node = swarm.start(
            "start",
            *("--model", str(tiny_llama), "--blocks", f"0:{BLOCKS}", "--port", "0", "--new-swarm"),
            *("--throughput", "100", "--max-cache-tokens", str(CACHE_TOKENS), "--step-timeout", str(STEP_TIMEOUT)),
        )
        node.wait_serving()
        yield node


@pytest.fixture(scope="module")
def model_name(tiny_llama) -> str:
    return tiny_llama.name  # a local directory is announced by its last path part


# ---------------------------------------------------------------- client side


@asynccontextmanager
async def client(node: NodeProcess):
    """A fresh client host connected to `node`; yields (host, peer id)."""
    async with open_host(create_new_key_pair(), ("127.0.0.1", 0)) as host:
        peer = await connect(host, node.addr, timeout=WAIT)
        yield host, peer


async def new_stream(host, peer, protocol: str = INFERENCE_PROTOCOL):
    with trio.fail_after(WAIT):
        return await host.new_stream(peer, [protocol])


def frame(payload) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def send(stream, message: Message | bytes) -> None:
    with trio.fail_after(WAIT):
        if isinstance(message, bytes):
            await stream.write(message)
        else:
            await write_message(stream, message)


async def receive(stream, timeout: float = WAIT) -> Message | None:
    """The server's next message, or None if it closed (or reset) the stream."""
    with trio.fail_after(timeout):
        try:
            return await read_message(stream, Limits())
        except (EOFError, IOException):
            return None


async def expect_error(stream, code: str, timeout: float = WAIT) -> ErrorReply:
    reply = await receive(stream, timeout)
    assert isinstance(reply, ErrorReply), f"expected error {code!r}, got {reply!r}"
    assert reply.code == code, reply
    return reply


async def expect_closed(stream, timeout: float = WAIT) -> None:
    assert await receive(stream, timeout) is None


async def expect_error_or_closed(stream, codes: set[str] | None = None, timeout: float = WAIT) -> None:
    """The server answers with an error frame (one of `codes`, if given) and/or closes the stream."""
    reply = await receive(stream, timeout)
    if reply is not None:
        assert isinstance(reply, ErrorReply), reply
        assert codes is None or reply.code in codes, reply
        await expect_closed(stream, timeout)


async def open_session(host, peer, model: str, *, start=0, end=BLOCKS, batch=1, max_length=32, stream=None):
    """An open inference stream; fails unless the server answers SessionOpened."""
    stream = stream or await new_stream(host, peer)
    await send(stream, OpenSession(model, start, end, batch, max_length, "abuse-test"))
    reply = await receive(stream)
    assert isinstance(reply, SessionOpened), reply
    return stream


async def step(stream, step_id: int, hidden: torch.Tensor) -> torch.Tensor:
    await send(stream, Step(step_id, hidden))
    reply = await receive(stream)
    assert isinstance(reply, StepResult), reply
    assert reply.step == step_id and reply.hidden.shape == hidden.shape
    return reply.hidden


async def close_session(stream) -> None:
    """CloseSession, then wait for the server to close the stream: by then it has freed the cache."""
    await send(stream, CloseSession())
    await expect_closed(stream)


async def info(host, peer) -> ServerInfo:
    stream = await new_stream(host, peer, INFO_PROTOCOL)
    await send(stream, InfoRequest())
    reply = await receive(stream)
    assert isinstance(reply, ServerInfo), reply
    with trio.fail_after(WAIT):
        await stream.close()
    return reply


def hidden_states(tokens: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def tensor(dtype: str, shape: list[int], data: bytes | None = None) -> dict:
    itemsize = {"float32": 4, "float16": 2, "int8": 1, "float64": 8, "int32": 4, "int64": 8}[dtype]
    size = itemsize * (shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1))
    return {"dtype": dtype, "shape": shape, "data": bytes(size) if data is None else data}


def raw_step(step_id: int, hidden: dict, mask: dict | None = None) -> bytes:
    return frame({"type": "step", "step": step_id, "hidden": hidden, "attention_mask": mask})


async def normal_session(host, peer, model: str) -> None:
    stream = await open_session(host, peer, model, max_length=16)
    for step_id, tokens in enumerate((5, 1)):
        output = await step(stream, step_id, hidden_states(tokens, seed=step_id))
        assert output.dtype == torch.float32 and torch.isfinite(output).all()
    await close_session(stream)


async def wait_cache_tokens_left(host, peer, tokens: int) -> None:
    deadline = trio.current_time() + FREED_WITHIN
    while (left := (await info(host, peer)).cache_tokens_left) != tokens:
        assert trio.current_time() < deadline, f"{left} cache tokens left, expected {tokens}"
        await trio.sleep(0.1)


def run_case(node: NodeProcess, model: str, case: Callable[..., Awaitable[None]]) -> None:
    """Run `case(host, peer)` from a fresh client, then check the node survived it intact."""

    async def main() -> None:
        async with client(node) as (host, peer):
            await case(host, peer)
        assert node.process.poll() is None, node.output()
        async with client(node) as (host, peer):
            await normal_session(host, peer, model)
            await wait_cache_tokens_left(host, peer, CACHE_TOKENS)  # no session's cache leaked

    trio.run(main)
    assert node.process.poll() is None, node.output()


# ---------------------------------------------------------------- cases


def test_info_reports_span_model_and_free_cache(node, model_name):
    async def case(host, peer):
        answer = await info(host, peer)
        assert (answer.model, answer.start, answer.end, answer.state) == (model_name, 0, BLOCKS, "ONLINE")
        assert answer.cache_tokens_left == CACHE_TOKENS
        stream = await open_session(host, peer, model_name, batch=2, max_length=50)
        assert (await info(host, peer)).cache_tokens_left == CACHE_TOKENS - 100
        await close_session(stream)
        assert (await info(host, peer)).cache_tokens_left == CACHE_TOKENS
        # an info stream takes nothing but InfoRequests
        stream = await new_stream(host, peer, INFO_PROTOCOL)
        await send(stream, frame({"type": "open"}))
        await expect_error_or_closed(stream, {"unexpected"})

    run_case(node, model_name, case)


def test_garbage_bytes_close_the_stream(node, model_name):
    async def case(host, peer):
        for seed in range(3):
            stream = await new_stream(host, peer)
            await send(stream, random.Random(seed).randbytes(4096))
            # a random header may promise a body that never comes: the step timeout ends that stream
            await expect_error_or_closed(stream, timeout=STEP_TIMEOUT + WAIT)

    run_case(node, model_name, case)


def test_frame_header_of_two_gib_is_refused_unread(node, model_name):
    async def case(host, peer):
        stream = await new_stream(host, peer)
        await send(stream, struct.pack(">I", 2**31) + b"x" * 100)
        await expect_error_or_closed(stream, {"too_large"})
        # the same inside an open session: the stream cannot go on, the session ends
        stream = await open_session(host, peer, model_name)
        await send(stream, struct.pack(">I", 2**31 - 1))
        await expect_error(stream, "too_large")
        await expect_closed(stream)

    run_case(node, model_name, case)


def test_frames_that_are_not_messages_get_bad_frame_or_bad_request(node, model_name):
    async def case(host, peer):
        bad_open = frame({"type": "open", "model": model_name, "start": "0"})
        cases = [
            (struct.pack(">I", 1) + b"\xc1", "bad_frame"),  # 0xc1 is never valid msgpack
            (frame([1, 2, 3]), "bad_frame"),
            (frame("open"), "bad_frame"),
            (frame({1: "integer keys"}), "bad_frame"),
            (frame({"no": "type"}), "bad_request"),
            (frame({"type": "hello"}), "bad_request"),
            (frame({"type": 7}), "bad_request"),
        ]
        for data, code in [*cases, (bad_open, "bad_request")]:
            stream = await new_stream(host, peer)
            await send(stream, data)
            await expect_error(stream, code)
            await expect_closed(stream)
        # inside a session, a bad frame is answered and the session goes on
        stream = await open_session(host, peer, model_name)
        for data, code in [*cases, (bad_open, "unexpected")]:  # a known type out of turn is unexpected
            await send(stream, data)
            await expect_error(stream, code)
        await step(stream, 0, hidden_states(3, seed=1))
        await close_session(stream)

    run_case(node, model_name, case)


def test_open_for_another_model_or_span_is_refused(node, model_name):
    async def case(host, peer):
        for model, start, end, code in [
            ("not-" + model_name, 0, BLOCKS, "wrong_model"),
            (model_name, 0, BLOCKS + 1, "wrong_span"),
            (model_name, 3, 3, "wrong_span"),
            (model_name, 4, 2, "wrong_span"),
        ]:
            stream = await new_stream(host, peer)
            await send(stream, OpenSession(model, start, end, 1, 8, "abuse-test"))
            await expect_error(stream, code)
            await expect_closed(stream)
        stream = await open_session(host, peer, model_name, start=2, end=4)  # a part of the span is fine
        await step(stream, 0, hidden_states(2, seed=2))
        await close_session(stream)

    run_case(node, model_name, case)


def test_invalid_steps_are_refused_and_the_session_goes_on(node, model_name):
    async def case(host, peer):
        nan = torch.zeros(1, 2, HIDDEN)
        nan[0, 1, 5] = float("nan")
        ones = torch.ones(1, 2, dtype=torch.long)

        def invalid(i: int) -> list[tuple[bytes, str]]:
            """Step `i` made invalid in every way a validation error keeps the session."""
            return [
                (raw_step(i, tensor("int8", [1, 2, HIDDEN])), "bad_dtype"),
                (raw_step(i, tensor("float64", [1, 2, HIDDEN])), "bad_dtype"),
                (raw_step(i, tensor("int32", [1, 2, HIDDEN])), "bad_shape"),
                (raw_step(i, tensor("float32", [1, 2, HIDDEN - 1])), "bad_shape"),
                (raw_step(i, tensor("float32", [2, 2, HIDDEN])), "bad_shape"),
                (raw_step(i, tensor("float32", [1, 0, HIDDEN])), "bad_shape"),
                (raw_step(i, tensor("float32", [2, HIDDEN])), "bad_shape"),
                (raw_step(i, tensor("float32", [1, 2, HIDDEN], data=bytes(4 * 2 * HIDDEN - 4))), "bad_shape"),
                (raw_step(i, tensor("float32", [1, 2, HIDDEN], data=bytes(4 * 2 * HIDDEN + 4))), "bad_shape"),
                (raw_step(i, {"dtype": "float32", "shape": [1, 2, HIDDEN]}), "bad_request"),
                (raw_step(i, tensor("float32", [1, 2, HIDDEN]), tensor("int64", [1, 3])), "bad_shape"),
                (raw_step(i, tensor("float32", [1, 2, HIDDEN]), tensor("float32", [1, 2])), "bad_shape"),
                (raw_step(i, tensor("float32", [1, 2, HIDDEN]), pack_tensor(ones * 2)), "bad_shape"),
                (raw_step(i, tensor("float32", [1, 2, HIDDEN]), pack_tensor(-ones)), "bad_shape"),
                (raw_step(i, pack_tensor(nan)), "bad_value"),
                (raw_step(i, pack_tensor(torch.full((1, 2, HIDDEN), float("inf")))), "bad_value"),
                (raw_step(i, pack_tensor(torch.zeros(1, 33, HIDDEN))), "too_long"),  # max_length is 32
                (raw_step(-1, pack_tensor(torch.zeros(1, 2, HIDDEN))), "bad_request"),
            ]

        stream = await open_session(host, peer, model_name, max_length=32)
        for data, code in invalid(0):
            await send(stream, data)
            await expect_error(stream, code)
        output = await step(stream, 0, hidden_states(2, seed=3))
        assert torch.isfinite(output).all()
        for data, code in invalid(1):  # the same after a successful step
            await send(stream, data)
            await expect_error(stream, code)
        await step(stream, 1, hidden_states(1, seed=4))
        await close_session(stream)

    run_case(node, model_name, case)


def test_repeated_step_id_is_bad_step(node, model_name):
    async def case(host, peer):
        stream = await open_session(host, peer, model_name)
        await step(stream, 0, hidden_states(2, seed=5))
        await send(stream, Step(0, hidden_states(1, seed=6)))
        await expect_error(stream, "bad_step")
        await step(stream, 5, hidden_states(1, seed=6))  # ids may skip, never go back
        await send(stream, Step(4, hidden_states(1, seed=7)))
        await expect_error(stream, "bad_step")
        await step(stream, 6, hidden_states(1, seed=7))
        await close_session(stream)

    run_case(node, model_name, case)


def test_a_rewind_drops_the_tail_of_the_cache_and_a_rewind_past_it_is_bad_position(node, model_name):
    async def case(host, peer):
        prefix, wrong, right = hidden_states(4, seed=21), hidden_states(3, seed=22), hidden_states(2, seed=23)
        stream = await open_session(host, peer, model_name)
        await step(stream, 1, prefix)
        await step(stream, 2, wrong)  # 7 tokens cached; the last 3 are about to be dropped
        await send(stream, Step(3, right, position=4))
        reply = await receive(stream)
        assert isinstance(reply, StepResult), reply
        await send(stream, Step(4, hidden_states(1, seed=24), position=9))  # past the 6 tokens it now holds
        await expect_error(stream, "bad_position")
        await send(stream, Step(5, hidden_states(30, seed=25), position=6))  # 6 + 30 > max_length 32
        await expect_error(stream, "too_long")
        # the session went on as if the wrong tokens had never been sent: same output as a fresh session
        fresh = await open_session(host, peer, model_name)
        await step(fresh, 1, prefix)
        torch.testing.assert_close(await step(fresh, 2, right), reply.hidden, rtol=0, atol=1e-5)
        await close_session(fresh)
        await close_session(stream)

    run_case(node, model_name, case)


def test_step_before_open_is_unexpected(node, model_name):
    async def case(host, peer):
        for message in (Step(0, hidden_states(2, seed=8)), CloseSession(), InfoRequest()):
            stream = await new_stream(host, peer)
            await send(stream, message)
            await expect_error(stream, "unexpected")
            await expect_closed(stream)

    run_case(node, model_name, case)


def test_error_frames_from_a_peer_are_unexpected_on_every_protocol(node, model_name):
    error = frame({"type": "error", "code": "bad_request", "reason": "a peer speaking as a server"})

    async def case(host, peer):
        for protocol in (INFERENCE_PROTOCOL, INFO_PROTOCOL, FORWARD_PROTOCOL, BACKWARD_PROTOCOL):
            stream = await new_stream(host, peer, protocol)
            await send(stream, error)
            reply = await expect_error(stream, "unexpected")
            assert "got 'error'" in reply.reason, (protocol, reply)
            await expect_closed(stream)
        # inside a session (a later frame): answered, and the session goes on
        stream = await open_session(host, peer, model_name)
        await step(stream, 1, hidden_states(2, seed=30))
        await send(stream, error)
        await expect_error(stream, "unexpected")
        await step(stream, 3, hidden_states(1, seed=31))
        await close_session(stream)
        # a receiver never writes on a push stream: a bad frame there ends the stream
        stream = await new_stream(host, peer, PUSH_PROTOCOL)
        await send(stream, error)
        await expect_closed(stream)

    run_case(node, model_name, case)


def test_cache_request_over_budget_is_cache_full_and_says_what_is_left(node, model_name):
    async def case(host, peer):
        stream = await new_stream(host, peer)
        await send(stream, OpenSession(model_name, 0, BLOCKS, 1, 10_000, "abuse-test"))
        reply = await expect_error(stream, "cache_full")
        assert f"room for {CACHE_TOKENS} more tokens" in reply.reason, reply.reason
        await expect_closed(stream)

        held = await open_session(host, peer, model_name, batch=2, max_length=100)
        stream = await new_stream(host, peer)
        await send(stream, OpenSession(model_name, 0, BLOCKS, 1, 100, "abuse-test"))
        reply = await expect_error(stream, "cache_full")
        assert f"room for {CACHE_TOKENS - 200} more tokens" in reply.reason, reply.reason
        await close_session(held)
        await close_session(await open_session(host, peer, model_name, max_length=100))  # fits again

    run_case(node, model_name, case)


@pytest.mark.parametrize("how", ["reset", "close_without_goodbye", "host_gone"])
def test_vanished_client_frees_its_cache(node, model_name, how):
    async def case(host, peer):
        async with client(node) as (doomed, doomed_peer):
            stream = await open_session(doomed, doomed_peer, model_name, max_length=200)
            await step(stream, 0, hidden_states(4, seed=9))
            refused = await new_stream(host, peer)
            await send(refused, OpenSession(model_name, 0, BLOCKS, 1, 200, "abuse-test"))
            await expect_error(refused, "cache_full")  # the doomed session really holds its 200 tokens
            with trio.fail_after(WAIT):
                if how == "reset":
                    await stream.reset()
                elif how == "close_without_goodbye":
                    await stream.close()
        # ("host_gone": the whole client host stops with the session open)
        deadline = trio.current_time() + FREED_WITHIN
        while True:
            stream = await new_stream(host, peer)
            await send(stream, OpenSession(model_name, 0, BLOCKS, 1, 200, "abuse-test"))
            reply = await receive(stream)
            if isinstance(reply, SessionOpened):
                break
            assert isinstance(reply, ErrorReply) and reply.code == "cache_full", reply
            assert trio.current_time() < deadline, f"the vanished session's cache was not freed: {reply.reason}"
            await trio.sleep(0.2)
        await step(stream, 0, hidden_states(3, seed=10))
        await close_session(stream)

    run_case(node, model_name, case)


def test_quiet_session_times_out_and_frees_its_cache(node, model_name):
    async def case(host, peer):
        started = time.monotonic()
        stream = await open_session(host, peer, model_name, max_length=200)
        await step(stream, 0, hidden_states(2, seed=11))
        await expect_error(stream, "timeout", timeout=STEP_TIMEOUT + WAIT)
        assert time.monotonic() - started >= STEP_TIMEOUT * 0.9
        await expect_closed(stream)
        assert (await info(host, peer)).cache_tokens_left == CACHE_TOKENS
        # and a session that never sends its open at all
        stream = await new_stream(host, peer)
        await expect_error(stream, "timeout", timeout=STEP_TIMEOUT + WAIT)
        await expect_closed(stream)

    run_case(node, model_name, case)


def test_abuse_on_other_streams_leaves_a_session_untouched(node, model_name):
    inputs = [hidden_states(tokens, seed=20 + i) for i, tokens in enumerate((6, 1, 1, 3))]

    async def abuse(host, peer, done: trio.Event) -> None:
        while not done.is_set():
            garbage = await new_stream(host, peer)
            await send(garbage, b"\x00\x00\x00\x08" + random.Random(1).randbytes(8))
            await expect_error_or_closed(garbage)
            huge = await new_stream(host, peer)
            await send(huge, struct.pack(">I", 2**31))
            await expect_error_or_closed(huge, {"too_large"})
            bad = await open_session(host, peer, model_name)
            await send(bad, raw_step(0, tensor("float32", [1, 2, HIDDEN - 1])))
            await expect_error(bad, "bad_shape")
            with trio.fail_after(WAIT):
                await bad.reset()

    async def case(host, peer):
        victim = await open_session(host, peer, model_name, max_length=32)
        victim_outputs = [await step(victim, 0, inputs[0])]
        done = trio.Event()
        async with client(node) as (abuser, abuser_peer), trio.open_nursery() as nursery:
            nursery.start_soon(abuse, abuser, abuser_peer, done)
            for step_id, hidden in enumerate(inputs[1:], start=1):
                await trio.sleep(0.05)
                victim_outputs.append(await step(victim, step_id, hidden))
            done.set()
        await close_session(victim)

        reference = await open_session(host, peer, model_name, max_length=32)
        for step_id, (hidden, output) in enumerate(zip(inputs, victim_outputs, strict=True)):
            torch.testing.assert_close(output, await step(reference, step_id, hidden))
        await close_session(reference)

    run_case(node, model_name, case)


# ---------------------------------------------------------------- forward and backward (training) requests


def backward_request(served_model: str, **changes) -> BackwardRequest:
    """A valid backward request for blocks 1:4, batch 2 x 5 tokens with a 2-token deep prompt; `changes` spoil it."""
    fields = dict(
        model=served_model,
        start=1,
        end=4,
        hidden=hidden_states(5, seed=1, batch=2),
        attention_mask=torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]),
        prompts=torch.randn(3, 1, 2, HIDDEN) * 0.1,
        grad_output=hidden_states(5, seed=2, batch=2),
    )
    return BackwardRequest(**{**fields, **changes})


async def backward(host, peer, message: Message | bytes):
    stream = await new_stream(host, peer, BACKWARD_PROTOCOL)
    await send(stream, message)
    return stream


def test_a_valid_backward_request_gets_gradients(node, model_name):
    async def case(host, peer):
        request = backward_request(model_name)
        stream = await backward(host, peer, request)
        reply = await receive(stream)
        assert isinstance(reply, BackwardResult), reply
        assert reply.grad_hidden.shape == request.hidden.shape and reply.grad_prompts.shape == request.prompts.shape
        assert torch.isfinite(reply.grad_hidden).all() and reply.grad_hidden.abs().sum() > 0
        await expect_closed(stream)

    run_case(node, model_name, case)


@pytest.mark.parametrize(
    "changes, code, reason",
    [
        ({"grad_output": hidden_states(4, seed=2, batch=2)}, "bad_shape", "grad_output has shape"),
        ({"grad_output": hidden_states(5, seed=2, batch=1)}, "bad_shape", "grad_output has shape"),
        ({"prompts": torch.zeros(2, 1, 2, HIDDEN)}, "bad_shape", "prompts must be"),  # 2 blocks' prompts for 3
        ({"prompts": torch.zeros(3, 1, 9, HIDDEN)}, "bad_shape", "prompts must be"),  # longer than the sequence
        (
            {"hidden": torch.zeros(2, 5, HIDDEN + 1), "grad_output": torch.zeros(2, 5, HIDDEN + 1), "prompts": None},
            "bad_shape",
            "hidden states have size",
        ),
        ({"grad_output": torch.full((2, 5, HIDDEN), float("nan"))}, "bad_value", "grad_output holds NaN"),
        ({"start": 4, "end": 9, "prompts": None}, "wrong_span", "not served here"),
        ({"model": "another-model"}, "wrong_model", "serves"),
        ({"adapter": "no-such-adapter"}, "no_adapter", "no-such-adapter"),
        ({"hidden": torch.zeros(2, 40000, HIDDEN), "grad_output": None}, "too_large", "per request"),
    ],
)
def test_malformed_backward_requests_get_clear_errors(node, model_name, changes, code, reason):
    async def case(host, peer):
        message = backward_request(model_name, **changes)
        if changes.get("grad_output", 0) is None:
            body = message.to_wire()  # grad_output left out: the size check comes first
            stream = await backward(host, peer, frame(body))
        else:
            stream = await backward(host, peer, message)
        reply = await expect_error(stream, code)
        assert reason in reply.reason, reply.reason

    run_case(node, model_name, case)


def test_a_backward_request_without_gradients_and_a_forward_on_the_backward_protocol_are_refused(node, model_name):
    async def case(host, peer):
        body = backward_request(model_name).to_wire()
        del body["grad_output"]
        stream = await backward(host, peer, frame(body))
        await expect_error(stream, "bad_request")
        forward = ForwardRequest(model_name, 0, BLOCKS, hidden_states(3, seed=4))
        stream = await backward(host, peer, forward)
        await expect_error(stream, "unexpected")
        stream = await new_stream(host, peer, FORWARD_PROTOCOL)
        await send(stream, forward)
        reply = await receive(stream)
        assert isinstance(reply, ForwardResult) and reply.hidden.shape == forward.hidden.shape

    run_case(node, model_name, case)


def test_deep_prompts_in_an_inference_session_only_with_its_first_step(node, model_name):
    async def case(host, peer):
        stream = await open_session(host, peer, model_name, max_length=16)
        await send(stream, Step(1, hidden_states(3, seed=1), prompts=torch.zeros(BLOCKS - 1, 1, 2, HIDDEN)))
        assert "blocks" in (await expect_error(stream, "bad_shape")).reason
        await send(stream, Step(1, hidden_states(3, seed=1), prompts=torch.zeros(BLOCKS, 1, 2, HIDDEN) + 0.1))
        first = await receive(stream)
        assert isinstance(first, StepResult), first
        await send(stream, Step(2, hidden_states(1, seed=2), prompts=torch.zeros(BLOCKS, 1, 1, HIDDEN)))
        assert "first step" in (await expect_error(stream, "bad_step")).reason
        await step(stream, 3, hidden_states(1, seed=3))  # the session goes on
        await close_session(stream)

    run_case(node, model_name, case)


# ---------------------------------------------------------------- flooding the DHT

FLOOD_BLOCK = 3  # served by both servers of the flood test


def signed_flood(key: str, count: int, updated_at: float, expires_at: float) -> dict[str, dict]:
    """`count` validly signed entries for `key` from throw-away keys, as a value's map (peer_id -> wire)."""
    flood = {}
    for _ in range(count):
        key_pair = create_new_key_pair()
        entry = ServerEntry(
            peer_id=str(peer_id_of(key_pair)),
            state=ServerState.ONLINE,
            start=0,
            end=BLOCKS,
            throughput=1e6,
            addrs=[],
            cache_tokens_left=1 << 30,
            quant="none",
            version="flood",
            updated_at=updated_at,
            expires_at=expires_at,
        )
        flood[entry.peer_id] = sign_entry(key, entry, key_pair).to_wire()
    return flood


async def stored_copies(swarm: SwarmDHT, key: str, peers: list[ID]) -> list[dict[str, ServerEntry]]:
    """The copy of `key` each of `peers` stores, decoded and verified (GET_VALUE from each)."""
    copies = []
    for peer in peers:
        with trio.fail_after(WAIT):
            record, _ = await swarm.kad.value_store._get_from_peer(peer, key.encode(), True, True)
        copies.append(decode_block_value(key, record.value))
    return copies


def test_a_flood_of_signed_entries_from_throwaway_keys_does_not_evict_the_servers(tiny_llama, tmp_path):
    model = tiny_llama.name
    key = block_key(model, FLOOD_BLOCK)
    heartbeat, expiry = 2.0, 6.0
    common = ("--model", str(tiny_llama), "--port", "0", "--throughput", "100")
    common += ("--heartbeat", str(heartbeat), "--expiry", str(expiry))
    with local_swarm(tmp_path, {"PETAL_HOME": str(tmp_path / "home")}) as swarm:
        first = swarm.start("start", *common, "--blocks", "0:4", "--new-swarm")
        second = swarm.start("start", *common, "--blocks", "2:6", "--initial-peers", first.addr)
        first.wait_serving()
        second.wait_serving()
        servers = {first.peer_id, second.peer_id}
        peers = [ID.from_base58(peer_id) for peer_id in sorted(servers)]

        async def visible(dht: SwarmDHT) -> set[str]:
            return set((await dht.get_servers(model, [FLOOD_BLOCK]))[FLOOD_BLOCK])

        async def main() -> None:
            async with (
                open_host(create_new_key_pair(), ("127.0.0.1", 0)) as host,
                open_swarm_dht(host, [first.addr, second.addr], client=True) as dht,
            ):
                deadline = trio.current_time() + 30
                while not servers <= await visible(dht):
                    assert trio.current_time() < deadline, "the servers never announced block 3"
                    await trio.sleep(0.2)
                now = time.time()
                ten_years = 10 * 365 * 86400.0
                floods = {
                    "dated ten years ahead": signed_flood(
                        key, MAX_ENTRIES_PER_VALUE, now + ten_years, now + ten_years + 90
                    ),
                    "dated as late as readers keep": signed_flood(
                        key, MAX_ENTRIES_PER_VALUE, now + 14, now + 14 + 3600
                    ),
                }
                for what, flood in floods.items():
                    for peer in peers:
                        with trio.fail_after(WAIT):
                            stored = await dht.kad.value_store._store_at_peer(peer, key.encode(), msgpack.packb(flood))
                        assert not stored, f"a server stored a flood {what} in place of its copy"
                    assert servers <= await visible(dht)
                # Beside the servers a flood may take the room left; the stored copy is read first, so a
                # heartbeat between the read and the write makes the PUT stale: it is refused, and tried again.
                sybils = signed_flood(key, MAX_ENTRIES_PER_VALUE - len(servers), now + 14, now + 14 + 3600)
                for peer in peers:
                    for _ in range(5):
                        [copy] = await stored_copies(dht, key, [peer])
                        padded = {**{p: e.to_wire() for p, e in copy.items()}, **sybils}
                        with trio.fail_after(WAIT):
                            if await dht.kad.value_store._store_at_peer(peer, key.encode(), msgpack.packb(padded)):
                                break
                    else:
                        raise AssertionError(f"{peer} refused a flood that kept every server it stores")
                flooded_at = time.time()
                # The servers' heartbeats go on through the flood: after their entries' lifetime, each
                # server's copy holds both of them, refreshed since the flood.
                await trio.sleep(expiry + heartbeat)
                for copy in await stored_copies(dht, key, peers):
                    assert len(copy) == MAX_ENTRIES_PER_VALUE
                    assert all(copy[peer_id].updated_at > flooded_at for peer_id in servers), sorted(copy)[:4]
                assert servers <= await visible(dht)

        trio.run(main)
        for node in (first, second):
            assert node.process.poll() is None, node.output()[-3000:]
