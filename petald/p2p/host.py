"""The libp2p host of a Petal node: persistent Ed25519 identity, TCP + Noise + Yamux.

Identity file format: the private key serialized as libp2p's protobuf ``PrivateKey`` message
(``KeyType.Ed25519`` + the 32-byte seed, 36 bytes in all), as ``PrivateKey.serialize()`` writes it.
The file is created with mode 0600 and never overwritten.

Security: Noise only. py-libp2p's default also offers TLS, SECIO and *plaintext*; a peer that
only speaks plaintext must fail to connect, so ``make_host`` passes a Noise-only ``sec_opt``.

Exceptions: anything raised inside ``host.run()`` (KeyboardInterrupt and SystemExit included)
comes out wrapped in nested ``BaseExceptionGroup``s, one per nursery of libp2p's services.
``open_host`` re-raises the bare exception instead (a KeyboardInterrupt/SystemExit if the group
holds one, the other exceptions logged at debug level; else the group's only exception), so
callers keep plain ``except ValueError`` / Ctrl-C handling. A group of several errors propagates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from libp2p import new_swarm
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from petald.p2p.reachability import AddressView, DialBackService
from petald.p2p.relay import (
    CIRCUIT,
    HolePunching,
    RelayPolicy,
    RelayService,
    Reservations,
    StopService,
    circuit_dialer,
    is_relayed,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class IdentityError(ValueError):
    """An identity file is unreadable, not an Ed25519 key, or already exists."""


class _DhtStreamEofFilter(logging.Filter):
    """Drops KadDHT's warning for a peer closing its request stream: a normal end, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and isinstance(record.args[0], StreamEOF))


def route_libp2p_logs() -> None:
    """Send the ``libp2p`` logger's records through Python logging instead of raw stderr.

    py-libp2p leaves its logger without handlers and with ``propagate = False``, so Python's
    last-resort handler prints its warnings to stderr. Propagating to the root logger lets the
    node's logging config decide; the NullHandler keeps it quiet when nothing is configured.
    """
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.propagate = True
    if not any(isinstance(h, logging.NullHandler) for h in libp2p_logger.handlers):
        libp2p_logger.addHandler(logging.NullHandler())
    # It sets itself to INFO on import and logs every connection poll.
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.WARNING)
    # py-libp2p 0.8.1 logs every cleanly closed KadDHT request stream as a warning.
    kad_logger = logging.getLogger("libp2p.kad_dht.kad_dht")
    if not any(isinstance(f, _DhtStreamEofFilter) for f in kad_logger.filters):
        kad_logger.addFilter(_DhtStreamEofFilter())


def quiet_libp2p_logs() -> None:
    """For command-line clients: warnings to stderr, but none of py-libp2p's own.

    py-libp2p warns (even errs) about every peer it cannot reach, and peers that left the swarm are
    passed around in DHT answers for a while; a client's user cannot act on those, and Petal's own
    errors say what failed."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(lambda record: not record.name.startswith("libp2p"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def peer_id_of(key_pair: KeyPair) -> ID:
    """The peer id derived from ``key_pair``'s public key."""
    return ID.from_pubkey(key_pair.public_key)


def write_identity(path: Path, key_pair: KeyPair) -> None:
    """Write ``key_pair`` to a new file at ``path`` with mode 0600; refuse to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityError(f"identity file {path} already exists; refusing to overwrite it") from None
    try:
        # umask may have cleared bits of 0o600; make the mode exact.
        os.fchmod(fd, 0o600)
        data = key_pair.private_key.serialize()
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


def read_identity(path: Path) -> KeyPair:
    """Load an Ed25519 key pair written by ``write_identity``."""
    try:
        private_key = deserialize_private_key(path.read_bytes())
    except Exception as e:
        raise IdentityError(f"identity file {path} is not a libp2p private key: {e}") from e
    if private_key.get_type() != KeyType.Ed25519:
        raise IdentityError(f"identity file {path} holds a {private_key.get_type().name} key; need Ed25519")
    if path.stat().st_mode & 0o077:
        logger.warning("identity file %s is readable by other users; chmod 600 it", path)
    return KeyPair(private_key, private_key.get_public_key())


def load_or_create_identity(path: Path | None) -> KeyPair:
    """The node's key pair: loaded from ``path``, created there (0600) if missing, ephemeral if None."""
    if path is None:
        return create_new_key_pair()
    if path.exists():
        return read_identity(path)
    key_pair = create_new_key_pair()
    try:
        write_identity(path, key_pair)
    except IdentityError:
        # Another process created it between exists() and open(): use theirs.
        return read_identity(path)
    logger.info("created identity %s for peer %s", path, peer_id_of(key_pair))
    return key_pair


