"""The client's window on the swarm: a libp2p host and a DHT node in a background trio thread.

The client library is synchronous (Hugging Face style); all networking runs on one trio event loop in a
daemon thread, and sync code calls into it with `Swarm.run`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from petald.errors import PetalError
from petald.p2p.dht import ServerEntry, ServerState, SwarmDHT, open_swarm_dht
from petald.p2p.host import load_or_create_identity, open_host

log = logging.getLogger(__name__)
T = TypeVar("T")
START_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0


class SwarmError(PetalError):
    """The swarm could not be reached or did not answer."""


class Swarm:
    """A running client host + DHT. Use as a context manager, or call `close()`."""

    def __init__(self, initial_peers: list[str], start_timeout: float = START_TIMEOUT):
        if not initial_peers:
            raise SwarmError("give initial_peers: the multiaddrs (/ip4/.../tcp/P/p2p/ID) of peers in the swarm")
        self.initial_peers = list(initial_peers)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.host = None
        self.dht: SwarmDHT | None = None
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
            async with open_swarm_dht(host, self.initial_peers, client=True) as dht:
                self.host, self.dht = host, dht
                self._ready.set()
                await self._stop.wait()

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

    async def open_stream(self, entry: ServerEntry, protocol: str):
        """A new stream to the server of `entry`, connecting first if needed."""
        peer_id = ID.from_base58(entry.peer_id)
        addrs = [info_from_p2p_addr(Multiaddr(a)).addrs[0] for a in entry.addrs if "/p2p/" in a]
        with trio.fail_after(CONNECT_TIMEOUT):
            await self.host.connect(PeerInfo(peer_id, addrs))
            return await self.host.new_stream(peer_id, [protocol])
