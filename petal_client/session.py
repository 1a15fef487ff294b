"""Inference sessions across the swarm: one stream per server on the route, the history of every step,
and failover that replays that history to replacement servers."""

from __future__ import annotations

import logging
import uuid

import torch
import trio

from petal_client.routing import Hop, MissingBlocksError, min_latency_route
from petal_client.swarm import MISSING_REREADS, Swarm, served_name, usable_servers
from petald.errors import PetalError
from petald.p2p.dht import ServerEntry
from petald.p2p.wire import (
    CloseSession,
    ErrorReply,
    Limits,
    NextHop,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    read_message,
    write_message,
)
from petald.serving.handlers import INFERENCE_PROTOCOL

log = logging.getLogger(__name__)
STEP_TIMEOUT = 120.0
MAX_FAILOVERS = 8


class ServerFailure(PetalError):
    """A server failed during a session (error reply, closed stream, or timeout)."""

    def __init__(self, peer_id: str, reason: str, code: str = "failure"):
        super().__init__(f"server {peer_id[:16]}… failed: {reason}")
        self.peer_id = peer_id
        self.code = code


class RemoteSpanSession:
    """One inference session with one server over one long-lived stream (runs on the swarm's loop)."""

    def __init__(self, hop: Hop, entry: ServerEntry, stream):
        self.hop = hop
        self.entry = entry
        self.stream = stream

    @classmethod
    async def open(cls, swarm: Swarm, entry: ServerEntry, hop: Hop, request: OpenSession) -> RemoteSpanSession:
        try:
            stream = await swarm.open_stream(entry, INFERENCE_PROTOCOL)
            with trio.fail_after(STEP_TIMEOUT):
                await write_message(stream, request)
                reply = await read_message(stream, Limits(), expect=(SessionOpened,))
        except Exception as e:
            raise ServerFailure(hop.peer_id, f"could not open a session: {e!r}") from e
        if isinstance(reply, ErrorReply):
            raise ServerFailure(hop.peer_id, reply.reason, reply.code)
        return cls(hop, entry, stream)

    def next_hop(self, session_id: str) -> NextHop:
        """How the previous server on the route pushes to this session."""
        return NextHop(self.hop.peer_id, self.entry.addrs[:8], session_id, self.hop.start)

    async def send(self, step: Step) -> None:
        try:
            with trio.fail_after(STEP_TIMEOUT):
                await write_message(self.stream, step)
        except Exception as e:
            raise ServerFailure(self.hop.peer_id, f"step {step.step}: {e!r}") from e

    async def receive(self, step_id: int, shape: torch.Size) -> StepResult:
        """This server's result for `step_id` (sent by us, or pushed to it by the previous server)."""
        try:
            with trio.fail_after(STEP_TIMEOUT):
                reply = await read_message(self.stream, Limits(), expect=(StepResult,))
        except Exception as e:
            raise ServerFailure(self.hop.peer_id, f"step {step_id}: {e!r}") from e
        if isinstance(reply, ErrorReply):
            raise ServerFailure(self.hop.peer_id, reply.reason, reply.code)
        if reply.step != step_id or reply.hidden.shape != shape:
            raise ServerFailure(self.hop.peer_id, f"answered step {reply.step} {list(reply.hidden.shape)}")
        return reply

    async def step(
        self, step_id: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None, prompts: torch.Tensor | None
    ) -> torch.Tensor:
        await self.send(Step(step_id, hidden, attention_mask, prompts=prompts))
        return (await self.receive(step_id, hidden.shape)).hidden

    async def close(self) -> None:
        with trio.move_on_after(5):
            try:
                await write_message(self.stream, CloseSession())
                await self.stream.close()
            except Exception:  # noqa: BLE001 - the server may already be gone
                pass


