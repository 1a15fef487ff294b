"""The wire: length-prefixed msgpack frames, tensors, and typed messages validated on receipt.

A frame is a 4-byte big-endian length and a msgpack map with a "type" field. Every message type is a
dataclass with `to_wire` / `from_wire`; `from_wire` checks types, ranges and sizes and raises
ProtocolError with a reason, so a bad peer gets an error frame and never an exception in the node."""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np
import torch

from petald.errors import PetalError
from petald.p2p.dht import ANNOUNCED_STATES, QUANTS

# The protocols of a serving node (the bandwidth probe's is in petald.p2p.bandwidth).
INFERENCE_PROTOCOL = "/petal/inference/1.0.0"
INFO_PROTOCOL = "/petal/info/1.0.0"
PUSH_PROTOCOL = "/petal/push/1.0.0"
FORWARD_PROTOCOL = "/petal/forward/1.0.0"
BACKWARD_PROTOCOL = "/petal/backward/1.0.0"

MAX_FRAME_BYTES = 256 * 2**20
MAX_TENSOR_DIMS = 4
MAX_NAME_LENGTH = 256
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_HEADER = struct.Struct(">I")


class ProtocolError(PetalError, ValueError):
    """A peer sent something the protocol does not allow. `code` is machine-readable, the text is not."""

    def __init__(self, reason: str, code: str = "bad_request"):
        super().__init__(reason)
        self.code = code


# ---------------------------------------------------------------- tensors


