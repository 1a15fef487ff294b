"""The client's window on the swarm: a libp2p host and a DHT node in a background trio thread.

The client library is synchronous (Hugging Face style); all networking runs on one trio event loop in a
daemon thread, and sync code calls into it with `Swarm.run`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from petal_client.routing import Hop, MissingBlocksError, ServerSpan, missing_blocks
from petald.errors import PetalError
from petald.p2p.dht import ServerEntry, ServerState, SwarmDHT, SwarmReadError, open_swarm_dht
from petald.p2p.host import load_or_create_identity, open_host
from petald.p2p.swarm_map import current_entries, serving
from petald.p2p.wire import INFO_PROTOCOL, InfoRequest, Limits, ProtocolError, ServerInfo, read_message, write_message

log = logging.getLogger(__name__)
T = TypeVar("T")
START_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
REFRESH_PERIOD = 5.0  # seconds between background pings of the servers of a model in use
DHT_READ_PERIOD = 30.0  # seconds between background DHT reads for it (new servers; a read costs far more than pings)
PING_TIMEOUT = 3.0  # a server already answered: a ping over its open connection
FIRST_PING_TIMEOUT = 10.0  # a server never answered yet: the ping also dials it (TCP, Noise, Yamux)
MISSING_REREADS = 3  # DHT re-reads (after 0.5, 1, 2 s) before blocks are declared served by no one
BAN_SECONDS = 15.0
RTT_SMOOTHING = 0.2  # weight of a new RTT sample in the moving average
CANCEL_TIMEOUT = 5.0  # longest wait for a call cancelled by Ctrl-C to finish (closing its streams)
PARALLEL_PINGS = 32  # pings of one refresh in flight at once
MAX_NEW_PINGS = 64  # servers that never answered, pinged per refresh (a flood of fake entries costs this much)
ANNOUNCED = {str(state) for state in (ServerState.JOINING, ServerState.ONLINE, ServerState.OFFLINE)}


@dataclass
class BanList:
    """Servers that failed recently: each is avoided for a while, twice as long at each new failure."""

    until: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer_id: str) -> None:
        self.strikes[peer_id] = self.strikes.get(peer_id, 0) + 1
        self.until[peer_id] = time.monotonic() + BAN_SECONDS * 2 ** (self.strikes[peer_id] - 1)

    def __contains__(self, peer_id: str) -> bool:
        return self.until.get(peer_id, 0) > time.monotonic()


class ServerFailure(PetalError):
    """A server failed a request (error reply, closed stream, timeout): it is banned and routed around."""

    def __init__(self, peer_id: str, reason: str, code: str = "failure"):
        super().__init__(f"server {peer_id[:16]}… failed: {reason}")
        self.peer_id = peer_id
        self.code = code


# What the network can raise while talking to a server: a server's failure. Anything else is a bug here, and
# must not ban a healthy server (ProtocolError: the server sent something malformed).
TRANSPORT_ERRORS = (
    BaseLibp2pError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    EOFError,
    OSError,
    ProtocolError,
)


def describe(error: BaseException) -> str:
    """A transport error in words a user can act on (not a raw exception repr)."""
    if isinstance(error, trio.TooSlowError):
        return "it did not answer in time (overloaded, or the network is slow)"
    if isinstance(error, (EOFError, StreamReset, trio.BrokenResourceError, trio.ClosedResourceError)):
        return "it closed the connection (it stopped, restarted or dropped this client)"
    if isinstance(error, ProtocolError):
        return f"it sent a malformed reply ({error})"
    if isinstance(error, OSError):
        return f"it could not be reached ({error.strerror or error})"
    text = str(error) or type(error).__name__
    return f"the connection to it failed ({text})"


@dataclass
class ServerStatus:
    """What the client knows of one server: where to reach it and, from its own latest answer to a ping, its
    span, state and free cache (a server that moved is routed on its new span at once)."""

    peer_id: str
    addrs: list[str]
    start: int
    end: int
    throughput: float
    adapters: tuple[str, ...]
    state: ServerState  # as the server answered; UNREACHABLE when it did not answer the last ping
    cache_tokens_left: int
    rtt: float | None = None
    busy: float = 0.0  # fraction of recent time its compute lane ran, as it answered the last ping

    @classmethod
    def announced(cls, entry: ServerEntry) -> ServerStatus:
        """What a DHT entry claims, before the server has answered a ping."""
        return cls(
            entry.peer_id,
            list(entry.addrs),
            entry.start,
            entry.end,
            entry.throughput,
            tuple(entry.adapters),
            ServerState(entry.state),
            entry.cache_tokens_left,
        )

    def answered(self, info: ServerInfo, rtt: float) -> ServerStatus:
        """This server as it just described itself."""
        smoothed = rtt if self.rtt is None else (1 - RTT_SMOOTHING) * self.rtt + RTT_SMOOTHING * rtt
        state = ServerState(info.state) if info.state in ANNOUNCED else ServerState.UNREACHABLE
        return dataclasses.replace(
            self,
            start=info.start,
            end=info.end,
            throughput=info.throughput,
            adapters=tuple(info.adapters),
            state=state,
            cache_tokens_left=info.cache_tokens_left,
            rtt=smoothed,
            busy=info.busy,
        )

    @property
    def usable(self) -> bool:
        return self.state == ServerState.ONLINE

    def serves(self, adapter: str | None) -> bool:
        """Whether this server can run its blocks with `adapter` (None: the base weights, which all can)."""
        return adapter is None or adapter in self.adapters

    def span(self) -> ServerSpan:
        return ServerSpan(
            self.peer_id, self.start, self.end, self.throughput, self.cache_tokens_left, self.rtt, self.busy
        )


@dataclass
class SwarmView:
    """The servers of one model, over all its blocks, as last seen (DHT read + pings), refreshed in the
    background. Only the swarm's refresh writes `servers`, one refresh at a time (`reading`)."""

    model: str
    num_blocks: int
    servers: dict[str, ServerStatus] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)  # set once the first read has finished
    reading: trio.Lock = field(default_factory=trio.Lock)  # one refresh at a time: no storm of DHT reads
    reads: int = 0  # refreshes done so far
    answered: bool = False  # whether the last DHT read got an answer for every block


