"""Can peers dial me? AutoNAT v1 (``/libp2p/autonat/1.0.0``) with a dial-back that proves it.

Every node answers dial-back requests; a node asks the peers it is connected to and decides with
`reachability_verdict`. py-libp2p 0.8.1's ``AutoNATService`` has the wire format and the client; three things
of its server are fixed here (upstream note in docs/ARCHITECTURE.md):
- It dials back with ``host.connect``, which returns at once when a connection to the requester exists, and it
  always does (the request came over it): every node was judged reachable. `DialBackService` opens a fresh
  TCP connection to the address and runs the Noise handshake on it (which proves the requester's peer id), then
  closes it, never touching the swarm's connection.
- It dials only addresses whose IP equals the requester's observed IP, so a node behind NAT, which announces
  its private address, is never dialled (refused: no verdict). The spec's rule (dial nothing but the observed
  IP) is kept, applied to the ports the requester announces: ``observed IP : announced port``.
- It answers for the peer id the request names: anyone could have a third peer's addresses tested (its Noise
  handshake checked). `DialBackService` answers only for the requester, the peer at the other end of the
  stream, and refuses a request that names another (E_BAD_REQUEST).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

logger = logging.getLogger(__name__)

DIAL_BACK_TIMEOUT_S = 5.0
ASK_TIMEOUT_S = 15.0  # one dial-back request: the peer's dials (at most MAX_DIALS_PER_REQUEST) and its answer
MAX_DIALS_PER_REQUEST = 4
MAX_CONCURRENT_REQUESTS = 4  # a node answers this many dial-back requests at once; more are refused
MAX_PEERS_ASKED = 4
MAX_REQUEST_BYTES = 4096  # a request names one peer and a few addresses


class Reachability(enum.StrEnum):
    UNKNOWN = "unknown"  # no peer could tell (none asked, none answered)
    PUBLIC = "public"  # a peer dialled one of our addresses back
    PRIVATE = "private"  # peers tried our addresses and none answered: behind NAT or a firewall


def reachability_verdict(answers: Iterable[bool | None]) -> Reachability:
    """What the dial-back answers say: True = a peer reached us, False = it tried and failed, None = no answer
    (refused, unreachable asker). One success is proof (the Noise handshake checked our peer id); failures
    without any success mean peers cannot dial us."""
    answers = list(answers)
    if any(a is True for a in answers):
        return Reachability.PUBLIC
    if any(a is False for a in answers):
        return Reachability.PRIVATE
    return Reachability.UNKNOWN


MIN_RECHECK_INTERVAL_S = 30.0  # a node asks for dial-backs at most this often once it runs


@dataclass(frozen=True)
class AddressView:
    """What a node's reachability depends on: where it listens, and at which IPs peers see it (the ports they see
    vary with each connection through a NAT, so only the IPs count)."""

    listening: frozenset[str]
    observed_ips: frozenset[str]


def should_recheck(
    checked: AddressView, now: AddressView, since_check_s: float, min_interval_s: float = MIN_RECHECK_INTERVAL_S
) -> bool:
    """Whether to ask for dial-backs again: the listening addresses changed, or peers see the node at an IP they
    did not see at the last check (a new address from the ISP, another network); at most once per
    `min_interval_s`. An observed IP that is gone (its observer left) changes nothing."""
    if since_check_s < min_interval_s:
        return False
    return now.listening != checked.listening or not now.observed_ips <= checked.observed_ips


def dial_back_addrs(announced: Iterable[bytes], observed_ip: str | None) -> list[bytes]:
    """The addresses a dial-back may try: each announced TCP port at the requester's observed IP (never another
    IP, so nobody can point us at a third party), without duplicates, at most MAX_DIALS_PER_REQUEST."""
    if observed_ip is None or ":" in observed_ip:
        return []
    out: list[bytes] = []
    for raw in announced:
        try:
            port = Multiaddr(raw).value_for_protocol("tcp")
        except Exception:  # noqa: BLE001 - a malformed or non-TCP address is skipped
            continue
        addr = Multiaddr(f"/ip4/{observed_ip}/tcp/{port}").to_bytes()
        if addr not in out:
            out.append(addr)
    return out[:MAX_DIALS_PER_REQUEST]


def dial_back_for(claimed: bytes, requester: ID) -> ID | None:
    """The peer a dial-back request may be answered for: the requester (the peer at the other end of the stream),
    whether the request names it or leaves the id out; None when it names another peer. The dial proves the peer
    id by its Noise handshake, so answering for a named third peer would test that peer's addresses for anyone."""
    if not claimed or claimed == requester.to_bytes():
        return requester
    return None


