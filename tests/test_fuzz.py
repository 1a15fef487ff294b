"""Fuzzing the wire: every malformed field of every message is a ProtocolError (pure), and a real petald node
under a seeded stream of random and mutated frames on every protocol answers each with an error frame or a
closed stream, while a good inference session beside them gets the same outputs as a local run of the blocks."""

from __future__ import annotations

import copy
import random
import struct
import time
from collections import Counter
from typing import Any

import msgpack
import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from petald.p2p.host import connect, open_host
from petald.p2p.wire import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
    BackwardRequest,
    BackwardResult,
    BandwidthAck,
    BandwidthProbe,
    CloseSession,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    InfoRequest,
    Limits,
    Message,
    NextHop,
    OpenSession,
    ProtocolError,
    Push,
    Pushes,
    ServerInfo,
    SessionOpened,
    Step,
    StepResult,
    decode,
    read_frame,
    write_message,
)
from petald.serving.span import Span
from tests import test_protocol_abuse
from tests.test_protocol_abuse import BLOCKS, CACHE_TOKENS, HIDDEN, WAIT, receive

node = test_protocol_abuse.node  # the fixture: one petald serving the tiny Llama (256 cache tokens)
MODEL = "tiny-llama"  # the name it announces its tiny Llama by
PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
MAX_REASON = 4096  # what ErrorReply.from_wire admits: a longer reason would not reach the client