def pack_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as a msgpack-able map; the data is a view, not a copy, where the layout allows."""
    tensor = tensor.detach().cpu().contiguous()
    dtype = next((name for name, dt in WIRE_DTYPES.items() if dt == tensor.dtype), None)
    if dtype is None:
        raise ProtocolError(f"tensors of dtype {tensor.dtype} cannot go on the wire")
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    return {"dtype": dtype, "shape": list(tensor.shape), "data": memoryview(raw.numpy()).cast("B")}


def unpack_tensor(value: Any, what: str, max_bytes: int = MAX_FRAME_BYTES) -> torch.Tensor:
    """Check and decode a packed tensor; `what` names it in errors."""
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{what} is not a tensor (want a map with dtype, shape, data)")
    dtype_name, shape, data = value["dtype"], value["shape"], value["data"]
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise ProtocolError(f"{what} has dtype {dtype_name!r:.40}; allowed: {', '.join(WIRE_DTYPES)}", "bad_dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise ProtocolError(f"{what} has an invalid shape {shape!r:.80}", "bad_shape")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{what} data is not bytes")
    dtype = WIRE_DTYPES[dtype_name]
    size = math.prod(shape) * dtype.itemsize
    if size > max_bytes:
        raise ProtocolError(f"{what} is {size} bytes, over the limit of {max_bytes}", "too_large")
    if size != len(data):
        raise ProtocolError(f"{what} has {len(data)} bytes of data, its shape {shape} needs {size}", "bad_shape")
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    array = np.frombuffer(bytearray(data), dtype=_NUMPY[storage]).reshape(shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int16: np.int16,
    torch.int64: np.int64,
    torch.int32: np.int32,
}


# ---------------------------------------------------------------- fields


def _int(msg: dict, key: str, low: int, high: int) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"{key} must be an integer in [{low}, {high}], got {value!r:.80}")
    return value


def _float(msg: dict, key: str) -> float:
    value = msg.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"{key} must be a finite number, got {value!r:.80}")
    return float(value)


def _str(msg: dict, key: str, max_length: int = MAX_NAME_LENGTH, optional: bool = False) -> str | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise ProtocolError(f"{key} must be a string of 1 to {max_length} characters, got {value!r:.80}")
    return value


def _choice(msg: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise ProtocolError(f"{key} must be one of {', '.join(allowed)}, got {value!r:.40}")
    return value


def _str_list(msg: dict, key: str, max_items: int = 64) -> list[str]:
    value = msg.get(key, [])
    if not isinstance(value, list) or len(value) > max_items or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{key} must be a list of at most {max_items} strings")
    return [v for v in value if 0 < len(v) <= MAX_NAME_LENGTH]


def _hidden_states(msg: dict, key: str, limits: Limits) -> torch.Tensor:
    """A float tensor [batch, tokens, hidden]."""
    hidden = unpack_tensor(msg.get(key), key, limits.max_tensor_bytes)
    if hidden.ndim != 3 or not hidden.is_floating_point():
        raise ProtocolError(
            f"{key} must be a float tensor [batch, tokens, hidden], got {hidden.dtype} {list(hidden.shape)}",
            "bad_shape",
        )
    return hidden


def _attention_mask(msg: dict, hidden: torch.Tensor, limits: Limits) -> torch.Tensor | None:
    """The optional padding mask [batch, tokens] of `hidden`: integers, 1 = real token, 0 = padding."""
    if msg.get("attention_mask") is None:
        return None
    mask = unpack_tensor(msg["attention_mask"], "attention_mask", limits.max_tensor_bytes)
    if mask.is_floating_point() or list(mask.shape) != list(hidden.shape[:2]):
        raise ProtocolError(
            f"attention_mask must be an integer tensor of shape {list(hidden.shape[:2])}, "
            f"got {mask.dtype} {list(mask.shape)}",
            "bad_shape",
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ProtocolError("attention_mask must hold only 0 and 1", "bad_shape")
    return mask


def _prompts(msg: dict, hidden: torch.Tensor, limits: Limits, blocks: int | None = None) -> torch.Tensor | None:
    """The optional deep prompts [blocks, batch or 1, prefix <= tokens, hidden] that go with `hidden`."""
    if msg.get("prompts") is None:
        return None
    prompts = unpack_tensor(msg["prompts"], "prompts", limits.max_tensor_bytes)
    batch, length, hidden_size = hidden.shape
    shape = list(prompts.shape)
    if (
        not prompts.is_floating_point()
        or prompts.ndim != 4
        or (blocks is not None and shape[0] != blocks)
        or shape[0] == 0
        or shape[1] not in (1, batch)
        or not 0 < shape[2] <= length
        or shape[3] != hidden_size
    ):
        raise ProtocolError(
            f"prompts must be a float tensor [blocks {blocks or '>= 1'}, batch {batch} or 1, prefix <= {length}, "
            f"hidden {hidden_size}], got {prompts.dtype} {shape}",
            "bad_shape",
        )
    return prompts


# ---------------------------------------------------------------- messages

MESSAGE_TYPES: dict[str, type[Message]] = {}


class Sender(enum.Enum):
    """Which side of a stream sends a message type."""

    REQUESTER = "the peer that opened the stream (a client, or a server pushing to the next one)"
    SERVER = "the server that answers the stream"


@dataclass
class Message:
    """Base of every message; `TYPE` is its "type" field on the wire, `SENT_BY` the side that sends it."""

    TYPE: ClassVar[str] = ""
    SENT_BY: ClassVar[Sender]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MESSAGE_TYPES[cls.TYPE] = cls

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in body.items():
            if isinstance(value, torch.Tensor):
                body[key] = pack_tensor(value)
        return {"type": self.TYPE, **body}

    @classmethod
    def from_wire(cls, msg: dict, limits: Limits) -> Message:
        raise NotImplementedError


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; a server sets them from its span and its budget."""

    max_tensor_bytes: int = MAX_FRAME_BYTES
    max_batch_size: int = 256
    max_length: int = 1 << 20
    max_forward_tokens: int = 1 << 16  # batch x tokens of one forward or backward request


