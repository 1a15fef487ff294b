"""Protocol handlers of a serving node: inference sessions over long-lived streams, and info (which is also a ping).

Each handler validates every message (petald.p2p.wire), bounds every wait with a deadline, runs torch
work off the event loop, and answers bad input with an error frame: nothing a peer sends can crash the
node or touch another session."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import trio

import petald
from petald.config import NodeConfig
from petald.errors import AdapterError, PetalError
from petald.metrics import NodeMetrics, count_error
from petald.models.loading import release_free_memory
from petald.p2p.dht import ServerState
from petald.p2p.relay import relayed_beside_direct
from petald.p2p.wire import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    MAX_PUSHES,
    PUSH_PROTOCOL,
    BackwardRequest,
    BackwardResult,
    CloseSession,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    InfoRequest,
    Limits,
    NextHop,
    OpenSession,
    ProtocolError,
    Push,
    Pushes,
    ServerInfo,
    SessionOpened,
    Step,
    StepResult,
    read_message,
    write_message,
)
from petald.serving.batching import RequestQueue, StepQueue
from petald.serving.cache import CacheBudget, CacheFullError
from petald.serving.span import SessionStep, Span, SpanSession

log = logging.getLogger(__name__)

WRITE_TIMEOUT = 30.0
PUSH_TIMEOUT = 5.0
INBOX_SIZE = 16
MAX_TENSOR_BYTES = 128 * 2**20  # one tensor of a message
# batch x tokens of one backward request: its recomputation of a layer with autograd is one job, whose memory grows
# with tokens x tokens on a padded sequence (the client sends chunks of 4096)
MAX_BACKWARD_TOKENS = 4096


@dataclass(frozen=True)
class ServingOptions:
    """The limits and timeouts a server applies. Built from the node's configuration (from_config), whose
    defaults are the only ones."""

    model: str  # the model's name in the swarm
    max_cache_tokens: int
    max_batch_size: int
    max_forward_tokens: int  # batch x tokens of one forward request
    step_timeout: float  # longest wait for a session's next step
    session_timeout: float  # longest life of one session
    max_tensor_bytes: int = MAX_TENSOR_BYTES
    version: str = ""
    batching: bool = True  # run the steps of concurrent sessions in shared forward passes

    @classmethod
    def from_config(cls, config: NodeConfig, model: str) -> ServingOptions:
        return cls(
            model=model,
            max_cache_tokens=config.max_cache_tokens,
            max_batch_size=config.max_batch_size,
            max_forward_tokens=config.max_forward_tokens,
            step_timeout=config.step_timeout,
            session_timeout=config.session_timeout,
            version=petald.__version__,
            batching=not config.no_batching,
        )

    def wire_limits(self) -> Limits:
        """What the wire accepts from peers. max_length stays the protocol's own bound: the budget check answers a
        too-long session with "cache_full" and the room left, which a client can act on."""
        return Limits(
            max_tensor_bytes=self.max_tensor_bytes,
            max_batch_size=self.max_batch_size,
            max_forward_tokens=self.max_forward_tokens,
        )


@dataclass
class LiveSession:
    """An open inference session: its cache, its client stream and the inbox its steps arrive in."""

    key: tuple[str, int]  # (client's session id, first block): how pushes find it
    budget_id: str
    request: OpenSession
    span_session: SpanSession
    stream: object
    last_step: int = -1
    write_lock: trio.Lock = field(default_factory=trio.Lock)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancelled when the server closes it
    closed_by_server: ErrorReply | None = None  # why the server closed it: the last frame its client gets

    def __post_init__(self):
        self.inbox_in, self.inbox = trio.open_memory_channel(INBOX_SIZE)

    async def send(self, message) -> None:
        """Write to the client: the step runner and the stream reader both answer it."""
        async with self.write_lock:
            await write_message(self.stream, message)

    def close(self, code: str, reason: str) -> None:
        """End the session from the server's side: its task stops, tells the client why, and frees its cache."""
        self.closed_by_server = ErrorReply(code, reason)
        self.scope.cancel()