def tensor(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def valid_messages(push_to: list[NextHop]) -> list[Message]:
    """One valid message of every type (requests for blocks of MODEL)."""
    hidden, mask, prompts = tensor(1, 3, HIDDEN), torch.ones(1, 3, dtype=torch.long), tensor(2, 1, 2, HIDDEN) * 0.1
    return [
        OpenSession(MODEL, 0, BLOCKS, 1, 16, "fuzz"),
        SessionOpened("fuzz", 100),
        Step(1, hidden, mask, push_to, prompts=tensor(BLOCKS, 1, 2, HIDDEN) * 0.1),
        Push(1, hidden, mask, push_to, session_id="fuzz", start=2),
        Pushes([Push(1, hidden, mask, push_to, session_id="fuzz", start=2), Push(2, hidden, None, [], session_id="z")]),
        StepResult(1, hidden, True),
        CloseSession(),
        ForwardRequest(MODEL, 1, 3, hidden, mask, prompts),
        ForwardResult(hidden),
        BackwardRequest(MODEL, 1, 3, hidden, mask, prompts, grad_output=tensor(1, 3, HIDDEN, seed=1)),
        BackwardResult(hidden, prompts),
        BandwidthProbe(b"p" * 16),
        BandwidthAck(16),
        ErrorReply("bad_request", "why"),
        InfoRequest(),
        ServerInfo(MODEL, 0, BLOCKS, "ONLINE", 10.0, 100, "none", "0.1", ["lora"]),
    ]


def as_received(message: Message) -> dict[str, Any]:
    """The message as a server decodes it off the wire (through msgpack: memoryviews become bytes)."""
    return msgpack.unpackb(msgpack.packb(message.to_wire(), use_bin_type=True), raw=False)


TEMPLATES = {
    m.TYPE: as_received(m) for m in valid_messages([NextHop(PEER, [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"], "s", 3)])
}
TYPES = {m.TYPE: type(m) for m in valid_messages([])}

BAD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    float("nan"),
    float("-inf"),
    "",
    "x" * 5000,
    b"",
    b"\x00" * 64,
    [],
    [1, 2],
    [[1], {"a": None}],
    {},
    {"dtype": "float32"},
    {"type": "step"},
]
BAD_DTYPES: list[Any] = ["float64", "int8", "bool", ["float32"], {"float32": 1}, None, 3, b"float32", "", "x" * 999]
BAD_SHAPES: list[Any] = [
    [],
    [3],
    [1, 3],
    [1, 3, HIDDEN, 1, 1],
    [-1, 3, HIDDEN],
    [1, 3.0, HIDDEN],
    [1, "3", HIDDEN],
    [True, 3, HIDDEN],
    [None, 3, HIDDEN],
    [[1], 3, HIDDEN],
    [{"a": 1}, 3, HIDDEN],
    [2**31 - 1] * 4,  # its product overflows any fixed-width integer
    [2**62, 2, 2],
    [0, 3, HIDDEN],
    [1, 0, HIDDEN],
    [1, 3, HIDDEN + 1],
    [2**64 - 1, 1, 1],
    None,
    "1,3,64",
    {},
    [1] * 10_000,
]
BAD_DATA: list[Any] = [b"", b"\x00" * 7, "text", None, [1, 2, 3], 12, {"a": b""}]


def tensor_fields(wire: dict[str, Any]) -> list[str]:
    return [k for k, v in wire.items() if isinstance(v, dict) and set(v) == {"dtype", "shape", "data"}]


def field_mutations(wire: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """`wire` with one field made wrong, in every way above: (what changed, the mutated copy, whether every
    receiver must refuse it). A field may be optional, so only a broken tensor must always be refused."""
    mutations = []
    for key in [k for k in wire if k != "type"]:
        for value in BAD_VALUES:
            mutations.append((f"{key}={value!r:.30}", {**wire, key: value}, False))
        mutations.append((f"no {key}", {k: v for k, v in wire.items() if k != key}, False))
    for key in tensor_fields(wire):
        for part, values in (("dtype", BAD_DTYPES), ("shape", BAD_SHAPES), ("data", BAD_DATA)):
            for value in (v for v in values if v != wire[key][part]):
                mutations.append((f"{key}.{part}={value!r:.30}", {**wire, key: {**wire[key], part: value}}, True))
        for value in BAD_DATA:
            bfloat16 = {**wire[key], "dtype": "bfloat16", "data": value}
            mutations.append((f"{key}.data (bfloat16)={value!r:.30}", {**wire, key: bfloat16}, True))
    return mutations


def decode_outcome(payload: Any, expect: tuple[type[Message], ...] = ()) -> Message | ProtocolError:
    """The decoded message or the ProtocolError; any other exception fails the test that calls it."""
    try:
        return decode(payload, Limits(), expect)
    except ProtocolError as e:
        assert len(str(e)) <= MAX_REASON, f"an error reason of {len(str(e))} characters: {str(e)[:200]}"
        return e


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_every_malformed_field_of_every_message_is_a_protocol_error(kind: str) -> None:
    template = TEMPLATES[kind]
    assert isinstance(decode_outcome(template), TYPES[kind])
    refused: Counter[bool] = Counter()
    for what, payload, must_refuse in field_mutations(template):
        for expect in ((), (TYPES[kind],)):
            outcome = decode_outcome(payload, expect)
            refused[isinstance(outcome, ProtocolError)] += 1
            assert isinstance(outcome, ProtocolError) or not must_refuse, (what, outcome)
    assert refused[False] <= refused[True], refused  # most mutations are refused, and none raised anything else


def test_a_list_or_map_as_dtype_is_bad_dtype() -> None:
    for dtype in (["float32"], {"float32": "float32"}):
        for kind in ("step", "backward"):
            payload = copy.deepcopy(TEMPLATES[kind])
            payload["grad_output" if kind == "backward" else "hidden"]["dtype"] = dtype
            outcome = decode_outcome(payload)
            assert isinstance(outcome, ProtocolError) and outcome.code == "bad_dtype", outcome


def test_server_info_admits_only_announced_states_and_known_quantizations() -> None:
    for field, value in (("state", "UNREACHABLE"), ("state", "online"), ("quant", "fp4"), ("state", ["ONLINE"])):
        assert isinstance(decode_outcome({**TEMPLATES["info"], field: value}), ProtocolError), (field, value)


def test_error_frames_are_admitted_only_where_a_server_reply_is_expected() -> None:
    error = TEMPLATES["error"]
    for expect in (
        (SessionOpened,),
        (StepResult,),
        (ServerInfo,),
        (ForwardResult,),
        (BackwardResult,),
        (BandwidthAck,),
    ):
        assert isinstance(decode_outcome(error, expect), ErrorReply), expect
    requests = [(OpenSession,), (Step, CloseSession), (InfoRequest,), (Push, Pushes), (ForwardRequest,)]
    requests.append((BackwardRequest,))
    for expect in [*requests, (BandwidthProbe,), (StepResult, Step)]:
        outcome = decode_outcome(error, expect)
        assert isinstance(outcome, ProtocolError) and outcome.code == "unexpected", expect


def mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """`value` with one random part replaced, dropped or added (maps and lists are walked into)."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value, key=str))
        choice = rng.random()
        if choice < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if choice < 0.25:
            return {**value, rng.choice(["extra", "type", "dtype", key]): random_value(rng)}
        return {**value, key: mutate(value[key], rng, depth + 1)}
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return [*value[:i], mutate(value[i], rng, depth + 1), *value[i + 1 :]]
    if isinstance(value, bytes) and value and rng.random() < 0.5:
        return value[: rng.randrange(len(value))]
    return random_value(rng, depth)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.random()
    if choice < 0.4 or depth > 3:
        return rng.choice(BAD_VALUES + BAD_DTYPES[:4] + [3, 64, 2**31])
    if choice < 0.6:
        return rng.choice(BAD_SHAPES)
    if choice < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["dtype", "shape", "data", "x", "type"]): random_value(rng, depth + 1)}


def test_random_mutations_of_every_message_never_raise_anything_but_protocol_error() -> None:
    rng = random.Random(1202)
    for _ in range(3000):
        kind = rng.choice(sorted(TEMPLATES))
        payload = mutate(TEMPLATES[kind], rng)
        decode_outcome(payload, rng.choice([(), (TYPES[kind],), (Step, CloseSession)]))


class BytesStream:
    """A stream that hands out `data`, a few bytes at a time, then ends."""

    def __init__(self, data: bytes):
        self.data = data

    async def read(self, size: int) -> bytes:
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk


async def frame_outcome(data: bytes) -> dict | ProtocolError | EOFError:
    """What read_frame makes of `data`: a payload, a ProtocolError, or EOFError when it ends too early."""
    try:
        return await read_frame(BytesStream(data), 1 << 20)
    except (ProtocolError, EOFError) as e:
        return e


def test_random_and_truncated_frames_are_protocol_errors_or_end_of_stream() -> None:
    rng = random.Random(1203)
    whole = [encode(m) for m in TEMPLATES.values()]
    for _ in range(1000):
        body = rng.randbytes(rng.randrange(64))
        if rng.random() < 0.5:
            body = msgpack.packb(mutate(rng.choice(list(TEMPLATES.values())), rng), use_bin_type=True)[
                : rng.randrange(1, 200)
            ]
        trio.run(frame_outcome, struct.pack(">I", len(body)) + body)
        data = rng.choice(whole)
        assert isinstance(trio.run(frame_outcome, data[: rng.randrange(len(data))]), EOFError)
    assert isinstance(trio.run(frame_outcome, struct.pack(">I", 2**31)), ProtocolError)


def encode(payload: Any) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


# ---------------------------------------------------------------- a real node under fuzzing

SEED = 20261202
FUZZ_SECONDS = 15.0
GOOD_STEPS = 30  # the good session's steps: 8 tokens, then one at a time

# What the node reads first on each protocol (on a session's later frames: Step or CloseSession).
EXPECTS = {
    INFERENCE_PROTOCOL: (OpenSession,),
    INFO_PROTOCOL: (InfoRequest,),
    PUSH_PROTOCOL: (Push, Pushes),
    FORWARD_PROTOCOL: (ForwardRequest,),
    BACKWARD_PROTOCOL: (BackwardRequest,),
}
LIVE_TEMPLATES = {m.TYPE: as_received(m) for m in valid_messages([])}  # pushes would dial nobody


class Fuzzer:
    """Seeded bad frames for one node; every answer is checked as it comes."""

    def __init__(self, host, peer, rng: random.Random):
        self.host, self.peer, self.rng = host, peer, rng
        self.sent: Counter[str] = Counter()
        self.session = None  # the fuzzer's own inference session, which takes bad frames as later frames

    async def frame(self, expect: tuple[type[Message], ...]) -> tuple[str, bytes, bool]:
        """(what it is, its bytes, whether the node may accept it): the node must refuse it unless accepted."""
        rng = self.rng
        choice = rng.random()
        if choice < 0.5:
            kind = rng.choice(sorted(LIVE_TEMPLATES))
            payload = mutate(LIVE_TEMPLATES[kind], rng)
            what = f"mutated {kind}"
        elif choice < 0.6:
            payload, what = LIVE_TEMPLATES["error"], "error"
        elif choice < 0.75:
            kind = rng.choice(sorted(LIVE_TEMPLATES))
            payload, what = LIVE_TEMPLATES[kind], f"valid {kind}"
        elif choice < 0.9:
            data = struct.pack(">I", len(body := rng.randbytes(rng.randrange(1, 256)))) + body
            payload = await frame_outcome(data)
            accepted = isinstance(payload, dict) and not isinstance(decode_outcome(payload, expect), ProtocolError)
            return "random bytes", data, accepted
        else:
            data = encode(LIVE_TEMPLATES[rng.choice(sorted(LIVE_TEMPLATES))])
            return "truncated", data[: rng.randrange(1, len(data))], False
        accepted = not isinstance(decode_outcome(payload, expect), ProtocolError)
        return what, encode(payload), accepted

    async def one_stream(self) -> None:
        """One bad frame as the first frame of a fresh stream of a random protocol."""
        protocol = self.rng.choice(sorted(EXPECTS))
        what, data, accepted = await self.frame(EXPECTS[protocol])
        self.sent[f"{protocol.split('/')[2]}: {what}"] += 1
        with trio.fail_after(WAIT):
            stream = await self.host.new_stream(self.peer, [protocol])
        try:
            with trio.fail_after(WAIT):
                await stream.write(data)
                if what == "truncated":
                    await stream.close()  # the rest never comes: the node sees the stream end mid-frame
            if protocol == PUSH_PROTOCOL and accepted:
                return  # a push for no session here is dropped, and a receiver never writes on a push stream
            reply = await answer(stream)
            assert accepted or reply is None or isinstance(reply, ErrorReply), (protocol, what, reply)
        finally:
            with trio.move_on_after(5):
                await stream.reset()

    async def in_session(self) -> None:
        """One bad frame as a later frame of the fuzzer's own open session."""
        if self.session is None:
            self.session = await self.host.new_stream(self.peer, [INFERENCE_PROTOCOL])
            await write_message(self.session, OpenSession(MODEL, 0, BLOCKS, 1, 32, "fuzz-session"))
            opened = await answer(self.session)
            if not isinstance(opened, SessionOpened):  # the other fuzzer's opens may hold the cache for a moment
                assert isinstance(opened, ErrorReply) and opened.code == "cache_full", opened
                await self.end_session()
                return
        what, data, accepted = await self.frame((Step, CloseSession))
        self.sent[f"session: {what}"] += 1
        with trio.fail_after(WAIT):
            await self.session.write(data)
        if what == "truncated":  # the next frames would be read as the rest of this one
            await self.end_session()
            return
        reply = await answer(self.session)
        assert accepted or isinstance(reply, ErrorReply), (what, reply)
        # the node ends a session on a CloseSession, and on a tensor too large ("too_large"): open another
        if reply is None or (isinstance(reply, ErrorReply) and reply.code in ("too_large", "timeout")):
            await self.end_session()

    async def end_session(self) -> None:
        with trio.move_on_after(5):
            await self.session.reset()
        self.session = None

    async def run(self, seconds: float) -> None:
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            await (self.in_session() if self.rng.random() < 0.4 else self.one_stream())


async def answer(stream) -> Message | None:
    """The node's next message, or None if it ended the stream: a node that hangs fails the test."""
    return await receive(stream, WAIT)


async def open_good_session(host, peer):
    stream = await host.new_stream(peer, [INFERENCE_PROTOCOL])
    await write_message(stream, OpenSession(MODEL, 0, BLOCKS, 1, 64, "good-session"))
    assert isinstance(await answer(stream), SessionOpened)
    return stream


async def good_steps(stream, inputs: list[torch.Tensor], seconds: float) -> list[torch.Tensor]:
    """The outputs of the steps `inputs`, spread over `seconds`; then the session is closed."""
    started = trio.current_time()
    outputs = []
    for step_id, hidden in enumerate(inputs, start=1):
        await write_message(stream, Step(step_id, hidden))
        reply = await answer(stream)
        assert isinstance(reply, StepResult) and reply.step == step_id, reply
        outputs.append(reply.hidden)
        await trio.sleep_until(started + seconds * step_id / len(inputs))
    await write_message(stream, CloseSession())
    assert await answer(stream) is None
    return outputs


def test_a_node_under_fuzzing_refuses_every_bad_frame_and_keeps_a_good_session_exact(node, tiny_llama):
    inputs = [tensor(1, 8 if i == 0 else 1, HIDDEN, seed=100 + i) for i in range(GOOD_STEPS)]
    fuzzers: list[Fuzzer] = []
    outputs: list[torch.Tensor] = []

    async def main() -> None:
        async with (
            open_host(create_new_key_pair(), ("127.0.0.1", 0)) as good,
            open_host(create_new_key_pair(), ("127.0.0.1", 0)) as bad,
        ):
            good_peer, bad_peer = (
                await connect(good, node.addr, timeout=WAIT),
                await connect(bad, node.addr, timeout=WAIT),
            )
            good_stream = await open_good_session(good, good_peer)  # before the fuzzers can take the cache
            async with trio.open_nursery() as nursery:
                for seed in (SEED, SEED + 1):  # two fuzzers at once: their frames interleave at the node
                    fuzzers.append(Fuzzer(bad, bad_peer, random.Random(seed)))
                    nursery.start_soon(fuzzers[-1].run, FUZZ_SECONDS)
                outputs.extend(await good_steps(good_stream, inputs, FUZZ_SECONDS))
            for fuzzer in fuzzers:
                if fuzzer.session is not None:
                    await fuzzer.end_session()
            # the node is alive, answers info, and every cache was freed
            deadline = trio.current_time() + WAIT
            while True:
                stream = await good.new_stream(good_peer, [INFO_PROTOCOL])
                await write_message(stream, InfoRequest())
                info = await answer(stream)
                await stream.reset()
                assert isinstance(info, ServerInfo), info
                if info.cache_tokens_left == CACHE_TOKENS:
                    break
                assert trio.current_time() < deadline, f"{info.cache_tokens_left} cache tokens left of {CACHE_TOKENS}"
                await trio.sleep(0.2)

    started = time.monotonic()
    trio.run(main)
    assert node.process.poll() is None, node.output()[-3000:]
    sent = sum((f.sent for f in fuzzers), Counter())
    by_protocol: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    for what, count in sent.items():
        where, kind = what.split(": ")
        by_protocol[where] += count
        by_kind[kind.split(" ")[0]] += count
    print(f"{sum(sent.values())} frames in {time.monotonic() - started:.1f} s: {dict(by_protocol)}, {dict(by_kind)}")
    assert sum(sent.values()) >= 100

    span = Span.load(tiny_llama, 0, BLOCKS)
    session = span.new_session(1, 64)
    for output, hidden in zip(outputs, inputs, strict=True):
        torch.testing.assert_close(output, span.step(session, hidden), rtol=1e-4, atol=1e-4)