@dataclass
class OpenSession(Message):
    """Client -> server: reserve a KV cache for `batch_size` x `max_length` tokens on blocks [start, end)."""

    TYPE: ClassVar[str] = "open"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER
    model: str
    start: int
    end: int
    batch_size: int
    max_length: int
    session_id: str
    adapter: str | None = None  # a LoRA adapter the server serves (None: the base weights)

    @classmethod
    def from_wire(cls, msg, limits):
        return cls(
            model=_str(msg, "model"),
            start=_int(msg, "start", 0, 1 << 20),
            end=_int(msg, "end", 1, 1 << 20),
            batch_size=_int(msg, "batch_size", 1, limits.max_batch_size),
            max_length=_int(msg, "max_length", 1, limits.max_length),
            session_id=_str(msg, "session_id", 64),
            adapter=_str(msg, "adapter", optional=True),
        )


@dataclass
class SessionOpened(Message):
    """Server -> client: the cache is reserved."""

    TYPE: ClassVar[str] = "opened"
    SENT_BY: ClassVar[Sender] = Sender.SERVER
    session_id: str
    cache_tokens_left: int

    @classmethod
    def from_wire(cls, msg, limits):
        return cls(_str(msg, "session_id", 64), _int(msg, "cache_tokens_left", 0, 1 << 62))


@dataclass
class Step(Message):
    """Client -> server: new tokens' hidden states [B, T, H] (and their padding mask [B, T], 1 = real)."""

    TYPE: ClassVar[str] = "step"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER
    step: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    # server push: after this step, send the output on to these servers' sessions, in order
    push_to: list[NextHop] = field(default_factory=list)
    # deep prompts [session blocks, B or 1, P, H] added to the first P positions: only on a session's first step
    prompts: torch.Tensor | None = None
    # where the new tokens start: the session's cache is cut back to its first `position` tokens first (a
    # rewind, e.g. of rejected draft tokens); None: after everything cached
    position: int | None = None

    def to_wire(self) -> dict[str, Any]:
        body = super().to_wire()
        body["push_to"] = [dataclasses.asdict(hop) for hop in self.push_to]
        return body

    @classmethod
    def from_wire(cls, msg, limits):
        hidden = _hidden_states(msg, "hidden", limits)
        mask = _attention_mask(msg, hidden, limits)
        push_to = msg.get("push_to")
        push_to = [] if push_to is None else push_to
        if not isinstance(push_to, list) or len(push_to) > MAX_PUSH_HOPS:
            raise ProtocolError(f"push_to must be a list of at most {MAX_PUSH_HOPS} hops")
        prompts = _prompts(msg, hidden, limits)
        hops = [NextHop.from_wire(hop) for hop in push_to]
        position = None if msg.get("position") is None else _int(msg, "position", 0, 1 << 40)
        return cls(_int(msg, "step", 0, 1 << 40), hidden, mask, hops, prompts, position)


MAX_PUSH_HOPS = 64
MAX_PUSHES = 64  # pushes in one Pushes frame


@dataclass
class NextHop:
    """Where a server pushes its output: the session of `session_id` on `peer_id`, starting at block `start`."""

    peer_id: str
    addrs: list[str]
    session_id: str
    start: int

    @classmethod
    def from_wire(cls, msg) -> NextHop:
        if not isinstance(msg, dict):
            raise ProtocolError("a push_to hop must be a map")
        return cls(
            peer_id=_str(msg, "peer_id", 128),
            addrs=_str_list(msg, "addrs", 8),
            session_id=_str(msg, "session_id", 64),
            start=_int(msg, "start", 0, 1 << 20),
        )


@dataclass
class Push(Step):
    """Server -> server: a step for the receiver's session `session_id` on blocks from `start`."""

    TYPE: ClassVar[str] = "push"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER
    session_id: str = ""
    start: int = 0

    @classmethod
    def from_wire(cls, msg, limits):
        step = Step.from_wire(msg, limits)
        return cls(
            step.step,
            step.hidden,
            step.attention_mask,
            step.push_to,
            position=step.position,
            session_id=_str(msg, "session_id", 64),
            start=_int(msg, "start", 0, 1 << 20),
        )