class DialBackService(AutoNATService):
    """AutoNAT v1 whose server dials back on a fresh connection, for the requester only (see the module
    docstring)."""

    def __init__(self, host: IHost) -> None:
        super().__init__(host, serve=False)  # type: ignore[arg-type]
        self._answering = trio.CapacityLimiter(MAX_CONCURRENT_REQUESTS)
        host.set_stream_handler(AUTONAT_PROTOCOL_ID, self._handle_bounded)

    async def _handle_bounded(self, stream: INetStream) -> None:
        try:
            self._answering.acquire_nowait()
        except trio.WouldBlock:
            await stream.reset()
            return
        try:
            with trio.move_on_after(ASK_TIMEOUT_S):
                await self.handle_stream(stream)
        finally:
            self._answering.release()

    async def handle_stream(self, stream: INetStream) -> None:
        """One request: a dial-back for the requester's own peer id (`dial_back_for`; a request naming another is
        refused, E_BAD_REQUEST), at the requester's observed IP only (`dial_back_addrs`)."""
        try:
            request = Message()
            request.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_REQUEST_BYTES))
            requester = stream.muxed_conn.peer_id
            answer_for = dial_back_for(bytes(request.dial.peer.id), requester)
            if request.type == Message.DIAL and answer_for is None:
                response = Message(type=Message.DIAL_RESPONSE)
                response.dialResponse.status = Message.E_BAD_REQUEST
                response.dialResponse.statusText = "a dial-back is only for the requester's own peer id"
            else:
                request.dial.peer.id = requester.to_bytes()
                relayed = _over_relayed_connection(stream)
                response = await self._handle_request(request, self._observed_ip(stream), relayed)
            await stream.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as e:  # noqa: BLE001 - a garbled, slow or vanished requester gets no answer
            logger.debug("dial-back request failed: %r", e)
        finally:
            await stream.close()

    @staticmethod
    def _filter_by_observed_ip(addrs: list[bytes], observed_ip: str | None) -> list[bytes]:
        return dial_back_addrs(addrs, observed_ip)

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        network = self.host.get_network()
        for raw in addrs:
            addr = Multiaddr(raw)
            transport = network.transport_manager.transport_for_dialing(addr)  # type: ignore[attr-defined]
            if transport is None:
                continue
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT_S):
                    conn = await transport.dial(addr)
                    try:
                        await network.upgrader.upgrade_security(conn, True, peer_id)  # type: ignore[attr-defined]
                    finally:
                        await conn.close()
                return raw
            except Exception as e:  # noqa: BLE001 - any failure is "not reachable there"
                logger.debug("dial-back to %s at %s failed: %r", peer_id, addr, e)
        return None


def _over_relayed_connection(stream: INetStream) -> bool:
    """Whether `stream` came through a relay (then the requester's IP is the relay's: refused, as the spec says);
    a connection that cannot say counts as relayed."""
    try:
        return any("/p2p-circuit" in str(a) for a in stream.muxed_conn.get_transport_addresses())
    except Exception:  # noqa: BLE001 - cannot tell: refuse
        return True


def serves_dial_back(host: IHost, peer: ID) -> bool:
    """Whether `peer` said (by identify) that it answers dial-back requests."""
    try:
        return str(AUTONAT_PROTOCOL_ID) in (host.get_peerstore().get_protocols(peer) or [])
    except Exception:  # noqa: BLE001 - a peer the peerstore does not know (yet) does not
        return False


async def check_reachability(service: DialBackService, addrs: list[Multiaddr]) -> Reachability:
    """Ask up to MAX_PEERS_ASKED connected peers that answer dial-backs to dial `addrs` back; their verdict."""
    host = service.host
    peers = [p for p in host.get_connected_peers() if serves_dial_back(host, p)][:MAX_PEERS_ASKED]
    answers: list[bool | None] = []

    async def ask(peer: ID) -> None:
        try:
            status, _ = await service.query_server(peer, [a.to_bytes() for a in addrs], timeout=ASK_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - an asker that fails tells nothing
            logger.debug("dial-back request to %s failed: %r", peer, e)
            answers.append(None)
            return
        answers.append({Message.OK: True, Message.E_DIAL_ERROR: False}.get(status))

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(ask, peer)
    verdict = reachability_verdict(answers)
    logger.debug("reachability: %s (answers %s from %d peers)", verdict, answers, len(peers))
    return verdict