class PetalHost(BasicHost):
    """py-libp2p's host that also reaches peers behind NAT: a peer known only by relayed addresses
    (``.../p2p/RELAY/p2p-circuit/p2p/PEER``) is dialled through its relay, by `connect` and by `new_stream`, so
    every protocol (DHT, inference, push) works with it unchanged. py-libp2p's swarm skips relayed addresses.

    While the node is behind NAT (`relayed_addrs` set), it advertises its relayed addresses instead of its
    listening ones (identify, DHT): nobody can dial those."""

    def __init__(self, network, **kwargs) -> None:
        self.relayed_addrs: list[str] | None = None
        super().__init__(network, **kwargs)
        self.reservations = Reservations(self)
        self.dial_back = DialBackService(self)
        self._circuits = circuit_dialer(self, CircuitV2Protocol(self))
        self._relayed_dials: dict[ID, trio.Lock] = {}
        self.reached_through_relay: set[ID] = set()  # peers whose last connection from here went through a relay
        self.circuits: StopService | None = None  # set by open_host once it runs
        self.hole_punching: HolePunching | None = None  # set by open_host once it runs

    def get_addrs(self) -> list[Multiaddr]:
        # BasicHost's would cut a relayed address at its first /p2p/ (the relay's id) and append ours; and it adds
        # identify's observed addresses, which are ports nobody listens on (hole punching reads them itself)
        if self.relayed_addrs is None:
            return [a.encapsulate(Multiaddr(f"/p2p/{self.get_id()}")) for a in self.get_transport_addrs()]
        return [Multiaddr(a) for a in self.relayed_addrs]

    def punched_peers(self) -> list[str]:
        """Peers once reached through a relay that this host reaches directly now (hole punched)."""
        return [] if self.hole_punching is None else [str(p) for p in self.hole_punching.punched()]

    def address_view(self) -> AddressView:
        """Where it listens and at which IPs its peers see it (identify's observed addresses, each seen by one
        peer at least: a node behind NAT talks to few peers)."""
        observed = getattr(self, "_observed_addr_manager", None)  # BasicHost's; None without address discovery
        ips = set()
        for addr in observed.addrs(min_observers=1) if observed is not None else []:
            try:
                ips.add(addr.value_for_protocol("ip4"))
            except Exception:  # noqa: BLE001 - an IPv6 or DNS observation: Petal dials IPv4
                continue
        return AddressView(frozenset(self.listening_addrs()), frozenset(ip for ip in ips if ip))

    def listening_addrs(self) -> list[str]:
        """Where this host listens, with its peer id, whatever it advertises."""
        return [f"{a}/p2p/{self.get_id()}" for a in self.get_transport_addrs()]

    async def connect(self, peer_info: PeerInfo) -> None:
        peer = peer_info.peer_id
        known = self.get_network().get_connections(peer)
        if known and all(conn.is_closed for conn in known):
            await self.disconnect(peer)  # py-libp2p keeps a dead connection listed, and would not dial again
        relayed = [a for a in peer_info.addrs if is_relayed(str(a))]
        if self.get_network().get_connections(peer) or not relayed:
            await super().connect(peer_info)
            return
        self.peerstore.add_addrs(peer, peer_info.addrs, 120)
        direct = [a for a in peer_info.addrs if not is_relayed(str(a))]
        if direct:
            try:
                await super().connect(PeerInfo(peer, direct))
                self.reached_through_relay.discard(peer)
                return
            except Exception as e:  # noqa: BLE001 - any direct failure: the relay is the way
                logger.debug("direct dial of %s failed (%r); dialling through its relay", peer, e)
        lock = self._relayed_dials.setdefault(peer, trio.Lock())
        async with lock:  # one relayed connection per peer: concurrent callers wait for the first dial
            if self.get_network().get_connections(peer):
                return
            failures = []
            for addr in relayed:
                if str(addr).endswith(CIRCUIT):  # the peerstore's form: the relay's address and /p2p-circuit
                    addr = addr.encapsulate(Multiaddr(f"/p2p/{peer}"))
                try:
                    await self._circuits.dial(addr)
                    self.reached_through_relay.add(peer)
                    logger.debug("connected to %s through %s", peer, addr)
                    return
                except Exception as e:  # noqa: BLE001 - next relay
                    failures.append(f"{addr}: {e}")
            raise SwarmException(f"no relay reached {peer}: {'; '.join(failures)}")

    async def new_stream(self, peer_id: ID, protocol_ids) -> INetStream:
        if not self.get_network().get_connections(peer_id):
            try:
                addrs = self.peerstore.addrs(peer_id)
            except Exception:  # noqa: BLE001 - an unknown peer: the swarm says so below
                addrs = []
            if any(is_relayed(str(a)) for a in addrs):
                await self.connect(PeerInfo(peer_id, addrs))
        return await super().new_stream(peer_id, protocol_ids)