PUSH_FRAME_BYTES = MAX_TENSOR_BYTES // 2  # what one Pushes frame may carry, estimated (below a receiver's limit)


def push_bytes(push: Push) -> int:
    """About what `push` takes in a frame: its tensors, and a bound on the rest (names, its remaining hops)."""
    tensors = sum(t.numel() * t.element_size() for t in (push.hidden, push.attention_mask) if t is not None)
    return tensors + 1024 + 1024 * len(push.push_to)


def pushes_in_frame(sizes: list[int], max_pushes: int = MAX_PUSHES, max_bytes: int = PUSH_FRAME_BYTES) -> int:
    """How many of the oldest waiting pushes (their `push_bytes`, oldest first) go in the next frame: as many as fit
    in `max_pushes` and `max_bytes`, and always the oldest, whatever its size."""
    count, total = 0, 0
    for size in sizes:
        if count and (count == max_pushes or total + size > max_bytes):
            break
        count, total = count + 1, total + size
    return count


@dataclass(eq=False)  # compared by identity: its message holds tensors
class OutgoingPush:
    """A push waiting for its link's writer: whoever writes takes every push waiting then, in one frame."""

    message: Push
    written: bool = False
    error: BaseException | None = None


class PushLink:
    """This server's push stream to one next server, shared by every session pushing there.

    One lock covers opening and writing, so one stream is opened and each frame is written whole. The sessions of one
    pass push at the same moment: the push that gets the lock writes every push waiting by then as one Pushes frame
    (nothing waits on a timer: the lock's holder lets the tasks woken with it queue theirs, then writes). A receiver
    never writes on a push stream, so a watcher reading it sees any end at once (the receiver restarted, or dropped
    the stream after a bad frame) and forgets the stream: the next push opens a fresh one instead of writing into a
    dead one."""

    def __init__(self, host, nursery: trio.Nursery):
        self.host = host
        self._nursery = nursery  # where the watchers of its streams run
        self._lock = trio.Lock()
        self._stream = None
        self._waiting: list[OutgoingPush] = []  # pushes not yet taken by a writer

    @property
    def idle(self) -> bool:
        """No stream, and no push under way or waiting: nothing would miss the link if it were forgotten."""
        return self._stream is None and not self._lock.locked() and not self._waiting

    async def send(self, hop: NextHop, message: Push) -> None:
        """Write `message` on the open stream (with the other pushes waiting then), opening one first if there is
        none; any failure closes the stream and fails every push of the frame."""
        outgoing = OutgoingPush(message)
        self._waiting.append(outgoing)
        try:
            async with self._lock:
                if not outgoing.written:
                    await trio.lowlevel.checkpoint()  # the sessions woken by the same pass queue their pushes
                while not outgoing.written:  # frames of the oldest waiting pushes, up to this one's
                    await self._write(hop, self._take_waiting())
        finally:
            if outgoing in self._waiting:  # its writer failed or was cancelled before taking it
                self._waiting.remove(outgoing)
        if outgoing.error is not None:
            raise outgoing.error

    def _take_waiting(self) -> list[OutgoingPush]:
        count = pushes_in_frame([push_bytes(outgoing.message) for outgoing in self._waiting])
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        for outgoing in batch:
            outgoing.written = True
        return batch

    async def _write(self, hop: NextHop, batch: list[OutgoingPush]) -> None:
        try:
            if self._stream is not None and relayed_beside_direct(self.host, self._stream):
                log.debug("push stream to %s moves to the direct connection (hole punched)", hop.peer_id[:16])
                await self._drop(self._stream)  # between frames: the relayed connection closes soon
            if self._stream is None:
                self._stream = await open_push_stream(self.host, hop)
                self._nursery.start_soon(self._watch, self._stream)
                log.debug("push stream to %s opened", hop.peer_id[:16])
            stream = self._stream
            try:
                await write_message(stream, Pushes([outgoing.message for outgoing in batch]))
            except BaseException:
                await self._drop(stream)
                raise
        except BaseException as e:
            for outgoing in batch:  # the writer's own error reaches it as raised; the others hear of it too
                outgoing.error = e if isinstance(e, Exception) else PetalError(f"the push frame was not sent: {e!r}")
            raise

    async def close(self) -> None:
        if self._stream is not None:
            await self._drop(self._stream)

    async def _watch(self, stream) -> None:
        try:
            while await stream.read(1 << 16):
                pass  # a receiver that writes breaks the protocol: the stream ends here as well
        except Exception as e:  # EOF or reset: the receiver or its connection is gone
            log.debug("push stream closed by the receiver: %r", e)
        await self._drop(stream)

    async def _drop(self, stream) -> None:
        if self._stream is stream:
            self._stream = None
        with trio.CancelScope(shield=True):  # a push that timed out still closes its half-written stream
            await _close(stream)


