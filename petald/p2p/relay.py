"""Circuit relay v2 (``/libp2p/circuit/relay/0.2.0/hop`` and ``/stop``), on py-libp2p 0.8.1's classes.

- A public node started with ``--relay`` runs `RelayService`: it grants reservations and joins circuits to the
  peers that hold one, within `RelayPolicy`'s bounds.
- A node behind NAT runs `StopService` (it accepts circuits only from relays where it holds a reservation) and
  `Reservations`, which reserves at relays, renews, notices a relay that is gone and reserves elsewhere. Its
  relayed addresses are ``<relay addr>/p2p/RELAY/p2p-circuit/p2p/ME``.
- Every node runs `HolePunching` (py-libp2p's DCUtR): a relayed connection is replaced by a direct one where both
  NATs let a simultaneous TCP open through, and stays relayed where not.
- Any node dials such an address with `circuit_dialer` (py-libp2p's ``CircuitV2Transport``, not as a
  reservation client); `petald.p2p.host.PetalHost.connect` uses it when a peer has only relayed addresses.

What of py-libp2p's ``CircuitV2Protocol`` is replaced here, and why (upstream note in docs/ARCHITECTURE.md):
- CONNECT (`RelayService._handle_connect`): it counted a circuit only after the STOP handshake (a flood of
  CONNECTs opened one STOP stream each to the relayed peer), kept circuits in a dict keyed by peer id (a second
  circuit to the same peer overwrote the first, and whichever ended first closed the other's streams), and
  checked the *source's* reservation limit.
- RESERVE: it took the reservation for the peer named in the message, so any peer could reserve for another;
  a reservation is now always the connection's own peer, as the spec says.
- STOP: it accepted a circuit from any peer, relay or not (`StopService`).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from multiaddr import Multiaddr

logger = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"
HANDSHAKE_TIMEOUT_S = 10.0  # a RESERVE answer, or the STOP exchange of a CONNECT
WRITE_TIMEOUT_S = 30.0  # one relayed write; a peer that reads nothing for this long loses its circuit
READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RelayPolicy:
    """A relay's bounds. The spec leaves the numbers to the relay; a Petal circuit carries an inference session
    (hidden states both ways for up to an hour), so circuits are long and large, and few."""

    max_reservations: int = 128
    reservation_ttl_s: int = 600
    max_circuits: int = 256
    max_circuits_per_source: int = 4  # a client needs one per relayed server it uses
    max_circuits_per_destination: int = 32  # so sources flooding one server cannot take all of its circuits
    circuit_duration_s: int = 3600
    circuit_bytes: int = 1 << 30
    max_hop_streams_per_peer: int = 8  # HOP streams open at once from one peer

    def libp2p_limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_duration_s,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits_per_destination,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_s,
        )


def admit_circuit(policy: RelayPolicy, total: int, from_source: int, to_destination: int) -> bool:
    """Whether one more circuit fits, counting the circuits open or being opened (STOP exchange under way)."""
    return (
        total < policy.max_circuits
        and from_source < policy.max_circuits_per_source
        and to_destination < policy.max_circuits_per_destination
    )


def is_relayed(addr: str) -> bool:
    return CIRCUIT in addr


def relayed_addr(relay_addr: str, relay: str, me: str) -> str:
    """``/ip4/R/tcp/P/p2p/RELAY/p2p-circuit/p2p/ME`` from one of the relay's addresses (with or without its id)."""
    base = relay_addr.split("/p2p/")[0]
    return f"{base}/p2p/{relay}{CIRCUIT}/p2p/{me}"


def _over_relayed_connection(stream: INetStream) -> bool:
    try:
        return any(is_relayed(str(a)) for a in stream.muxed_conn.get_transport_addresses())
    except Exception:  # noqa: BLE001 - a connection that cannot say is a direct one (TCP)
        return False