def make_host(key_pair: KeyPair) -> PetalHost:
    """A TCP host speaking only Noise and only Yamux, one connection per peer."""
    from libp2p.rcmgr import new_resource_manager

    route_libp2p_logs()
    noise = NoiseTransport(key_pair, noise_privkey=create_noise_key_pair().private_key)
    resources = new_resource_manager()
    swarm = new_swarm(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        # More than one connection per peer makes every dial wait a fixed 250 ms.
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        resource_manager=resources,
    )
    return PetalHost(swarm, resource_manager=resources)


def listen_addrs(listen: list[Multiaddr] | tuple[str, int]) -> list[Multiaddr]:
    """Multiaddrs for ``listen``: given as is, or ``(ip4, port)`` as ``/ip4/IP/tcp/PORT``."""
    if isinstance(listen, tuple):
        ip, port = listen
        return [Multiaddr(f"/ip4/{ip}/tcp/{port}")]
    return list(listen)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def bare_exception(group: BaseExceptionGroup) -> BaseException | None:
    """What to raise instead of ``group``: a KeyboardInterrupt/SystemExit anywhere in it, else its
    only exception; None when it holds several (then the group itself should propagate)."""
    leaves = _leaves(group)
    stops = [e for e in leaves if isinstance(e, KeyboardInterrupt | SystemExit)]
    if stops:
        return stops[0]
    return leaves[0] if len(leaves) == 1 else None


@asynccontextmanager
async def unwrapped_groups() -> AsyncIterator[None]:
    """Re-raise what ``bare_exception`` picks from an exception group raised inside."""
    try:
        yield
    except BaseExceptionGroup as group:
        bare = bare_exception(group)
        if bare is None:
            raise
        for exc in _leaves(group):
            if exc is not bare:
                logger.debug("also raised while stopping: %r", exc)
        raise bare from None


@asynccontextmanager
async def open_host(
    key_pair: KeyPair, listen: list[Multiaddr] | tuple[str, int], relay: RelayPolicy | None = None
) -> AsyncIterator[PetalHost]:
    """Run a host listening on ``listen``; yield it once it listens, stop it on exit. It answers dial-back
    requests, accepts circuits from relays where it holds a reservation, and with ``relay`` is a relay itself.

    An exception from the body comes out bare, not wrapped in libp2p's nested nursery groups.
    """
    host = make_host(key_pair)
    circuits = StopService(host, host.reservations) if relay is None else RelayService(host, host.reservations, relay)
    punching = HolePunching(host)
    async with (
        unwrapped_groups(),
        host.run(listen_addrs=listen_addrs(listen)),
        background_trio_service(circuits),
        background_trio_service(punching),
    ):
        await circuits.event_started.wait()
        await punching.event_started.wait()
        punching.take_part()
        host.circuits, host.hole_punching = circuits, punching
        yield host


def full_addrs(host: IHost) -> list[str]:
    """The host's dialable addresses, each ending in ``/p2p/<peer id>``."""
    return [str(addr) for addr in host.get_addrs()]


async def connect(host: IHost, multiaddr: str, timeout: float = CONNECT_TIMEOUT_S) -> ID:
    """Connect to the peer at ``multiaddr`` (with ``/p2p/<id>``) within ``timeout`` s; return its id.

    Raises ``ValueError`` for an address without a peer id, ``trio.TooSlowError`` on timeout, and
    libp2p's dial errors (``SwarmException``) when the peer refuses or speaks no common protocol.
    """
    try:
        peer_info = info_from_p2p_addr(Multiaddr(multiaddr))
    except Exception as e:
        raise ValueError(f"bad peer address {multiaddr!r} (need /ip4/.../tcp/PORT/p2p/ID): {e}") from e
    with trio.fail_after(timeout):
        await host.connect(peer_info)
    return peer_info.peer_id