class SpanServer:
    """Serves one span to many clients; owns the cache budget and the one compute lane."""

    def __init__(self, span: Span, options: ServingOptions, metrics: NodeMetrics | None = None):
        self.span = span
        self.options = options
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.budget = CacheBudget(options.max_cache_tokens)
        self.compute = trio.CapacityLimiter(1)  # one torch job at a time: the CPU/GPU is not oversubscribed
        # inference steps wait here for the compute lane; those queued together share forward passes
        self.steps = StepQueue(self.compute, options.max_batch_size, options.max_forward_tokens, options.batching)
        self.metrics.watch_batching(self.steps)
        self.requests = RequestQueue(
            self.compute, self.steps.lane, options.max_forward_tokens, MAX_BACKWARD_TOKENS, options.batching
        )
        self._state = ServerState.ONLINE
        self.throughput = 0.0
        self.sessions_done = trio.Event()
        self.stateless_running = 0  # forward/backward requests being read, queued or run
        self.live: dict[tuple[str, int], LiveSession] = {}
        self.push_links: dict[str, PushLink] = {}  # next server's peer id -> the link every session pushes through
        self.host = None  # the libp2p host it serves on (attach), through which it also pushes
        self._nursery: trio.Nursery | None = None  # where push links watch their streams
        self.limits = options.wire_limits()

    def attach(self, host, nursery: trio.Nursery) -> None:
        """Answer this server's protocols on `host`, and push steps to the next servers through it; the push links'
        watchers run in `nursery`."""
        self.host, self._nursery = host, nursery
        host.set_stream_handler(INFERENCE_PROTOCOL, self.handle_inference)
        host.set_stream_handler(INFO_PROTOCOL, self.handle_info)
        host.set_stream_handler(PUSH_PROTOCOL, self.handle_push)
        host.set_stream_handler(FORWARD_PROTOCOL, self.handle_forward)
        host.set_stream_handler(BACKWARD_PROTOCOL, self.handle_backward)

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def accepting(self) -> bool:
        return self._state == ServerState.ONLINE

    def stop_accepting(self) -> None:
        """Refuse new sessions and requests (OFFLINE); those open go on."""
        self._state = ServerState.OFFLINE

    def resume(self) -> None:
        """Take new sessions and requests again (ONLINE)."""
        self._state = ServerState.ONLINE

    async def drain(self, timeout: float, code: str, reason: str) -> None:
        """Stop accepting, wait at most `timeout` s for the open sessions to end, then close the rest, telling
        their clients `code` and `reason`; returns once every session's cache is freed."""
        self.stop_accepting()
        with trio.move_on_after(timeout):
            while self.budget.sessions:
                await self.sessions_done.wait()
        if self.budget.sessions:
            log.warning("drain timeout: %d sessions still open, closing them", self.budget.sessions)
            for session in list(self.live.values()):
                session.close(code, reason)
            # each session's task answers its client and frees its cache; a step in flight finishes first
            while self.budget.sessions:
                await self.sessions_done.wait()

    def swap_span(self, span: Span) -> None:
        """Serve `span` instead of the current one; only a drained server swaps (no session runs on the old span)."""
        if self.budget.sessions:
            raise RuntimeError(f"{self.budget.sessions} sessions are open: drain the server before swapping its span")
        self.span = span

    async def stop(self) -> None:
        """Stop accepting and close every push link."""
        self.stop_accepting()
        for link in self.push_links.values():
            await link.close()

    def info(self) -> ServerInfo:
        return ServerInfo(
            model=self.options.model,
            start=self.span.start,
            end=self.span.end,
            state=str(self._state),
            throughput=self.throughput,
            cache_tokens_left=self.budget.tokens_left,
            quant=self.span.quant,
            version=self.options.version,
            adapters=list(self.span.adapters),
            sessions=self.budget.sessions,
            busy=round(self.steps.lane.busy(), 3),
            active_rows=self.steps.active_rows(),
            queued_steps=self.steps.waiting,
            passes=self.steps.stats.passes,
            batched_passes=self.steps.stats.batched_passes,
        )

    async def handle_info(self, stream) -> None:
        """Answer InfoRequests on one stream until the peer closes it or goes quiet."""
        try:
            while True:
                with trio.fail_after(self.options.step_timeout):
                    await read_message(stream, self.limits, expect=(InfoRequest,))
                with trio.fail_after(WRITE_TIMEOUT):
                    await write_message(stream, self.info())
        except ProtocolError as e:
            await _send_error(stream, e.code, str(e))
        except Exception as e:  # EOF, reset, timeout: a peer's failure ends only its own stream
            log.debug("info stream ended: %r", e)
        finally:
            await _close(stream)

    async def handle_inference(self, stream) -> None:
        """One inference session: open (reserve cache), steps, close (free cache).

        Steps come from the client's stream or, with server push, from the previous server on the
        route (handle_push); both feed the session's inbox, and results always go back to the client."""
        session = None
        try:
            with trio.fail_after(self.options.step_timeout):
                request = await read_message(stream, self.limits, expect=(OpenSession,))
            session = self._open(request, stream)
            with session.scope:
                with trio.fail_after(WRITE_TIMEOUT):
                    await session.send(SessionOpened(request.session_id, self.budget.tokens_left))
                with trio.move_on_after(self.options.session_timeout) as lifetime:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_client_steps, session)
                        await self._run_steps(session)
                        nursery.cancel_scope.cancel()
                if lifetime.cancelled_caught:
                    await _send_error(session, "session_timeout", f"session exceeded {self.options.session_timeout} s")
            if session.closed_by_server is not None:
                await _send_error(session, session.closed_by_server.code, session.closed_by_server.reason)
        except (ProtocolError, CacheFullError) as e:
            await _send_error(session or stream, getattr(e, "code", "cache_full"), str(e))
        except trio.TooSlowError:
            await _send_error(session or stream, "timeout", f"no message within {self.options.step_timeout} s")
        except Exception as e:  # a peer's failure (EOF, reset) or bad data ends only its own session
            log.debug("inference session %s ended: %r", session and session.key, e)
        finally:
            if session is not None:
                if self.live.get(session.key) is session:
                    del self.live[session.key]
                self.budget.release(session.budget_id)
                if self.budget.sessions == 0:
                    self._release_memory_if_idle()
                    self.sessions_done.set()
                    self.sessions_done = trio.Event()
            await _close(stream)

    def _open(self, request: OpenSession, stream) -> LiveSession:
        self._admit(request, self.span, "sessions")
        key = (request.session_id, request.start)
        budget_id = f"{request.session_id}/{uuid.uuid4().hex[:8]}"
        self.budget.reserve(budget_id, request.batch_size * request.max_length)
        span_session = self.span.new_session(
            request.batch_size, request.max_length, request.start, request.end, request.adapter
        )
        session = LiveSession(key, budget_id, request, span_session, stream)
        self.live[key] = session  # a reopened session takes over the pushes addressed to it
        return session

    async def _read_client_steps(self, session: LiveSession) -> None:
        """Client stream -> inbox, until CloseSession or the stream ends; bad steps get an error frame."""
        try:
            while True:
                try:
                    message = await read_message(session.stream, self.limits, expect=(Step, CloseSession))
                except ProtocolError as e:
                    if e.code == "too_large":
                        raise  # the frame's bytes were not consumed: the stream cannot go on
                    await _send_error(session, e.code, str(e))  # the session and its cache are unchanged
                    continue
                if isinstance(message, CloseSession):
                    break
                await session.inbox_in.send(message)
        except ProtocolError as e:
            await _send_error(session, e.code, str(e))
        except Exception as e:  # EOF or reset: the client is gone
            log.debug("client of session %s left: %r", session.key, e)
        await session.inbox_in.aclose()

    async def _run_steps(self, session: LiveSession) -> None:
        while True:
            try:
                with trio.fail_after(self.options.step_timeout):
                    message = await session.inbox.receive()
            except trio.EndOfChannel:
                return
            except trio.TooSlowError:
                await _send_error(session, "timeout", f"no message within {self.options.step_timeout} s")
                return
            try:
                self._check_step(message, session.request, session.span_session, session.last_step)
            except ProtocolError as e:
                await _send_error(session, e.code, str(e))
                continue
            started = trio.current_time()
            step = SessionStep(
                session.span_session, message.hidden, message.attention_mask, message.prompts, message.position
            )
            hidden = await self.steps.run(self.span, step)
            session.last_step = message.step
            output = hidden.to(message.hidden.dtype)
            pushed = bool(message.push_to) and await self._push(message, output)
            with trio.fail_after(WRITE_TIMEOUT):
                await session.send(StepResult(message.step, output, pushed))
            self.metrics.step_served(message, trio.current_time() - started, pushed)

    async def _push(self, step: Step, output: torch.Tensor) -> bool:
        """Send `output` on to the next server's session; False if that failed (the client then sends it)."""
        hop, rest = step.push_to[0], step.push_to[1:]
        message = Push(
            step.step,
            output,
            step.attention_mask,
            rest,
            position=step.position,  # the next server drops the same rejected tokens
            session_id=hop.session_id,
            start=hop.start,
        )
        link = self.push_links.get(hop.peer_id)
        if link is None:
            if self._nursery is None:
                log.info("push to %s not sent: this server is attached to no host", hop.peer_id[:16])
                return False
            link = self.push_links[hop.peer_id] = PushLink(self.host, self._nursery)
        try:
            with trio.fail_after(PUSH_TIMEOUT):
                await link.send(hop, message)
            return True
        except Exception as e:  # noqa: BLE001 - any failure falls back to the client sending it
            log.info("push to %s failed: %r", hop.peer_id[:16], e)
            if link.idle and self.push_links.get(hop.peer_id) is link:
                del self.push_links[hop.peer_id]  # links to peers that cannot be reached do not pile up
            return False

    async def handle_push(self, stream) -> None:
        """Steps pushed by previous servers, for sessions open here; one stream per pushing server."""
        log.debug("push stream accepted")
        try:
            while True:
                with trio.fail_after(self.options.session_timeout):
                    message = await read_message(stream, self.limits, expect=(Push, Pushes))
                for push in message.pushes if isinstance(message, Pushes) else [message]:
                    self._deliver(push)  # all of a frame's pushes before any of their sessions runs
        except Exception as e:  # a peer's failure or bad data ends only its own push stream
            log.debug("push stream ended: %r", e)
        finally:
            await _close(stream)

    def _deliver(self, push: Push) -> None:
        """Hand a pushed step to its session's inbox; a push for a session not open here is dropped (its client
        notices the missing result and sends the step itself)."""
        session = self.live.get((push.session_id, push.start))
        if session is None:
            log.debug("push for unknown session %s/%d dropped", push.session_id, push.start)
            return
        try:
            session.inbox_in.send_nowait(push)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            log.debug("session %s/%d cannot take a pushed step", push.session_id, push.start)

    async def handle_forward(self, stream) -> None:
        """One stateless forward request (training, or a forward pass without a cache): request in, result out."""
        await self._handle_stateless(stream, ForwardRequest)

    async def handle_backward(self, stream) -> None:
        """One stateless backward request: the forward pass is recomputed, gradients w.r.t. the inputs go back."""
        await self._handle_stateless(stream, BackwardRequest)

    async def _handle_stateless(self, stream, kind: type[ForwardRequest]) -> None:
        self.stateless_running += 1
        try:
            with trio.fail_after(self.options.step_timeout):
                request = await read_message(stream, self.limits, expect=(kind,))
            span = self.span  # a server that moves swaps its span; this request runs on the one it was checked on
            layers = self._check_stateless(request, span)
            # merged with concurrent requests for the same blocks; one job at a time in the compute lane: inference
            # steps queued meanwhile run between them
            result = await self.requests.run(span, request, layers, _jobs)
            reply = _reply(request, result)
            with trio.fail_after(WRITE_TIMEOUT):
                await write_message(stream, reply)
        except ProtocolError as e:
            await _send_error(stream, e.code, str(e))
        except trio.TooSlowError:
            await _send_error(stream, "timeout", f"no request within {self.options.step_timeout} s")
        except Exception as e:  # a peer's failure (EOF, reset) or bad data ends only its own request
            log.debug("%s request ended: %r", kind.TYPE, e)
        finally:
            self.stateless_running -= 1
            self._release_memory_if_idle()
            await _close(stream)

    def _release_memory_if_idle(self) -> None:
        """Once no session is open and no request runs: hand back what malloc kept of the passes' freed temporaries
        (a quantized layer dequantizes its weight for every pass; glibc keeps such blocks in its per-thread arenas,
        tens of MB after a generation). Not after every pass: that would cost every step its time."""
        if self.budget.sessions == 0 and self.stateless_running == 0:
            release_free_memory()

    def _check_stateless(self, request: ForwardRequest, span: Span) -> slice:
        """The span's local layers for the request's blocks, after checking everything the wire cannot."""
        self._admit(request, span, "requests")
        batch, length, _ = request.hidden.shape
        if isinstance(request, BackwardRequest) and batch * length > MAX_BACKWARD_TOKENS:
            raise ProtocolError(
                f"{batch} x {length} tokens are over this server's limit of {MAX_BACKWARD_TOKENS} per backward "
                f"request: send smaller chunks",
                "too_large",
            )
        if request.hidden.shape[2] != span.hidden_size:
            raise ProtocolError(
                f"hidden states have size {request.hidden.shape[2]}, this model's are {span.hidden_size}", "bad_shape"
            )
        for name in ("hidden", "prompts", "grad_output"):
            value = getattr(request, name, None)
            if value is not None and not torch.isfinite(value).all():
                raise ProtocolError(f"{name} holds NaN or infinity", "bad_value")
        return slice(request.start - span.start, request.end - span.start)

    def _admit(self, request: OpenSession | ForwardRequest, span: Span, what: str) -> None:
        """ProtocolError unless this server takes new `what` now, for its model, blocks and adapters."""
        if not self.accepting:
            raise ProtocolError(f"this server is {self.state.lower()} and takes no new {what}", "unavailable")
        if request.model != self.options.model:
            raise ProtocolError(f"this server serves {self.options.model}, not {request.model}", "wrong_model")
        if not span.start <= request.start < request.end <= span.end:
            raise ProtocolError(
                f"blocks {request.start}:{request.end} are not served here (this server has {span.start}:{span.end})",
                "wrong_span",
            )
        try:
            span.check_adapter(request.adapter)
        except AdapterError as e:
            raise ProtocolError(str(e), "no_adapter") from e

    def _check_step(self, step: Step, request: OpenSession, span_session, last_step: int) -> None:
        batch, length, hidden_size = step.hidden.shape
        if step.step <= last_step:
            raise ProtocolError(f"step {step.step} does not follow step {last_step}", "bad_step")
        if batch != request.batch_size or hidden_size != self.span.hidden_size or length == 0:
            raise ProtocolError(
                f"hidden has shape {[batch, length, hidden_size]}, this session needs "
                f"[{request.batch_size}, tokens >= 1, {self.span.hidden_size}]",
                "bad_shape",
            )
        past = span_session.length if step.position is None else step.position  # tokens the step builds on
        if past > span_session.length:
            raise ProtocolError(
                f"step {step.step} starts at position {past}, but this session holds {span_session.length} tokens",
                "bad_position",
            )
        if past + length > request.max_length:
            raise ProtocolError(
                f"this step would make the session {past + length} tokens long, "
                f"over its max_length {request.max_length}",
                "too_long",
            )
        if not torch.isfinite(step.hidden).all():
            raise ProtocolError("hidden holds NaN or infinity", "bad_value")
        if step.prompts is not None:
            blocks = request.end - request.start
            if past != 0 or step.push_to:
                raise ProtocolError("deep prompts go only with a session's first step, and are not pushed", "bad_step")
            if step.prompts.shape[0] != blocks:
                raise ProtocolError(
                    f"prompts are for {step.prompts.shape[0]} blocks, this session runs {blocks}", "bad_shape"
                )
            if not torch.isfinite(step.prompts).all():
                raise ProtocolError("prompts hold NaN or infinity", "bad_value")