class StopService(CircuitV2Protocol):
    """The stop side: accepts circuits only from relays where this node holds a reservation."""

    def __init__(self, host: IHost, reservations: Reservations, **kwargs) -> None:
        super().__init__(host, **kwargs)
        self.reservations = reservations

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        if stream.muxed_conn.peer_id not in self.reservations.held:
            await self._send_stop_status(stream, StatusCode.PERMISSION_DENIED, "no reservation at this peer")
            await stream.reset()
            return
        await super()._handle_stop_stream(stream)


class RelayService(StopService):
    """The hop side of a public relay (see the module docstring for what differs from py-libp2p's)."""

    def __init__(self, host: IHost, reservations: Reservations, policy: RelayPolicy) -> None:
        self.policy = policy
        super().__init__(host, reservations, limits=policy.libp2p_limits(), allow_hop=True)
        self.bytes_relayed = 0
        self.circuits_refused = 0
        self.reservations_refused = 0
        self._from: collections.Counter[ID] = collections.Counter()
        self._to: collections.Counter[ID] = collections.Counter()
        self._hop_streams: collections.Counter[ID] = collections.Counter()

    @property
    def open_circuits(self) -> int:
        return sum(self._from.values())

    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    async def _refuse(self, stream: INetStream, code: StatusCode, why: str) -> None:
        await self._send_status(stream, code, why)
        await stream.reset()

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        """One exchange per HOP stream (RESERVE or CONNECT), as go- and rust-libp2p relays do."""
        peer = stream.muxed_conn.peer_id
        if self._hop_streams[peer] >= self.policy.max_hop_streams_per_peer:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many HOP streams")
            return
        if _over_relayed_connection(stream):  # the spec: no reservations or circuits over a circuit
            await self._refuse(stream, StatusCode.PERMISSION_DENIED, "relayed connection")
            return
        self._hop_streams[peer] += 1
        try:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    msg = await read_delimited_msg(stream, HopMessage)
            except Exception:  # noqa: BLE001 - a silent, slow or garbled peer
                await self._refuse(stream, StatusCode.MALFORMED_MESSAGE, "no valid HOP message")
                return
            if msg.type == HopMessage.RESERVE:
                await self._handle_reserve(stream, msg)
                await stream.close()
            elif msg.type == HopMessage.CONNECT:
                await self._handle_connect(stream, msg)
            else:
                await self._refuse(stream, StatusCode.UNEXPECTED_MESSAGE, "expected RESERVE or CONNECT")
        finally:
            self._hop_streams[peer] -= 1
            if not self._hop_streams[peer]:
                del self._hop_streams[peer]

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        msg.ClearField("peer")  # the reservation is the connection's peer's, whoever the message names
        # a reservation lasts only while its peer is connected (spec): free the slots of peers that left, so
        # throw-away identities cannot hold them until they expire
        manager = self.resource_manager
        for peer in [p for p in manager._reservations if not self._connected(p)]:
            del manager._reservations[peer]
        if not manager.can_accept_reservation(stream.muxed_conn.peer_id):
            self.reservations_refused += 1
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        source = stream.muxed_conn.peer_id
        try:
            destination = ID(msg.peer.id)
        except Exception:  # noqa: BLE001 - any undecodable peer id
            await self._refuse(stream, StatusCode.MALFORMED_MESSAGE, "bad peer id")
            return
        reservation = self.resource_manager.get_reservation(destination)
        if reservation is None or reservation.is_expired() or not self._connected(destination):
            self.circuits_refused += 1
            await self._refuse(stream, StatusCode.NO_RESERVATION, "the destination has no reservation here")
            return
        if not admit_circuit(self.policy, self.open_circuits, self._from[source], self._to[destination]):
            self.circuits_refused += 1
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuit limit reached")
            return
        self._from[source] += 1
        self._to[destination] += 1
        destination_stream: INetStream | None = None
        try:
            limit = Limit(duration=self.policy.circuit_duration_s, data=self.policy.circuit_bytes)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    destination_stream = await self.host.new_stream(destination, [STOP_PROTOCOL_ID])
                    connect = StopMessage(type=StopMessage.CONNECT, peer=CircuitPeerId(id=source.to_bytes()))
                    connect.limit.CopyFrom(limit)
                    await write_delimited_msg(destination_stream, connect)
                    answer = await read_delimited_msg(destination_stream, StopMessage)
                if answer.status != StatusCode.OK:
                    raise ConnectionError(f"the destination refused the circuit ({answer.status})")
            except Exception as e:  # noqa: BLE001 - any failure of the STOP exchange fails the circuit
                logger.debug("circuit %s -> %s failed: %r", source, destination, e)
                await self._refuse(stream, StatusCode.CONNECTION_FAILED, "the destination did not accept")
                return
            await self._send_status(stream, StatusCode.OK, "", limit=limit)
            logger.debug("circuit %s -> %s open", source, destination)
            carried = await self._join(stream, destination_stream)
            logger.info("circuit %s -> %s closed: relayed %d bytes", source, destination, carried)
        finally:
            self._from[source] -= 1
            self._to[destination] -= 1
            for counter, peer in ((self._from, source), (self._to, destination)):
                if not counter[peer]:
                    del counter[peer]
            for s in (stream, destination_stream):
                if s is not None:
                    await s.reset()

    async def _join(self, a: INetStream, b: INetStream) -> int:
        """Copy both ways until either side ends, the circuit's duration passes or its bytes are spent; the bytes
        carried."""
        budget = [self.policy.circuit_bytes]
        with trio.move_on_after(self.policy.circuit_duration_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, a, b, budget, nursery.cancel_scope)
                nursery.start_soon(self._copy, b, a, budget, nursery.cancel_scope)
        return self.policy.circuit_bytes - budget[0]

    async def _copy(self, src: INetStream, dst: INetStream, budget: list[int], circuit: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.read(READ_CHUNK)
                if not data:
                    return
                if len(data) > budget[0]:
                    logger.info("a circuit used its %d bytes; closing it", self.policy.circuit_bytes)
                    return
                with trio.fail_after(WRITE_TIMEOUT_S):
                    await dst.write(data)
                budget[0] -= len(data)
                self.bytes_relayed += len(data)
        except Exception as e:  # noqa: BLE001 - EOF, reset or a stuck reader end the circuit
            logger.debug("circuit ended: %r", e)
        finally:
            circuit.cancel()


class HolePunching(DCUtRProtocol):
    """py-libp2p's DCUtR (``/libp2p/dcutr``): every 2 s it tries to replace each relayed connection by a direct one
    (a simultaneous TCP dial from both listening ports, at the relay's view of our IP with our listening port), up
    to 3 attempts of 3 rounds per peer; once the direct one works, new streams take it and the relayed one closes
    60 s later. Where the punch fails the connection stays relayed. This subclass punches from the listening port
    (`_dial_peer`), says once per peer in the node's log which way it went, and keeps which peers it reached
    through a relay (`punched` : those of them it now holds a direct connection to)."""

    DRIVE_PERIOD_S = 2.0

    def __init__(self, host: IHost) -> None:
        super().__init__(host)
        self.outcome: dict[ID, bool] = {}
        self.relayed_peers: set[ID] = set()  # connected peers that were connected here through a relay
        self._driving: set[ID] = set()  # peers this side's attempt runs for now

    async def _auto_drive_loop(self) -> None:
        # upstream's loop awaits each peer's whole attempt in turn (tens of seconds for a peer that cannot be
        # punched), holding up every other peer; here each peer's attempt runs on its own
        assert self._nursery is not None  # run() sets it before it starts this loop
        while True:
            await trio.sleep(self.DRIVE_PERIOD_S)
            if not self._punchable():
                continue
            for peer_id in self._to_punch():
                self._driving.add(peer_id)
                self._nursery.start_soon(self._drive, peer_id)

    def _to_punch(self) -> list[ID]:
        """Peers reached only through a relay, with no attempt under way and attempts left."""
        network = self.host.get_network()
        out = []
        for peer_id, conns in list(network.connections.items()):
            if peer_id in self._driving or peer_id in self._in_progress or peer_id in self._direct_connections:
                continue
            if self._hole_punch_attempts.get(peer_id, 0) >= MAX_HOLE_PUNCH_ATTEMPTS:
                continue
            if not self._speaks_dcutr(peer_id):
                continue
            if conns and not any(is_direct(c) for c in conns) and self._connected_through_relay(peer_id):
                out.append(peer_id)
        return out

    def _speaks_dcutr(self, peer_id: ID) -> bool:
        """Whether the peer's identify lists DCUtR (a Petal host on loopback only does not: `take_part`)."""
        try:
            return str(DCUTR_PROTOCOL_ID) in (self.host.get_peerstore().get_protocols(peer_id) or [])
        except Exception:  # noqa: BLE001 - not identified yet
            return False

    def take_part(self) -> None:
        """Once the host listens: a host that listens on loopback only stops answering DCUtR, so identify tells
        peers not to try (a punch to it cannot work)."""
        if not self._punchable():
            self.host.remove_stream_handler(DCUTR_PROTOCOL_ID)

    async def _drive(self, peer_id: ID) -> None:
        try:
            await self.initiate_hole_punch(peer_id)
        except Exception as e:  # noqa: BLE001 - an attempt that fails leaves the connection relayed
            logger.debug("hole punching to %s: %r", peer_id, e)
        finally:
            self._driving.discard(peer_id)

    def _punchable(self) -> bool:
        """Whether peers could reach this host at all: it listens on more than loopback. A host that listens on
        loopback only (a client) takes no part: a punch from it or to it cannot work."""
        return can_punch(self.host.get_transport_addrs())

    def punched(self) -> list[ID]:
        """Peers first reached through a relay that this host now reaches over a direct connection."""
        network = self.host.get_network()
        self.relayed_peers = {p for p in self.relayed_peers if network.get_connections(p)}  # forget peers gone
        self.outcome = {p: direct for p, direct in self.outcome.items() if p in self.relayed_peers}
        return sorted((p for p in self.relayed_peers if any(is_direct(c) for c in network.get_connections(p))), key=str)

    async def _get_observed_addrs(self) -> list[bytes]:
        # the addresses a punch may use are the listening ones (and the relay's view of them), not the relayed
        # ones the host advertises behind NAT; the body makes no await, so nothing else sees the swap
        relayed, self.host.relayed_addrs = self.host.relayed_addrs, None
        try:
            return await super()._get_observed_addrs()
        finally:
            self.host.relayed_addrs = relayed

    async def _dial_peer(
        self, peer_id: ID, addr: Multiaddr, source: tuple[str, int] | None = None, as_responder: bool = False
    ) -> None:
        # DCUtR binds its dials to the first TCP address of `host.get_addrs()`, which behind NAT holds only
        # relayed ones: it dialled from an ephemeral port, which the NAT maps apart from the listening port the
        # peer dials, so neither router ever saw the other's SYN as an answer. Dial from the listening port.
        if source is None:
            source = punch_source(self.host.get_transport_addrs(), addr)
        await super()._dial_peer(peer_id, addr, source, as_responder)

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        if self._connected_through_relay(peer_id):
            self.relayed_peers.add(peer_id)
        direct = await super().initiate_hole_punch(peer_id)
        self._note(peer_id, direct)
        return direct

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        # the peer drives the upgrade (both sides may, at once): this side dials when the peer's SYNC comes
        peer_id = stream.muxed_conn.peer_id
        if _over_relayed_connection(stream):
            self.relayed_peers.add(peer_id)
        await super()._handle_dcutr_stream(stream)
        self._note(peer_id, await self._verify_direct_connection(peer_id))

    def _connected_through_relay(self, peer_id: ID) -> bool:
        return any(not is_direct(c) for c in self.host.get_network().get_connections(peer_id))

    def _note(self, peer_id: ID, direct: bool) -> None:
        if peer_id not in self.relayed_peers or self.outcome.get(peer_id) == direct:
            return
        self.outcome[peer_id] = direct
        if direct:
            logger.info("connection to %s is direct now (hole punched); the relayed one closes", peer_id)
        else:
            logger.info("hole punching to %s failed; the connection stays relayed", peer_id)


def is_direct(conn) -> bool:
    """Whether a swarm connection runs over TCP to the peer itself, not through a relay."""
    try:
        addrs = conn.get_transport_addresses()
    except Exception:  # noqa: BLE001 - a connection that cannot say is not counted as direct
        return False
    return not conn.is_closed and bool(addrs) and not any(is_relayed(str(a)) for a in addrs)


def punch_source(listening: list[Multiaddr], destination: Multiaddr) -> tuple[str, int] | None:
    """The (ip, port) a hole-punching dial to `destination` leaves from: a listening IPv4 TCP address (the port a
    TCP NAT keeps for the mapping the peer dials) that can reach it (one on loopback reaches only loopback); None
    for an ephemeral port."""
    try:
        loopback = ipaddress.ip_address(destination.value_for_protocol("ip4")).is_loopback
    except Exception:  # noqa: BLE001 - not an IPv4 destination: no IPv4 source fits
        return None
    for addr in listening:
        try:
            ip, port = ipaddress.ip_address(addr.value_for_protocol("ip4")), int(addr.value_for_protocol("tcp"))
        except Exception:  # noqa: BLE001 - not an IPv4 TCP address
            continue
        if port and (ip.is_unspecified or ip.is_loopback == loopback):
            return str(ip), port
    return None


def relayed_beside_direct(host: IHost, stream: INetStream) -> bool:
    """Whether `stream` runs through a relay to a peer this host now also holds a direct connection to (hole
    punched): a long-lived stream should move, as the relayed connection is closed soon after."""
    try:
        if not _over_relayed_connection(stream):
            return False
        return any(is_direct(c) for c in host.get_network().get_connections(stream.muxed_conn.peer_id))
    except Exception:  # noqa: BLE001 - a stream or host that cannot say stays where it is
        return False


def can_punch(listening: list[Multiaddr]) -> bool:
    """Whether a host listening on `listening` can take part in hole punching: it listens on an IPv4 address
    other than loopback (or on all of them)."""
    return punch_source(listening, Multiaddr("/ip4/192.0.2.1/tcp/1")) is not None


def circuit_dialer(host: IHost, protocol: CircuitV2Protocol) -> CircuitV2Transport:
    """py-libp2p's circuit transport as a dialer only (its reservation client would reserve at every relay it
    dials through)."""
    return CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP))