@dataclass
class Pushes(Message):
    """Server -> server: the pushes that one forward pass sends to the same next server, in one frame. The
    receiver hands them all to their sessions before any of them runs, so steps that shared a pass here can share
    one there as well (pushed one frame at a time, the first would start a pass of its own)."""

    TYPE: ClassVar[str] = "pushes"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER
    pushes: list[Push]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "pushes": [push.to_wire() for push in self.pushes]}

    @classmethod
    def from_wire(cls, msg, limits):
        items = msg.get("pushes")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_PUSHES:
            raise ProtocolError(f"pushes must be a list of 1 to {MAX_PUSHES} pushes")
        if not all(isinstance(item, dict) for item in items):
            raise ProtocolError("each of pushes must be a map")
        return cls([Push.from_wire(item, limits) for item in items])


@dataclass
class StepResult(Message):
    """Server -> client: the span's output for that step; `pushed` says it went on to the next server too."""

    TYPE: ClassVar[str] = "result"
    SENT_BY: ClassVar[Sender] = Sender.SERVER
    step: int
    hidden: torch.Tensor
    pushed: bool = False

    @classmethod
    def from_wire(cls, msg, limits):
        hidden = unpack_tensor(msg.get("hidden"), "hidden", limits.max_tensor_bytes)
        return cls(_int(msg, "step", 0, 1 << 40), hidden, msg.get("pushed") is True)


@dataclass
class CloseSession(Message):
    """Client -> server: the session is over; free its cache."""

    TYPE: ClassVar[str] = "close"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER

    @classmethod
    def from_wire(cls, msg, limits):
        return cls()


@dataclass
class ForwardRequest(Message):
    """Client -> server: run hidden states [B, T, H] through blocks [start, end), no cache kept.

    `prompts` [end - start, B or 1, P, H] are deep prompts added to the first P positions before each block;
    `adapter` names a LoRA adapter the server serves (None: the base weights)."""

    TYPE: ClassVar[str] = "forward"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER
    model: str
    start: int
    end: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    adapter: str | None = None

    @classmethod
    def from_wire(cls, msg, limits):
        return cls(**cls._fields_from_wire(msg, limits))

    @classmethod
    def _fields_from_wire(cls, msg: dict, limits: Limits) -> dict[str, Any]:
        start, end = _int(msg, "start", 0, 1 << 20), _int(msg, "end", 1, 1 << 20)
        if end <= start:
            raise ProtocolError(f"blocks {start}:{end} are an empty range", "wrong_span")
        hidden = _hidden_states(msg, "hidden", limits)
        batch, length, _ = hidden.shape
        if batch == 0 or length == 0:
            raise ProtocolError(f"hidden has an empty shape {list(hidden.shape)}", "bad_shape")
        if batch * length > limits.max_forward_tokens:
            raise ProtocolError(
                f"{batch} x {length} tokens are over this server's limit of {limits.max_forward_tokens} per request",
                "too_large",
            )
        prompts = _prompts(msg, hidden, limits, end - start)
        return dict(
            model=_str(msg, "model"),
            start=start,
            end=end,
            hidden=hidden,
            attention_mask=_attention_mask(msg, hidden, limits),
            prompts=prompts,
            adapter=_str(msg, "adapter", optional=True),
        )


@dataclass
class ForwardResult(Message):
    """Server -> client: the output hidden states of a forward request."""

    TYPE: ClassVar[str] = "forward_result"
    SENT_BY: ClassVar[Sender] = Sender.SERVER
    hidden: torch.Tensor

    @classmethod
    def from_wire(cls, msg, limits):
        return cls(_hidden_states(msg, "hidden", limits))