def _jobs(span: Span, request: ForwardRequest, layers: slice) -> Iterator:
    """The jobs of a checked forward or backward request (Span.forward_jobs, backward_jobs)."""
    if isinstance(request, BackwardRequest):
        return span.backward_jobs(
            request.hidden, request.grad_output, request.attention_mask, layers, request.prompts, request.adapter
        )
    return span.forward_jobs(request.hidden, request.attention_mask, layers, request.prompts, request.adapter)


def _reply(request: ForwardRequest, result) -> ForwardResult | BackwardResult:
    """The answer to `request`, given the last result of its jobs, in the request's dtypes."""
    if isinstance(request, BackwardRequest):
        grad_hidden, grad_prompts = result
        if grad_prompts is not None:
            grad_prompts = grad_prompts.to(request.prompts.dtype)
        return BackwardResult(grad_hidden.to(request.hidden.dtype), grad_prompts)
    return ForwardResult(result.to(request.hidden.dtype))


async def _send_error(target, code: str, reason: str) -> None:
    """Best effort (the peer may already be gone); `target` is a stream or a LiveSession."""
    count_error(target.stream if isinstance(target, LiveSession) else target, code)
    with trio.move_on_after(WRITE_TIMEOUT):
        try:
            if isinstance(target, LiveSession):
                await target.send(ErrorReply(code, reason))
            else:
                await write_message(target, ErrorReply(code, reason))
        except Exception as e:  # noqa: BLE001 - the peer is gone; nothing more to tell it
            log.debug("could not send error %s: %r", code, e)


async def open_push_stream(host, hop):
    """A push stream from this node to the server of `hop`, connecting first if needed."""
    if host is None:
        raise RuntimeError("this server is attached to no host: it cannot open streams")
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
    from multiaddr import Multiaddr

    peer_id = ID.from_base58(hop.peer_id)
    addrs = [info_from_p2p_addr(Multiaddr(a)).addrs[0] for a in hop.addrs if a.endswith(f"/p2p/{hop.peer_id}")]
    known = host.get_network().get_connections(peer_id)
    if known and all(conn.is_closed for conn in known):
        await host.disconnect(peer_id)  # py-libp2p keeps a dead connection listed, and connect() would not dial
    await host.connect(PeerInfo(peer_id, addrs))
    return await host.new_stream(peer_id, [PUSH_PROTOCOL])


async def _close(stream) -> None:
    with trio.move_on_after(5):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - already closed or reset by the peer
            pass