class RelayRefused(Exception):
    """A relay answered a RESERVE with another status than OK."""


async def reserve(host: IHost, relay: ID) -> tuple[float, list[str]]:
    """Reserve a slot at `relay` (connected already); its expiry (unix time) and the relay's addresses."""
    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
        stream = await host.new_stream(relay, [HOP_PROTOCOL_ID])
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            answer = await read_delimited_msg(stream, HopMessage)
        finally:
            await stream.close()
    if answer.status != StatusCode.OK:
        raise RelayRefused(f"relay {relay} refused the reservation (status {answer.status})")
    addrs = []
    for raw in answer.reservation.addrs:
        try:
            addrs.append(str(Multiaddr(bytes(raw))))
        except Exception:  # noqa: BLE001 - a relay's malformed address is skipped
            continue
    return float(answer.reservation.expire), addrs


@dataclass
class Reservation:
    expires_at: float
    ttl: float  # how long it was granted for: renewed past half of it
    addrs: list[str]  # the relayed addresses it gives this node


def relay_candidates(configured: list[ID], supporting: list[ID], held: set[ID], failed: set[ID]) -> list[ID]:
    """Where to try to reserve next: the configured relays first, then the connected peers that offer the hop
    protocol; none held already, none that failed recently."""
    out: list[ID] = []
    for peer in [*configured, *supporting]:
        if peer not in held and peer not in failed and peer not in out:
            out.append(peer)
    return out