@dataclass
class BackwardRequest(ForwardRequest):
    """Client -> server: the inputs of a forward request again, with the gradient of the loss w.r.t. its
    output; the server recomputes the forward pass and returns the gradients w.r.t. the inputs."""

    TYPE: ClassVar[str] = "backward"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER
    grad_output: torch.Tensor | None = None  # required; a default only because the fields before it have one

    @classmethod
    def from_wire(cls, msg, limits):
        fields = cls._fields_from_wire(msg, limits)
        grad_output = _hidden_states(msg, "grad_output", limits)
        if grad_output.shape != fields["hidden"].shape:
            raise ProtocolError(
                f"grad_output has shape {list(grad_output.shape)}, the hidden states it belongs to have "
                f"{list(fields['hidden'].shape)}",
                "bad_shape",
            )
        return cls(**fields, grad_output=grad_output)


@dataclass
class BackwardResult(Message):
    """Server -> client: gradients w.r.t. the hidden states and (if any were sent) the deep prompts."""

    TYPE: ClassVar[str] = "backward_result"
    SENT_BY: ClassVar[Sender] = Sender.SERVER
    grad_hidden: torch.Tensor
    grad_prompts: torch.Tensor | None = None

    @classmethod
    def from_wire(cls, msg, limits):
        grad_prompts = None
        if msg.get("grad_prompts") is not None:
            grad_prompts = unpack_tensor(msg["grad_prompts"], "grad_prompts", limits.max_tensor_bytes)
        return cls(_hidden_states(msg, "grad_hidden", limits), grad_prompts)


MAX_PROBE_BYTES = 16 * 2**20


@dataclass
class BandwidthProbe(Message):
    """Node -> node: bytes that time the link between them; the receiver answers BandwidthAck."""

    TYPE: ClassVar[str] = "probe"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER
    payload: bytes

    @classmethod
    def from_wire(cls, msg, limits):
        payload = msg.get("payload")
        if not isinstance(payload, bytes) or len(payload) > MAX_PROBE_BYTES:
            raise ProtocolError(f"payload must be at most {MAX_PROBE_BYTES} bytes", "too_large")
        return cls(payload)


@dataclass
class BandwidthAck(Message):
    """Node -> node: every byte of the probe arrived."""

    TYPE: ClassVar[str] = "probe_ack"
    SENT_BY: ClassVar[Sender] = Sender.SERVER
    received: int

    @classmethod
    def from_wire(cls, msg, limits):
        return cls(_int(msg, "received", 0, MAX_PROBE_BYTES))


@dataclass
class ErrorReply(Message):
    """Server -> requester: the request failed; `code` is machine-readable, `reason` is for people. Admitted only
    where a server's reply is expected (`decode`): a server reading requests answers one with "unexpected"."""

    TYPE: ClassVar[str] = "error"
    SENT_BY: ClassVar[Sender] = Sender.SERVER
    code: str
    reason: str

    @classmethod
    def from_wire(cls, msg, limits):
        return cls(_str(msg, "code", 64), _str(msg, "reason", 4096))


@dataclass
class InfoRequest(Message):
    """Client -> server: what do you serve, how busy are you? (also a ping)"""

    TYPE: ClassVar[str] = "info?"
    SENT_BY: ClassVar[Sender] = Sender.REQUESTER

    @classmethod
    def from_wire(cls, msg, limits):
        return cls()