class RemoteInferenceSession:
    """Runs steps through every block [start, end) of a model on the swarm (the BlockSession protocol).

    For every hop it keeps the inputs it sent (the history); when a server fails, it is banned, its
    blocks are routed anew, and the replacement servers rebuild their caches from that history."""

    def __init__(
        self,
        swarm: Swarm,
        model: str,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        push: bool = True,
        adapter: str | None = None,
    ):
        self.swarm, self.model, self.start, self.end = swarm, model, start, end
        self.adapter = adapter  # only servers serving this LoRA adapter are used, and they apply it
        self.push = push  # servers pass each step on to the next server; False: the client visits each (star)
        self.steps = 0
        self.pushes = 0  # hops that received their input straight from the previous server
        self.batch_size, self.max_length = batch_size, max_length
        self.session_id = uuid.uuid4().hex
        self.route: list[RemoteSpanSession] = []
        self.history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # hop start -> inputs
        self.prompts: torch.Tensor | None = None  # deep prompts of the first step, sent again with every replay
        self.failovers = 0

    def step(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run new tokens through every block; `prompts` [blocks, B or 1, P, H] (deep prompts) only with the
        first step."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if prompts is not None:
            if self.steps:
                raise PetalError("deep prompts go only with a session's first step")
            self.prompts = prompts.detach().float()
        return self.swarm.run(self._step, hidden, attention_mask.long(), prompts is not None)

    def close(self) -> None:
        self.swarm.run(self._close)

    async def _close(self) -> None:
        for session in self.route:
            await session.close()
        self.route = []

    async def _step(self, hidden: torch.Tensor, attention_mask: torch.Tensor, with_prompts: bool) -> torch.Tensor:
        view = await self.swarm.watch(self.model, range(self.start, self.end))
        if not self.route:
            self.route = await self._open_route(self.start, self.end)
        # ids are odd for steps, even for replays, so a replay fits before the step that needs it
        self.steps += 1
        step_id = 2 * self.steps + 1
        block, position, arrived = self.start, 0, False  # arrived: the hop got this step by push already
        while block < self.end:
            session = self.route[position]
            # re-checked at every step: a server that went OFFLINE (draining), stopped answering pings or
            # left the DHT is replaced before it is asked for anything
            status = view.servers.get(session.hop.peer_id)
            if not arrived and (status is None or not status.usable):
                state = "gone from the swarm" if status is None else status.state.lower()
                await self._replace(position, ServerFailure(session.hop.peer_id, state, "moved"), step_id - 1)
                continue
            try:
                if not arrived:
                    # a step with deep prompts goes hop by hop: each server needs its own blocks' prompts
                    push = self.push and not with_prompts
                    onward = [s.next_hop(self.session_id) for s in self.route[position + 1 :]] if push else []
                    prompts = self._prompts_of(session.hop) if with_prompts else None
                    await session.send(Step(step_id, hidden, attention_mask, onward, prompts))
                result = await session.receive(step_id, hidden.shape)
            except ServerFailure as failure:
                await self._replace(position, failure, step_id - 1)
                arrived = False
                continue  # retry this hop with its replacement(s), the client sending the step
            self.history.setdefault(block, []).append((hidden, attention_mask))
            hidden, block, position, arrived = result.hidden, session.hop.end, position + 1, result.pushed
            self.pushes += arrived
        return hidden

    async def _replace(self, position: int, failure: ServerFailure, replay_id: int) -> None:
        """Ban the failed server, route its blocks anew and replay their history to the new servers."""
        failed = self.route[position]
        await failed.close()
        log.warning("%s; routing blocks %d:%d around it", failure, failed.hop.start, failed.hop.end)
        self._count_failure(failure)
        while True:
            replacement = await self._open_route(failed.hop.start, failed.hop.end)
            try:
                await self._replay(replacement, replay_id)
                break
            except ServerFailure as again:
                for session in replacement:
                    await session.close()
                self._count_failure(again)
        self.route[position : position + 1] = replacement

    def _count_failure(self, failure: ServerFailure) -> None:
        self.failovers += 1
        if self.failovers > MAX_FAILOVERS:
            raise PetalError(f"gave up after {MAX_FAILOVERS} server failures; last: {failure}") from failure
        self.swarm.banned.ban(failure.peer_id)

    async def _replay(self, replacement: list[RemoteSpanSession], replay_id: int) -> None:
        """Send every past input of the replaced blocks through `replacement` as one prefill."""
        past = self.history.get(replacement[0].hop.start)
        if not past:
            return
        hidden = torch.cat([h for h, _ in past], dim=1)
        mask = torch.cat([m for _, m in past], dim=1)
        for session in replacement:
            if session is not replacement[0]:
                self.history[session.hop.start] = [(hidden, mask)]  # a new boundary: its inputs so far
            hidden = await session.step(replay_id, hidden, mask, self._prompts_of(session.hop))

    def _prompts_of(self, hop: Hop) -> torch.Tensor | None:
        """The deep prompts of the blocks of `hop` (None without deep prompts)."""
        if self.prompts is None:
            return None
        return self.prompts[hop.start - self.start : hop.end - self.start]

    async def _open_route(self, start: int, end: int) -> list[RemoteSpanSession]:
        """Sessions on the best route through [start, end); servers that fail to open are banned and avoided."""
        blocks = range(self.start, self.end)
        view = await self.swarm.watch(self.model, blocks)
        needed = self.batch_size * self.max_length
        rereads = 0
        while True:
            usable = usable_servers(view, self.swarm.banned, self.adapter)
            what = served_name(self.model, self.adapter)
            try:
                route = min_latency_route(
                    [s.span() for s in usable.values()], start, end, cache_tokens_needed=needed, model=what
                )
            except MissingBlocksError:
                rereads += 1
                if rereads > MISSING_REREADS:
                    raise
                await self.swarm.reread(self.model, blocks, view, rereads)  # the view may predate a new server
                continue
            sessions: list[RemoteSpanSession] = []
            try:
                for hop in route:
                    request = OpenSession(
                        self.model, hop.start, hop.end, self.batch_size, self.max_length, self.session_id, self.adapter
                    )
                    sessions.append(await RemoteSpanSession.open(self.swarm, usable[hop.peer_id].entry, hop, request))
                return sessions
            except ServerFailure as failure:
                for session in sessions:
                    await session.close()
                self._count_failure(failure)