def usable_servers(view: SwarmView, banned: BanList, adapter: str | None) -> dict[str, ServerStatus]:
    """The servers of `view` a route may use: ONLINE, not banned, and serving `adapter` (if one is asked for)."""
    return {p: s for p, s in view.servers.items() if s.usable and p not in banned and s.serves(adapter)}


def served_name(model: str, adapter: str | None) -> str:
    """How errors name what is routed: the model, with its adapter if one is asked for."""
    return model if adapter is None else f"{model} with adapter {adapter!r}"


class SwarmError(PetalError):
    """The swarm could not be reached or did not answer."""


class FailureCount:
    """The server failures one call has met: each failed server is banned swarm-wide; past `limit`, give up."""

    def __init__(self, banned: BanList, limit: int):
        self.banned, self.limit, self.failures = banned, limit, 0

    def record(self, failure: ServerFailure, ban: bool = True) -> None:
        self.failures += 1
        if self.failures > self.limit:
            raise PetalError(f"gave up after {self.limit} server failures; last: {failure}") from failure
        if ban:
            self.banned.ban(failure.peer_id)


class Swarm:
    """A running client host + DHT. Use as a context manager, or call `close()`."""

    def __init__(
        self, initial_peers: list[str], start_timeout: float = START_TIMEOUT, refresh_period: float = REFRESH_PERIOD
    ):
        if not initial_peers:
            raise SwarmError("give initial_peers: the multiaddrs (/ip4/.../tcp/P/p2p/ID) of peers in the swarm")
        for addr in initial_peers:
            if not isinstance(addr, str) or "/p2p/" not in addr:
                raise SwarmError(
                    f"initial peer {addr!r} is not a multiaddr like /ip4/203.0.113.7/tcp/31330/p2p/12D3Koo…"
                )
        self.initial_peers = list(initial_peers)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.host = None
        self.dht: SwarmDHT | None = None
        self.refresh_period = refresh_period
        self.views: dict[str, SwarmView] = {}  # model -> what we last saw of its servers
        self._nursery: trio.Nursery | None = None
        self.banned = BanList()
        self._thread = threading.Thread(target=self._thread_main, name="petal-swarm", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise SwarmError(f"could not join the swarm within {start_timeout} s")
        if self._error is not None:
            raise SwarmError(f"could not join the swarm through {', '.join(initial_peers)}: {self._error}")

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - reported to the thread that waits for start-up
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_host(load_or_create_identity(None), ("127.0.0.1", 0)) as host:
            async with open_swarm_dht(host, self.initial_peers, client=True) as dht, trio.open_nursery() as nursery:
                self.host, self.dht, self._nursery = host, dht, nursery
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        self._error = SwarmError("the swarm connection was closed")

    def run(self, fn: Callable[..., Awaitable[T]], *args) -> T:
        """Run `fn(*args)` on the swarm's event loop and return its result (from a sync thread).

        If the calling thread is interrupted (Ctrl-C) while it waits, the call is cancelled on the loop, and
        waited for (a few seconds at most), before the interrupt goes on: no task is left running behind it."""
        if self._error is not None or self._token is None:
            raise SwarmError(f"the swarm connection is down: {self._error}")
        done: concurrent.futures.Future = concurrent.futures.Future()
        scope = trio.CancelScope()

        async def call() -> None:
            with scope:
                try:
                    done.set_result(await fn(*args))
                except trio.Cancelled:
                    done.set_exception(SwarmError("the call was cancelled (interrupted, or the swarm was closed)"))
                    raise
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
                    done.set_exception(e)
            if not done.done():  # cancelled before it started
                done.set_exception(SwarmError("the call was cancelled (interrupted, or the swarm was closed)"))

        try:
            trio.from_thread.run_sync(self._nursery.start_soon, call, trio_token=self._token)
        except trio.RunFinishedError as e:
            raise SwarmError("the swarm connection is closed") from e
        try:
            return done.result()
        except BaseException:
            if not done.done():  # interrupted while waiting: cancel the call, so it stops using its streams
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
                with contextlib.suppress(BaseException):
                    done.exception(timeout=CANCEL_TIMEOUT)
            raise

    def close(self) -> None:
        """Leave the swarm: every call still running is cancelled, the host stops."""
        if self._token is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(timeout=10)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- on the event loop

    async def watch(self, model: str, num_blocks: int) -> SwarmView:
        """The live view of all `num_blocks` blocks of `model`; the first call reads it, then a background task
        keeps it fresh. Every caller shares the one view of a model."""
        view = self.views.get(model)
        if view is None:
            view = self.views[model] = SwarmView(model, num_blocks)
            self._nursery.start_soon(self._keep_fresh, view)
            try:
                await self.refresh(view)
            finally:
                view.ready.set()
        else:
            await view.ready.wait()  # callers that came during the first read use its result
        return view

    async def _keep_fresh(self, view: SwarmView) -> None:
        last_read = trio.current_time()
        while True:
            await trio.sleep(self.refresh_period)
            read_dht = trio.current_time() - last_read >= DHT_READ_PERIOD - self.refresh_period / 2
            try:
                await self.refresh(view, read_dht=read_dht or not view.answered)
                last_read = trio.current_time() if read_dht else last_read
            except Exception as e:  # noqa: BLE001 - the next refresh tries again; routing uses the last view
                log.debug("refreshing the view of %s failed: %r", view.model, e)

    async def refresh(self, view: SwarmView, read_dht: bool = True, unless_since: int | None = None) -> None:
        """Ping every known server for its span, state, free cache and RTT; first read who is announced from the
        DHT, or (without `read_dht`) take the servers of the last view. One refresh of a view runs at a time;
        with `unless_since`, none runs if the view was refreshed since its `reads` was that."""
        async with view.reading:
            if unless_since is None or view.reads == unless_since:
                await self._refresh(view, read_dht)
                view.reads += 1

    async def _refresh(self, view: SwarmView, read_dht: bool) -> None:
        known = dict(view.servers)
        candidates = known
        if read_dht:
            try:
                found = await self.dht.get_servers(view.model, range(view.num_blocks))
                view.answered = True
                candidates = {}  # the swarm answered: who it does not list is gone
            except SwarmReadError as e:
                # not an empty answer: keep every server known so far, ask them and the initial peers directly
                log.info("%s; asking the servers already known", e)
                found, view.answered = e.found, False
                candidates = {**known, **await self._initial_servers(view.model, known)}
            for peer_id, entry in serving(current_entries(found)).items():
                status = ServerStatus.announced(entry)
                old = known.get(peer_id)
                candidates[peer_id] = status if old is None else dataclasses.replace(status, rtt=old.rtt)
        statuses: dict[str, ServerStatus] = {}
        limiter = trio.CapacityLimiter(PARALLEL_PINGS)

        async def ping(status: ServerStatus) -> None:
            async with limiter:
                await ping_one(status)

        async def ping_one(status: ServerStatus) -> None:
            try:
                started = trio.current_time()
                info = await self.ping(status)
                if info.model == view.model:
                    statuses[status.peer_id] = status.answered(info, trio.current_time() - started)
                return
            except (*TRANSPORT_ERRORS, SwarmError) as e:  # an unreachable server is simply not routed through
                log.debug("ping %s failed: %r", status.peer_id, e)
            statuses[status.peer_id] = dataclasses.replace(status, state=ServerState.UNREACHABLE)

        # servers that answered before are always pinged; of the others (a DHT flood can list thousands of
        # made-up ones), a random few per refresh: the rest wait, unusable, for a later refresh
        known_good = [s for s in candidates.values() if s.rtt is not None]
        untried = [s for s in candidates.values() if s.rtt is None]
        chosen = random.sample(untried, min(len(untried), MAX_NEW_PINGS))
        for status in untried:
            statuses[status.peer_id] = dataclasses.replace(status, state=ServerState.UNREACHABLE)
        async with trio.open_nursery() as nursery:
            for status in known_good + chosen:
                nursery.start_soon(ping, status)
        view.servers = statuses

    async def _initial_servers(self, model: str, known: dict[str, ServerStatus]) -> dict[str, ServerStatus]:
        """The initial peers that serve blocks of `model` (when the DHT cannot say who does): asked directly."""
        found: dict[str, ServerStatus] = {}

        async def ask(addr: str) -> None:
            peer_id = addr.rsplit("/p2p/", 1)[1]
            if peer_id in known:
                return
            status = ServerStatus(peer_id, [addr], 0, 0, 0.0, (), ServerState.UNREACHABLE, 0)
            try:
                started = trio.current_time()
                info = await self.ping(status)
            except (*TRANSPORT_ERRORS, SwarmError) as e:  # e.g. a DHT-only bootstrap node: no info protocol
                log.debug("initial peer %s answered no info: %r", peer_id, e)
                return
            if info.model == model:
                found[peer_id] = status.answered(info, trio.current_time() - started)

        async with trio.open_nursery() as nursery:
            for addr in self.initial_peers:
                nursery.start_soon(ask, addr)
        return found

    async def reread(self, view: SwarmView, attempt: int) -> None:
        """Re-read the swarm when the view lacks servers for some blocks: the view may predate a server, or
        a DHT read may have missed one (a read of a loaded swarm can lose answers). Waits 0.5 s, then twice
        as long at each attempt, so a server that just announced itself has time to be found."""
        reads = view.reads
        await trio.sleep(0.25 * 2**attempt)
        await self.refresh(view, unless_since=reads)  # callers that wait together share a read

    async def route(
        self,
        model: str,
        num_blocks: int,
        adapter: str | None,
        choose: Callable[[list[ServerSpan]], list[Hop]],
    ) -> tuple[list[Hop], dict[str, ServerStatus]]:
        """`choose(usable servers)` (a pure route choice from routing.py), re-reading the swarm a few times while
        it raises MissingBlocksError, and the usable servers it chose from. Routing for sessions and training
        requests alike: only a swarm that answered can say blocks are served by no one."""
        view = await self.watch(model, num_blocks)
        for attempt in range(MISSING_REREADS + 1):
            usable = usable_servers(view, self.banned, adapter)
            try:
                return choose([status.span() for status in usable.values()]), usable
            except MissingBlocksError as e:
                if attempt < MISSING_REREADS:
                    await self.reread(view, attempt + 1)  # the view may predate a new server
                    continue
                if not view.answered:
                    raise SwarmError(
                        f"the swarm did not answer who serves {served_name(model, adapter)} "
                        f"({MISSING_REREADS + 1} tries) and no server known answers for the rest: {e}"
                    ) from e
                online = [s.span() for s in view.servers.values() if s.usable and s.serves(adapter)]
                if online and not missing_blocks(online, 0, num_blocks):
                    raise MissingBlocksError(
                        f"{e}: every server of those blocks failed recently and is avoided for a while; try again"
                    ) from e
                announced = [s.span() for s in view.servers.values() if s.serves(adapter)]
                if announced and not missing_blocks(announced, 0, num_blocks):
                    raise SwarmError(
                        f"{e}: the servers announced for those blocks did not answer pings (down, or too busy to "
                        f"answer within {FIRST_PING_TIMEOUT:.0f} s); try again"
                    ) from e
                raise
        raise AssertionError("unreachable")

    async def ping(self, server: ServerStatus | ServerEntry) -> ServerInfo:
        """Ask a server for its live state over the info protocol (also measures how far it is)."""
        # libp2p refuses to dial a peer for 60 s after a failed dial; pings are our own bounded retries, so that
        # a server that restarted is routed through again within one refresh
        self.host.get_network().unblock_peer(ID.from_base58(server.peer_id))
        answered_before = getattr(server, "rtt", None) is not None
        with trio.fail_after(PING_TIMEOUT if answered_before else FIRST_PING_TIMEOUT):
            stream = await self.open_stream(server, INFO_PROTOCOL)
            try:
                await write_message(stream, InfoRequest())
                reply = await read_message(stream, Limits(), expect=(ServerInfo,))
            finally:
                await stream.close()
        if not isinstance(reply, ServerInfo):
            raise SwarmError(f"server {server.peer_id} answered a ping with {reply}")
        return reply

    def reached_through_relay(self, peer_id: str) -> bool:
        """Whether this client's last connection to the server went through a relay (the server is behind NAT)."""
        return ID.from_base58(peer_id) in self.host.reached_through_relay

    async def open_stream(self, server: ServerStatus | ServerEntry, protocol: str):
        """A new stream to `server`, connecting first if needed."""
        peer_id = ID.from_base58(server.peer_id)
        addrs = [info_from_p2p_addr(Multiaddr(a)).addrs[0] for a in server.addrs if "/p2p/" in a]
        with trio.fail_after(CONNECT_TIMEOUT):
            await self.host.connect(PeerInfo(peer_id, addrs))
            return await self.host.new_stream(peer_id, [protocol])
