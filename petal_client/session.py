"""Inference sessions across the swarm: one stream per server on the route, the history of every step,
and failover that replays that history to replacement servers."""

from __future__ import annotations

import functools
import logging
import uuid

import torch
import trio

from petal_client.routing import Hop, better_server, min_latency_route
from petal_client.swarm import (
    REFRESH_PERIOD,
    TRANSPORT_ERRORS,
    FailureCount,
    ServerFailure,
    ServerStatus,
    Swarm,
    SwarmView,
    describe,
    served_name,
    usable_servers,
)
from petald.errors import PetalError
from petald.p2p.wire import (
    INFERENCE_PROTOCOL,
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

log = logging.getLogger(__name__)
STEP_TIMEOUT = 120.0
MAX_FAILOVERS = 8
MOVE_COOLDOWN = 2 * REFRESH_PERIOD  # seconds after a move before the hops are weighed again (fresh loads first)


class SessionBroken(PetalError):
    """The session cannot go on (it was interrupted mid-step, or closed): open a new one."""


class RemoteSpanSession:
    """One inference session with one server over one long-lived stream (runs on the swarm's loop)."""

    def __init__(self, hop: Hop, server: ServerStatus, stream):
        self.hop = hop
        self.server = server
        self.stream = stream

    @classmethod
    async def open(cls, swarm: Swarm, server: ServerStatus, hop: Hop, request: OpenSession) -> RemoteSpanSession:
        try:
            stream = await swarm.open_stream(server, INFERENCE_PROTOCOL)
            with trio.fail_after(STEP_TIMEOUT):
                await write_message(stream, request)
                reply = await read_message(stream, Limits(), expect=(SessionOpened,))
        except TRANSPORT_ERRORS as e:
            raise ServerFailure(hop.peer_id, f"could not open a session: {describe(e)}") from e
        if isinstance(reply, ErrorReply):
            raise ServerFailure(hop.peer_id, reply.reason, reply.code)
        return cls(hop, server, stream)

    def next_hop(self, session_id: str) -> NextHop:
        """How the previous server on the route pushes to this session."""
        return NextHop(self.hop.peer_id, self.server.addrs[:8], session_id, self.hop.start)

    async def send(self, step: Step) -> None:
        try:
            with trio.fail_after(STEP_TIMEOUT):
                await write_message(self.stream, step)
        except TRANSPORT_ERRORS as e:
            raise ServerFailure(self.hop.peer_id, f"step {step.step}: {describe(e)}") from e

    async def receive(self, step_id: int, shape: torch.Size) -> StepResult:
        """This server's result for `step_id` (sent by us, or pushed to it by the previous server)."""
        try:
            with trio.fail_after(STEP_TIMEOUT):
                reply = await read_message(self.stream, Limits(), expect=(StepResult,))
        except TRANSPORT_ERRORS as e:
            raise ServerFailure(self.hop.peer_id, f"step {step_id}: {describe(e)}") from e
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
        """Tell the server the session is over (it frees the cache), then close the stream; never raises."""
        with trio.move_on_after(5, shield=True):
            try:
                await write_message(self.stream, CloseSession())
            except TRANSPORT_ERRORS:  # the server may already be gone
                pass
            try:
                await self.stream.close()
            except TRANSPORT_ERRORS:
                pass


class RemoteInferenceSession:
    """Runs steps through every block [start, end) of a model on the swarm (the BlockSession protocol).

    For every hop it keeps the inputs it sent (the history); when a server fails, it is banned, its
    blocks are routed anew, and the replacement servers rebuild their caches from that history."""

    def __init__(
        self,
        swarm: Swarm,
        model: str,
        num_blocks: int,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        push: bool = True,
        adapter: str | None = None,
    ):
        self.swarm, self.model, self.num_blocks, self.start, self.end = swarm, model, num_blocks, start, end
        self.adapter = adapter  # only servers serving this LoRA adapter are used, and they apply it
        self.push = push  # servers pass each step on to the next server; False: the client visits each (star)
        self.steps = 0
        self.pushes = 0  # hops that received their input straight from the previous server
        self.batch_size, self.max_length = batch_size, max_length
        self.session_id = uuid.uuid4().hex
        self.route: list[RemoteSpanSession] = []
        self.history: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # hop start -> inputs
        self.prompts: torch.Tensor | None = None  # deep prompts of the first step, sent again with every replay
        self.failures = FailureCount(swarm.banned, MAX_FAILOVERS)
        self.broken: str | None = None  # why the session cannot go on, once it cannot
        self.length = 0  # tokens in the servers' caches of this session (and in the history of every hop)
        self.moves = 0  # hops moved to a less loaded server at a step boundary
        self._weigh_after = 0.0  # trio time before which hops are not weighed for a move again

    @property
    def failovers(self) -> int:
        return self.failures.failures

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        """Run new tokens through every block; `prompts` [blocks, B or 1, P, H] (deep prompts) only with the
        first step. With `position`, the new tokens follow the first `position` tokens of the session: the
        servers drop the rest of their caches (a rewind, e.g. of rejected draft tokens), and so does the history."""
        if self.broken:
            raise SessionBroken(f"this inference session {self.broken}: open a new one")
        if position is not None and not 0 <= position <= self.length:
            raise PetalError(f"cannot start a step at position {position}: the session holds {self.length} tokens")
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if prompts is not None:
            if self.steps:
                raise PetalError("deep prompts go only with a session's first step")
            self.prompts = prompts.detach().float()
        return self.swarm.run(self._step, hidden, attention_mask.long(), prompts is not None, position)

    def close(self) -> None:
        """Close the session on every server (they free its cache); the session cannot be used after."""
        self.broken = self.broken or "was closed"
        if self.route:
            self.swarm.run(self._close)

    async def _close(self) -> None:
        route, self.route = self.route, []
        for session in route:
            await session.close()

    async def _step(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, with_prompts: bool, position: int | None
    ) -> torch.Tensor:
        try:
            if position is not None and position < self.length:
                self._rewind_history(position)
            else:
                position = None  # nothing to drop: an ordinary step
            output = await self._run_step(hidden, attention_mask, with_prompts, rewind_to=position)
            self.length += hidden.shape[1]
            return output
        except trio.Cancelled:
            # stopped mid-step (Ctrl-C): the servers' caches no longer match the history; free them
            self.broken = "was interrupted in the middle of a step"
            await self._close()
            raise

    def _rewind_history(self, position: int) -> None:
        """Keep the first `position` tokens of every hop's history (what a replay rebuilds after a rewind)."""
        for block, inputs in self.history.items():
            kept, length = [], 0
            for hidden, mask in inputs:
                if length + hidden.shape[1] > position:
                    hidden, mask = hidden[:, : position - length], mask[:, : position - length]
                if hidden.shape[1]:
                    kept.append((hidden, mask))
                length += hidden.shape[1]
            self.history[block] = kept
        self.length = position

    async def _run_step(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, with_prompts: bool, rewind_to: int | None
    ) -> torch.Tensor:
        view = await self.swarm.watch(self.model, self.num_blocks)
        if not self.route:
            self.route = await self._open_route(self.start, self.end)
        elif self.length and trio.current_time() >= self._weigh_after:
            await self._move_to_better_servers(view, replay_id=2 * (self.steps + 1))
        # ids are odd for steps, even for replays, so a replay fits before the step that needs it
        self.steps += 1
        step_id = 2 * self.steps + 1
        block, position, arrived = self.start, 0, False  # arrived: the hop got this step by push already
        while block < self.end:
            session = self.route[position]
            # re-checked at every step: a server that went OFFLINE (draining), stopped answering pings or
            # left the DHT, or moved off these blocks, is replaced before it is asked for anything
            status = view.servers.get(session.hop.peer_id)
            if not arrived and not _still_serves(status, session.hop):
                state = "gone from the swarm" if status is None else _state_words(status, session.hop)
                await self._replace(position, ServerFailure(session.hop.peer_id, state, "moved"), step_id - 1)
                continue
            try:
                if not arrived:
                    # a step with deep prompts goes hop by hop: each server needs its own blocks' prompts
                    push = self.push and not with_prompts
                    onward = [s.next_hop(self.session_id) for s in self.route[position + 1 :]] if push else []
                    prompts = self._prompts_of(session.hop) if with_prompts else None
                    # a replacement rebuilt from the (rewound) history needs no rewind: its cache is that long already
                    await session.send(Step(step_id, hidden, attention_mask, onward, prompts, rewind_to))
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
        # a relayed connection that broke may be the relay's failure, not the server's: it is not banned, and is
        # dialled again (through another relay); if the server is gone that dial fails at once, and bans it
        relayed = self.swarm.reached_through_relay(failed.hop.peer_id)
        log.warning(
            "%s; routing blocks %d:%d %s", failure, failed.hop.start, failed.hop.end, "anew" if relayed else "around it"
        )
        self.failures.record(failure, ban=not relayed)
        while True:
            replacement = await self._open_route(failed.hop.start, failed.hop.end)
            try:
                await self._replay(replacement, replay_id)
                break
            except ServerFailure as again:
                for session in replacement:
                    await session.close()
                self.failures.record(again)
        self.route[position : position + 1] = replacement

    async def _move_to_better_servers(self, view: SwarmView, replay_id: int) -> None:
        """At a step boundary (nothing sent yet): move each hop whose server is clearly slower now than another
        holding the same blocks (routing.better_server), replaying the hop's history there; the old server's
        session is closed. A move that fails leaves the hop where it was."""
        usable = usable_servers(view, self.swarm.banned, self.adapter)
        candidates = [status.span() for status in usable.values()]
        for position, session in enumerate(self.route):
            current = usable.get(session.hop.peer_id)
            if current is None or not _still_serves(current, session.hop):
                continue  # not a move: the step's own checks replace it
            target = better_server(
                current.span(),
                candidates,
                session.hop,
                tokens=self.length,
                remaining_steps=self.max_length - self.length,
                cache_tokens_needed=self.batch_size * self.max_length,
            )
            if target is None:
                continue
            moved = None
            try:
                hop = Hop(target.peer_id, session.hop.start, session.hop.end)
                moved = await self._open_hop(usable[target.peer_id], hop)
                await self._replay([moved], replay_id)
            except ServerFailure as failure:
                log.info("moving blocks %d:%d failed, staying: %s", session.hop.start, session.hop.end, failure)
                if moved is not None:
                    await moved.close()
                continue
            log.info(
                "blocks %d:%d moved from %s (busy %.0f%%) to %s (busy %.0f%%)",
                session.hop.start,
                session.hop.end,
                current.peer_id[-8:],
                100 * current.busy,
                target.peer_id[-8:],
                100 * target.busy,
            )
            await session.close()
            self.route[position] = moved
            self.moves += 1
            self._weigh_after = trio.current_time() + MOVE_COOLDOWN

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

    async def _open_hop(self, server: ServerStatus, hop: Hop) -> RemoteSpanSession:
        """This session's part on `server` for the blocks of `hop` (ServerFailure if it cannot be opened)."""
        request = OpenSession(
            self.model, hop.start, hop.end, self.batch_size, self.max_length, self.session_id, self.adapter
        )
        return await RemoteSpanSession.open(self.swarm, server, hop, request)

    async def _open_route(self, start: int, end: int) -> list[RemoteSpanSession]:
        """Sessions on the best route through [start, end); servers that fail to open are banned and avoided."""
        choose = functools.partial(
            min_latency_route,
            start=start,
            end=end,
            cache_tokens_needed=self.batch_size * self.max_length,
            model=served_name(self.model, self.adapter),
        )
        while True:
            route, usable = await self.swarm.route(self.model, self.num_blocks, self.adapter, choose)
            sessions: list[RemoteSpanSession] = []
            try:
                for hop in route:
                    sessions.append(await self._open_hop(usable[hop.peer_id], hop))
                return sessions
            except ServerFailure as failure:
                for session in sessions:
                    await session.close()
                self.failures.record(failure)


def _still_serves(status: ServerStatus | None, hop: Hop) -> bool:
    """Whether the server of `hop`, as last seen, can still run it: ONLINE and still holding its blocks."""
    return status is not None and status.usable and status.start <= hop.start and hop.end <= status.end


def _state_words(status: ServerStatus, hop: Hop) -> str:
    if status.usable:
        return f"moved to blocks {status.start}:{status.end}"
    return str(status.state).lower()