@dataclass
class ServerInfo(Message):
    """Server -> client: the answer to InfoRequest."""

    TYPE: ClassVar[str] = "info"
    SENT_BY: ClassVar[Sender] = Sender.SERVER
    model: str
    start: int
    end: int
    state: str
    throughput: float
    cache_tokens_left: int
    quant: str
    version: str
    adapters: list[str] = field(default_factory=list)
    # load, for routing at every step (0 from servers that do not report it)
    sessions: int = 0  # open inference sessions
    busy: float = 0.0  # fraction of the last seconds the server's compute lane was running
    active_rows: int = 0  # rows of the sessions that stepped in the last seconds
    queued_steps: int = 0  # steps waiting for the compute lane now
    passes: int = 0  # forward passes run for inference steps since start
    batched_passes: int = 0  # ... of which carried the steps of several sessions

    @classmethod
    def from_wire(cls, msg, limits):
        def count(key: str) -> int:
            return _int(msg, key, 0, 1 << 62) if key in msg else 0

        return cls(
            model=_str(msg, "model"),
            start=_int(msg, "start", 0, 1 << 20),
            end=_int(msg, "end", 1, 1 << 20),
            state=_choice(msg, "state", ANNOUNCED_STATES),
            throughput=_float(msg, "throughput"),
            cache_tokens_left=_int(msg, "cache_tokens_left", 0, 1 << 62),
            quant=_choice(msg, "quant", QUANTS),
            version=_str(msg, "version", 64),
            adapters=_str_list(msg, "adapters"),
            sessions=count("sessions"),
            busy=min(1.0, max(0.0, _float(msg, "busy"))) if "busy" in msg else 0.0,
            active_rows=count("active_rows"),
            queued_steps=count("queued_steps"),
            passes=count("passes"),
            batched_passes=count("batched_passes"),
        )


def decode(payload: dict, limits: Limits = Limits(), expect: tuple[type[Message], ...] = ()) -> Message:
    """The typed message in a decoded frame; an unknown or unexpected type is a ProtocolError.

    With `expect`, only those types are admitted, and an ErrorReply too where every expected type is
    sent by a server: a server reading requests takes no error frames from its peers."""
    kind = payload.get("type") if isinstance(payload, dict) else None
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r:.40}")
    replies_expected = all(c.SENT_BY is Sender.SERVER for c in expect)
    if expect and cls not in expect and not (cls is ErrorReply and replies_expected):
        wanted = " or ".join(c.TYPE for c in expect)
        raise ProtocolError(f"expected a {wanted!r} message here, got {kind!r}", "unexpected")
    return cls.from_wire(payload, limits)


# ---------------------------------------------------------------- frames


def encode_frame(message: Message) -> bytes:
    body = msgpack.packb(message.to_wire(), use_bin_type=True)
    return _HEADER.pack(len(body)) + body


async def write_message(stream, message: Message) -> None:
    await stream.write(encode_frame(message))


READ_CHUNK = 1 << 16
# stream -> bytes read past the end of its last frame. Reading a frame as one large read instead of a
# header read and a body read halves the reads, and every Yamux read sends the peer a window update.
_read_ahead: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def read_exactly(stream, size: int) -> bytes:
    """Exactly `size` bytes from a libp2p stream; EOFError if it ends first. Bytes that arrive beyond them
    are kept for the next read of the same stream (all reads of a stream must go through here)."""
    buffer = _read_ahead.setdefault(stream, bytearray())  # kept there, so a cancelled read loses nothing
    while len(buffer) < size:
        chunk = await stream.read(max(size - len(buffer), READ_CHUNK))
        if not chunk:
            raise EOFError(f"stream ended after {len(buffer)} of {size} bytes")
        buffer += chunk
    data = bytes(buffer[:size])
    del buffer[:size]
    return data


async def read_frame(stream, max_bytes: int = MAX_FRAME_BYTES) -> dict:
    """One decoded frame; ProtocolError for an oversized or undecodable one, EOFError at the end."""
    (size,) = _HEADER.unpack(await read_exactly(stream, _HEADER.size))
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes is over the limit of {max_bytes}", "too_large")
    body = await read_exactly(stream, size)
    try:
        payload = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=max_bytes)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise ProtocolError(f"frame is not valid msgpack: {e}", "bad_frame") from e
    if not isinstance(payload, dict):
        raise ProtocolError("frame is not a msgpack map", "bad_frame")
    return payload


async def read_message(stream, limits: Limits = Limits(), expect: tuple[type[Message], ...] = ()) -> Message:
    return decode(await read_frame(stream, limits.max_tensor_bytes + 65536), limits, expect)
