"""The client's window on the swarm: a libp2p host and a DHT node in a background trio thread.

The client library is synchronous (Hugging Face style); all networking runs on one trio event loop in a
daemon thread, and sync code calls into it with `Swarm.run`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from petal_client.routing import ServerSpan
from petald.errors import PetalError
from petald.p2p.dht import ServerEntry, ServerState, SwarmDHT, open_swarm_dht
from petald.p2p.host import load_or_create_identity, open_host
from petald.p2p.wire import InfoRequest, Limits, ServerInfo, read_message, write_message
from petald.serving.handlers import INFO_PROTOCOL

log = logging.getLogger(__name__)
T = TypeVar("T")
START_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
REFRESH_PERIOD = 5.0  # seconds between background pings of the servers of a model in use
DHT_READ_PERIOD = 30.0  # seconds between background DHT reads for it (new servers; a read costs far more than pings)
PING_TIMEOUT = 3.0
MISSING_REREADS = 3  # DHT re-reads (after 0.5, 1, 2 s) before blocks are declared served by no one
BAN_SECONDS = 15.0
RTT_SMOOTHING = 0.2  # weight of a new RTT sample in the moving average


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


@dataclass
class ServerStatus:
    """What the client knows of one server: its announcement, its own latest answer, its distance."""

    entry: ServerEntry
    state: str  # ONLINE, OFFLINE (draining), or UNREACHABLE when it did not answer a ping
    cache_tokens_left: int
    rtt: float | None = None

    @property
    def usable(self) -> bool:
        return self.state == "ONLINE"

    def serves(self, adapter: str | None) -> bool:
        """Whether this server can run its blocks with `adapter` (None: the base weights, which all can)."""
        return adapter is None or adapter in self.entry.adapters

    def span(self) -> ServerSpan:
        return ServerSpan(
            self.entry.peer_id,
            self.entry.start,
            self.entry.end,
            self.entry.throughput,
            self.cache_tokens_left,
            self.rtt,
        )


@dataclass
class SwarmView:
    """The servers of one model as last seen (DHT read + pings), refreshed in the background."""

    servers: dict[str, ServerStatus] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)  # set once the first read has finished
    reading: trio.Lock = field(default_factory=trio.Lock)  # one refresh at a time: no storm of DHT reads
    reads: int = 0  # refreshes done so far


def usable_servers(view: SwarmView, banned: BanList, adapter: str | None) -> dict[str, ServerStatus]:
    """The servers of `view` a route may use: ONLINE, not banned, and serving `adapter` (if one is asked for)."""
    return {p: s for p, s in view.servers.items() if s.usable and p not in banned and s.serves(adapter)}


def served_name(model: str, adapter: str | None) -> str:
    """How errors name what is routed: the model, with its adapter if one is asked for."""
    return model if adapter is None else f"{model} with adapter {adapter!r}"


class SwarmError(PetalError):
    """The swarm could not be reached or did not answer."""


class Swarm:
    """A running client host + DHT. Use as a context manager, or call `close()`."""

    def __init__(
        self, initial_peers: list[str], start_timeout: float = START_TIMEOUT, refresh_period: float = REFRESH_PERIOD
    ):
        if not initial_peers:
            raise SwarmError("give initial_peers: the multiaddrs (/ip4/.../tcp/P/p2p/ID) of peers in the swarm")
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

    def run(self, fn: Callable[..., Awaitable[T]], *args) -> T:
        """Run `fn(*args)` on the swarm's event loop and return its result (from a sync thread)."""
        if self._error is not None or self._token is None:
            raise SwarmError(f"the swarm connection is down: {self._error}")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(timeout=10)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- on the event loop

    async def servers(self, model: str, blocks: range) -> dict[str, ServerEntry]:
        """The ONLINE servers of `model` covering any of `blocks`, by peer id (a fresh network read)."""
        found = await self.dht.get_servers(model, blocks)
        online: dict[str, ServerEntry] = {}
        for entries in found.values():
            for peer_id, entry in entries.items():
                if entry.state == ServerState.ONLINE:
                    online[peer_id] = entry
        return online

    async def watch(self, model: str, blocks: range) -> SwarmView:
        """The live view of `model`'s servers; the first call reads it, then a background task keeps it fresh."""
        view = self.views.get(model)
        if view is None:
            view = self.views[model] = SwarmView()
            self._nursery.start_soon(self._keep_fresh, model, blocks, view)
            try:
                await self.refresh(model, blocks, view)
            finally:
                view.ready.set()
        else:
            await view.ready.wait()  # callers that came during the first read use its result
        return view

    async def _keep_fresh(self, model: str, blocks: range, view: SwarmView) -> None:
        last_read = trio.current_time()
        while True:
            await trio.sleep(self.refresh_period)
            read_dht = trio.current_time() - last_read >= DHT_READ_PERIOD - self.refresh_period / 2
            try:
                await self.refresh(model, blocks, view, read_dht)
                last_read = trio.current_time() if read_dht else last_read
            except Exception as e:  # the next refresh tries again; routing uses the last view meanwhile
                log.debug("refreshing the view of %s failed: %r", model, e)

    async def refresh(
        self, model: str, blocks: range, view: SwarmView, read_dht: bool = True, unless_since: int | None = None
    ) -> None:
        """Ping every announced server for its state, free cache and RTT; read who is announced from the DHT
        first, or (without `read_dht`) take the servers of the last read. One refresh of a view runs at a
        time; with `unless_since`, none runs if the view was refreshed since its `reads` was that."""
        async with view.reading:
            if unless_since is None or view.reads == unless_since:
                await self._refresh(model, blocks, view, read_dht)
                view.reads += 1

    async def _refresh(self, model: str, blocks: range, view: SwarmView, read_dht: bool) -> None:
        if read_dht:
            announced = await self.servers(model, blocks)
        else:
            announced = {peer_id: status.entry for peer_id, status in view.servers.items()}
        statuses: dict[str, ServerStatus] = {}

        async def ping(peer_id: str, entry: ServerEntry) -> None:
            old = view.servers.get(peer_id)
            status = ServerStatus(entry, "UNREACHABLE", entry.cache_tokens_left, old.rtt if old else None)
            try:
                started = trio.current_time()
                info = await self.ping(entry)
                rtt = trio.current_time() - started
                status.state, status.cache_tokens_left = info.state, info.cache_tokens_left
                status.rtt = rtt if status.rtt is None else (1 - RTT_SMOOTHING) * status.rtt + RTT_SMOOTHING * rtt
            except Exception as e:  # noqa: BLE001 - an unreachable server is simply not routed through
                log.debug("ping %s failed: %r", peer_id, e)
            statuses[peer_id] = status

        async with trio.open_nursery() as nursery:
            for peer_id, entry in announced.items():
                nursery.start_soon(ping, peer_id, entry)
        view.servers = statuses

    async def reread(self, model: str, blocks: range, view: SwarmView, attempt: int) -> None:
        """Re-read the swarm when the view lacks servers for some blocks: the view may predate a server, or
        a DHT read may have missed one (a read of a loaded swarm can lose answers). Waits 0.5 s, then twice
        as long at each attempt, so a server that just announced itself has time to be found."""
        reads = view.reads
        await trio.sleep(0.25 * 2**attempt)
        await self.refresh(model, blocks, view, unless_since=reads)  # callers that wait together share a read

    async def ping(self, entry: ServerEntry) -> ServerInfo:
        """Ask a server for its live state over the info protocol (also measures how far it is)."""
        with trio.fail_after(PING_TIMEOUT):
            stream = await self.open_stream(entry, INFO_PROTOCOL)
            try:
                await write_message(stream, InfoRequest())
                reply = await read_message(stream, Limits(), expect=(ServerInfo,))
            finally:
                await stream.close()
        if not isinstance(reply, ServerInfo):
            raise SwarmError(f"server {entry.peer_id} answered a ping with {reply}")
        return reply

    async def open_stream(self, entry: ServerEntry, protocol: str):
        """A new stream to the server of `entry`, connecting first if needed."""
        peer_id = ID.from_base58(entry.peer_id)
        addrs = [info_from_p2p_addr(Multiaddr(a)).addrs[0] for a in entry.addrs if "/p2p/" in a]
        with trio.fail_after(CONNECT_TIMEOUT):
            await self.host.connect(PeerInfo(peer_id, addrs))
            return await self.host.new_stream(peer_id, [protocol])