class Reservations:
    """The reservations a node behind NAT holds, kept at `want` relays while it runs (`keep`)."""

    CHECK_PERIOD_S = 2.0
    RETRY_FAILED_S = 30.0

    def __init__(self, host: IHost, want: int = 2) -> None:
        self.host = host
        self.configured: list[PeerInfo] = []  # --relay-peers
        self.want = want
        self.held: dict[ID, Reservation] = {}
        self._failed: dict[ID, float] = {}
        self.changed = trio.Event()  # set when the relayed addresses change; replaced after each wait

    def use_relays(self, relay_addrs: list[str]) -> None:
        """Try these relays (multiaddrs with /p2p/ID) before the ones found in the swarm."""
        self.configured = [info_from_p2p_addr(Multiaddr(a)) for a in relay_addrs]

    def addrs(self) -> list[str]:
        return [a for r in self.held.values() for a in r.addrs]

    async def keep(self) -> None:
        """Drop reservations whose relay is gone, renew those past half their life, reserve until `want`."""
        while True:
            before = self.addrs()
            await self._check()
            if self.addrs() != before:
                logger.info("relayed addresses: %s", self.addrs() or "none")
                self.changed.set()
                self.changed = trio.Event()
            await trio.sleep(self.CHECK_PERIOD_S)

    async def _check(self) -> None:
        now = time.time()
        for relay in list(self.held):
            if not self.host.get_network().get_connections(relay) or self.held[relay].expires_at <= now:
                logger.warning("lost the reservation at relay %s (disconnected or expired)", relay)
                del self.held[relay]
        for relay, reservation in list(self.held.items()):
            if reservation.expires_at - now < reservation.ttl / 2:
                await self._reserve(relay)
        self._failed = {p: t for p, t in self._failed.items() if now - t < self.RETRY_FAILED_S}
        if len(self.held) >= self.want:
            return
        for info in self.configured:
            if info.peer_id not in self.held and info.peer_id not in self._failed:
                self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
        candidates = relay_candidates(
            [i.peer_id for i in self.configured], self._supporting(), set(self.held), set(self._failed)
        )
        for relay in candidates:
            if len(self.held) >= self.want:
                return
            await self._reserve(relay)

    def _supporting(self) -> list[ID]:
        store = self.host.get_peerstore()
        out = []
        for peer in self.host.get_connected_peers():
            try:
                if str(HOP_PROTOCOL_ID) in (store.get_protocols(peer) or []):
                    out.append(peer)
            except Exception:  # noqa: BLE001 - a peer not identified yet is not known to relay
                continue
        return out

    async def _reserve(self, relay: ID) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await self.host.connect(PeerInfo(relay, self.host.get_peerstore().addrs(relay)))
            expires_at, relay_addrs = await reserve(self.host, relay)
        except Exception as e:  # noqa: BLE001 - any failure: try another relay, this one again later
            logger.info("reserving at relay %s failed: %r", relay, e)
            self._failed[relay] = time.time()
            self.held.pop(relay, None)
            return
        if not relay_addrs:  # a relay that says nothing of its addresses: the one we reached it at
            relay_addrs = [str(a) for a in self.host.get_peerstore().addrs(relay) if not is_relayed(str(a))]
        me = str(self.host.get_id())
        addrs = [relayed_addr(a, str(relay), me) for a in relay_addrs]
        fresh = relay not in self.held
        self.held[relay] = Reservation(expires_at, max(expires_at - time.time(), 0.0), addrs)
        if fresh:
            logger.info("reserved a slot at relay %s for %.0f s", relay, expires_at - time.time())
