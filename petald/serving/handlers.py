"""Protocol handlers of a serving node: inference sessions over long-lived streams, and info (which is also a ping).

Each handler validates every message (petald.p2p.wire), bounds every wait with a deadline, runs torch
work off the event loop, and answers bad input with an error frame: nothing a peer sends can crash the
node or touch another session."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import torch
import trio

from petald.p2p.wire import (
    CloseSession,
    ErrorReply,
    InfoRequest,
    Limits,
    OpenSession,
    ProtocolError,
    ServerInfo,
    SessionOpened,
    Step,
    StepResult,
    read_message,
    write_message,
)
from petald.serving.cache import CacheBudget, CacheFullError
from petald.serving.span import Span

log = logging.getLogger(__name__)

INFERENCE_PROTOCOL = "/petal/inference/1.0.0"
INFO_PROTOCOL = "/petal/info/1.0.0"
WRITE_TIMEOUT = 30.0


@dataclass
class ServingOptions:
    model: str  # the model's name in the swarm
    max_cache_tokens: int = 16384
    max_batch_size: int = 64
    max_tensor_bytes: int = 128 * 2**20
    step_timeout: float = 300.0  # longest wait for a session's next step
    session_timeout: float = 1800.0  # longest life of one session
    version: str = ""


class SpanServer:
    """Serves one span to many clients; owns the cache budget and the one compute lane."""

    def __init__(self, span: Span, options: ServingOptions):
        self.span = span
        self.options = options
        self.budget = CacheBudget(options.max_cache_tokens)
        self.compute = trio.CapacityLimiter(1)  # one torch job at a time: the CPU/GPU is not oversubscribed
        self.state = "ONLINE"
        self.throughput = 0.0
        self.sessions_done = trio.Event()
        # max_length stays the protocol's own bound: the budget check answers a too-long session with
        # "cache_full" and the room left, which a client can act on
        self.limits = Limits(max_tensor_bytes=options.max_tensor_bytes, max_batch_size=options.max_batch_size)

    @property
    def accepting(self) -> bool:
        return self.state == "ONLINE"

    def info(self) -> ServerInfo:
        return ServerInfo(
            model=self.options.model,
            start=self.span.start,
            end=self.span.end,
            state=self.state,
            throughput=self.throughput,
            cache_tokens_left=self.budget.tokens_left,
            quant=self.span.quant,
            version=self.options.version,
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
        """One inference session: open (reserve cache), steps, close (free cache)."""
        session_id = None
        try:
            with trio.fail_after(self.options.step_timeout):
                request = await read_message(stream, self.limits, expect=(OpenSession,))
            session_id = f"{request.session_id}/{uuid.uuid4().hex[:8]}"
            span_session = self._open(request, session_id)
            with trio.fail_after(WRITE_TIMEOUT):
                await write_message(stream, SessionOpened(request.session_id, self.budget.tokens_left))
            with trio.move_on_after(self.options.session_timeout) as lifetime:
                await self._serve_steps(stream, request, span_session)
            if lifetime.cancelled_caught:
                await _send_error(stream, "session_timeout", f"session exceeded {self.options.session_timeout} s")
        except (ProtocolError, CacheFullError) as e:
            await _send_error(stream, getattr(e, "code", "cache_full"), str(e))
        except trio.TooSlowError:
            await _send_error(stream, "timeout", f"no message within {self.options.step_timeout} s")
        except Exception as e:  # a peer's failure (EOF, reset) or bad data ends only its own session
            log.debug("inference session %s ended: %r", session_id, e)
        finally:
            if session_id is not None:
                self.budget.release(session_id)
                if self.budget.sessions == 0:
                    self.sessions_done.set()
                    self.sessions_done = trio.Event()
            await _close(stream)

    def _open(self, request: OpenSession, session_id: str):
        if not self.accepting:
            raise ProtocolError(f"this server is {self.state.lower()} and takes no new sessions", "unavailable")
        if request.model != self.options.model:
            raise ProtocolError(f"this server serves {self.options.model}, not {request.model}", "wrong_model")
        if not self.span.start <= request.start < request.end <= self.span.end:
            raise ProtocolError(
                f"blocks {request.start}:{request.end} are not served here (this server has "
                f"{self.span.start}:{self.span.end})",
                "wrong_span",
            )
        self.budget.reserve(session_id, request.batch_size * request.max_length)
        return self.span.new_session(request.batch_size, request.max_length, request.start, request.end)

    async def _serve_steps(self, stream, request: OpenSession, span_session) -> None:
        last_step = -1
        while True:
            try:
                with trio.fail_after(self.options.step_timeout):
                    message = await read_message(stream, self.limits, expect=(Step, CloseSession))
                if isinstance(message, CloseSession):
                    return
                self._check_step(message, request, span_session, last_step)
            except ProtocolError as e:
                if e.code == "too_large":
                    raise  # the frame's bytes were not consumed: the stream cannot go on
                await _send_error(stream, e.code, str(e))  # the session and its cache are unchanged
                continue
            hidden = await trio.to_thread.run_sync(
                self.span.step, span_session, message.hidden, message.attention_mask, limiter=self.compute
            )
            last_step = message.step
            with trio.fail_after(WRITE_TIMEOUT):
                await write_message(stream, StepResult(message.step, hidden.to(message.hidden.dtype)))

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
        if span_session.length + length > request.max_length:
            raise ProtocolError(
                f"this step would make the session {span_session.length + length} tokens long, "
                f"over its max_length {request.max_length}",
                "too_long",
            )
        if not torch.isfinite(step.hidden).all():
            raise ProtocolError("hidden holds NaN or infinity", "bad_value")


async def _send_error(stream, code: str, reason: str) -> None:
    """Best effort: the peer may already be gone."""
    with trio.move_on_after(WRITE_TIMEOUT):
        try:
            await write_message(stream, ErrorReply(code, reason))
        except Exception as e:  # noqa: BLE001 - the peer is gone; nothing more to tell it
            log.debug("could not send error %s: %r", code, e)


async def _close(stream) -> None:
    with trio.move_on_after(5):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - already closed or reset by the peer
            pass
