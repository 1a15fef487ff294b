"""Circuit relay v2 and the reachability check on loopback (one process): the decisions alone, a relayed dial,
and a relay holding its limits against floods of reservations and circuits."""

from __future__ import annotations

import functools
import types

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from petald.p2p.host import open_host
from petald.p2p.reachability import (
    AddressView,
    Reachability,
    check_reachability,
    dial_back_addrs,
    dial_back_for,
    reachability_verdict,
    serves_dial_back,
    should_recheck,
)
from petald.p2p.relay import (
    RelayPolicy,
    admit_circuit,
    can_punch,
    is_direct,
    punch_source,
    relay_candidates,
    relayed_addr,
    relayed_beside_direct,
)

LOOPBACK = ("127.0.0.1", 0)
ECHO = "/test/echo/1"


def test_admit_circuit_bounds_total_source_and_destination():
    policy = RelayPolicy(max_circuits=4, max_circuits_per_source=2, max_circuits_per_destination=2)
    assert admit_circuit(policy, total=0, from_source=0, to_destination=0)
    assert not admit_circuit(policy, total=4, from_source=0, to_destination=0)
    assert not admit_circuit(policy, total=1, from_source=2, to_destination=0)
    assert not admit_circuit(policy, total=1, from_source=0, to_destination=2)


def test_reachability_verdict_needs_one_dial_back_for_public():
    assert reachability_verdict([]) == Reachability.UNKNOWN
    assert reachability_verdict([None, None]) == Reachability.UNKNOWN
    assert reachability_verdict([False, None]) == Reachability.PRIVATE
    assert reachability_verdict([False, True]) == Reachability.PUBLIC


def test_dial_back_tries_only_the_observed_ip_at_announced_ports():
    announced = [Multiaddr(a).to_bytes() for a in ("/ip4/10.0.0.2/tcp/4001", "/ip4/192.0.2.9/tcp/4001")]
    announced += [Multiaddr(f"/ip4/10.0.0.2/tcp/{port}").to_bytes() for port in range(5000, 5010)]
    addrs = [str(Multiaddr(a)) for a in dial_back_addrs([*announced, b"garbage"], "203.0.113.2")]
    assert addrs[0] == "/ip4/203.0.113.2/tcp/4001" and len(addrs) == 4
    assert all(a.startswith("/ip4/203.0.113.2/") for a in addrs)
    assert dial_back_addrs(announced, None) == []


def test_relayed_addr_and_relay_candidates():
    assert relayed_addr("/ip4/1.2.3.4/tcp/5/p2p/R", "R", "ME") == "/ip4/1.2.3.4/tcp/5/p2p/R/p2p-circuit/p2p/ME"
    a, b, c = (ID(bytes([0, 1, i])) for i in range(3))
    assert relay_candidates([a], [b, a, c], held={c}, failed=set()) == [a, b]
    assert relay_candidates([a], [b], held=set(), failed={a}) == [b]


def test_punching_dials_leave_from_the_listening_port_that_can_reach_the_peer():
    listening = [Multiaddr(a) for a in ("/ip4/127.0.0.1/tcp/4000", "/ip4/10.0.1.2/tcp/4001")]
    assert punch_source(listening, Multiaddr("/ip4/203.0.113.6/tcp/4001")) == ("10.0.1.2", 4001)
    assert punch_source(listening, Multiaddr("/ip4/127.0.0.1/tcp/9")) == ("127.0.0.1", 4000)
    assert punch_source([Multiaddr("/ip4/0.0.0.0/tcp/4001")], Multiaddr("/ip4/203.0.113.6/tcp/1")) == ("0.0.0.0", 4001)
    assert punch_source(listening[:1], Multiaddr("/ip4/203.0.113.6/tcp/4001")) is None  # loopback reaches no one
    assert punch_source(listening, Multiaddr("/dns4/example.org/tcp/4001")) is None
    assert can_punch(listening) and not can_punch(listening[:1])  # a client on loopback takes no part


async def _echo(stream) -> None:
    await stream.write(b"echo:" + await stream.read(100))
    await stream.close()


async def _hop(host, relay: ID, msg: HopMessage) -> HopMessage | None:
    """One HOP exchange; None if the relay reset the stream without an answer."""
    try:
        stream = await host.new_stream(relay, [HOP])
        await write_delimited_msg(stream, msg)
        with trio.fail_after(10):
            return await read_delimited_msg(stream, HopMessage)
    except Exception:
        return None


def test_a_peer_known_only_by_relayed_addresses_is_dialled_through_its_relay():
    trio.run(_relayed_dial)


async def _relayed_dial() -> None:
    policy = RelayPolicy()
    async with (
        open_host(create_new_key_pair(), LOOPBACK, relay=policy) as relay,
        open_host(create_new_key_pair(), LOOPBACK) as home,
        open_host(create_new_key_pair(), LOOPBACK) as client,
        trio.open_nursery() as nursery,
    ):
        home.set_stream_handler(ECHO, _echo)
        home.reservations.use_relays([str(relay.get_addrs()[0])])
        nursery.start_soon(home.reservations.keep)
        with trio.fail_after(10):
            while not home.reservations.addrs():
                await home.reservations.changed.wait()
        (addr,) = home.reservations.addrs()
        assert addr == f"{relay.get_addrs()[0]}/p2p-circuit/p2p/{home.get_id()}"

        # a peer that is not our relay cannot open a circuit to us
        await client.connect(PeerInfo(home.get_id(), home.get_transport_addrs()))
        stop = await client.new_stream(home.get_id(), [STOP])
        await write_delimited_msg(stop, StopMessage(type=StopMessage.CONNECT, peer=CircuitPeerId(id=b"x")))
        with trio.fail_after(10):
            assert (await read_delimited_msg(stop, StopMessage)).status == StatusCode.PERMISSION_DENIED
        await client.disconnect(home.get_id())
        client.get_peerstore().clear_addrs(home.get_id())

        # as clients and servers do: connect with the address of the DHT entry, then open streams
        with trio.fail_after(20):
            await client.connect(PeerInfo(home.get_id(), [Multiaddr(addr)]))
            for i in range(2):
                stream = await client.new_stream(home.get_id(), [ECHO])
                await stream.write(b"hi%d" % i)
                assert await stream.read(100) == b"echo:hi%d" % i
        assert home.get_id() in client.reached_through_relay
        assert relay.circuits.open_circuits == 1 and relay.circuits.bytes_relayed > 0

        # once a direct connection stands beside the relayed one (as after a hole punch), a long-lived stream on
        # the relayed one is told to move (push links do), and new streams take the direct one
        relayed_stream = await client.new_stream(home.get_id(), [ECHO])
        assert not relayed_beside_direct(client, relayed_stream)
        with trio.fail_after(10):
            await client.get_network().dial_addr(home.get_transport_addrs()[0], home.get_id())
        assert [is_direct(c) for c in client.get_network().get_connections(home.get_id())].count(True) == 1
        assert relayed_beside_direct(client, relayed_stream)
        assert not relayed_beside_direct(client, await client.new_stream(home.get_id(), [ECHO]))

        # the reachability check: loopback peers dial each other back
        with trio.fail_after(20):
            assert await check_reachability(client.dial_back, client.get_transport_addrs()) == Reachability.PUBLIC
        nursery.cancel_scope.cancel()


def test_reservation_and_circuit_floods_are_refused_beyond_the_limits():
    trio.run(_floods)


async def _floods() -> None:
    policy = RelayPolicy(max_reservations=2, max_circuits=8, max_circuits_per_source=2, max_circuits_per_destination=4)
    async with (
        open_host(create_new_key_pair(), LOOPBACK, relay=policy) as relay,
        open_host(create_new_key_pair(), LOOPBACK) as home,
        open_host(create_new_key_pair(), LOOPBACK) as flooder,
        open_host(create_new_key_pair(), LOOPBACK) as third,
        trio.open_nursery() as nursery,
    ):
        service = relay.circuits
        relay_id, relay_addrs = relay.get_id(), relay.get_transport_addrs()
        for host in (home, flooder, third):
            await host.connect(PeerInfo(relay_id, relay_addrs))
        home.reservations.use_relays([str(relay.get_addrs()[0])])
        nursery.start_soon(home.reservations.keep)
        with trio.fail_after(10):
            while not home.reservations.addrs():
                await home.reservations.changed.wait()

        # 10 000 RESERVEs in one write: one exchange per stream, one reservation, for the connection's own peer
        stream = await flooder.new_stream(relay_id, [HOP])
        spoofed = HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=third.get_id().to_bytes()))
        await stream.write(encode_varint_prefixed(spoofed.SerializeToString()) * 10_000)
        with trio.fail_after(10):
            assert (await read_delimited_msg(stream, HopMessage)).status == StatusCode.OK
        reserved = set(service.resource_manager._reservations)
        assert reserved == {home.get_id(), flooder.get_id()}, "a reservation was taken for another peer"
        # the limit: a third peer is refused
        answer = await _hop(third, relay_id, HopMessage(type=HopMessage.RESERVE))
        assert answer is not None and answer.status == StatusCode.RESOURCE_LIMIT_EXCEEDED

        # 200 concurrent HOP streams of one peer: at most 8 at a time are read, the rest refused at once
        answers: list[HopMessage | None] = []

        async def reserve_again() -> None:
            answers.append(await _hop(flooder, relay_id, HopMessage(type=HopMessage.RESERVE)))

        with trio.fail_after(60):
            async with trio.open_nursery() as flood:
                for _ in range(200):
                    flood.start_soon(reserve_again)
        statuses = [a.status if a else None for a in answers]
        assert statuses.count(StatusCode.RESOURCE_LIMIT_EXCEEDED) + statuses.count(None) > 0
        assert all(s in (StatusCode.OK, StatusCode.RESOURCE_LIMIT_EXCEEDED, None) for s in statuses)

        # a circuit flood from one peer: at most max_circuits_per_source STOP streams ever reach the reserved peer
        stops = 0
        original = home.circuits._handle_stop_stream

        async def counting(stream) -> None:
            nonlocal stops
            stops += 1
            await original(stream)

        home.set_stream_handler(STOP, counting)
        connect = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=home.get_id().to_bytes()))
        results: list[HopMessage | None] = []
        open_most = 0

        async def open_circuit() -> None:
            nonlocal open_most
            results.append(await _hop(flooder, relay_id, connect))
            open_most = max(open_most, service.open_circuits)

        with trio.fail_after(60):
            async with trio.open_nursery() as flood:
                for _ in range(50):
                    flood.start_soon(open_circuit)
        assert stops <= policy.max_circuits_per_source
        assert open_most <= policy.max_circuits_per_source
        assert service.circuits_refused >= 1
        assert sum(1 for r in results if r and r.status == StatusCode.OK) <= policy.max_circuits_per_source

        # the relay is still up: the legitimate reservation still carries a circuit from another peer
        home.set_stream_handler(ECHO, _echo)
        with trio.fail_after(30):
            await third.connect(PeerInfo(home.get_id(), [Multiaddr(a) for a in home.reservations.addrs()]))
            stream = await third.new_stream(home.get_id(), [ECHO])
            await stream.write(b"still")
            assert await stream.read(100) == b"echo:still"
        nursery.cancel_scope.cancel()


def test_garbage_on_the_relay_and_dial_back_protocols_leaves_the_relay_serving():
    trio.run(_garbage)


async def _garbage() -> None:
    from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID

    junk = [b"", b"\x00", b"\xff" * 10, b"\x05hello", encode_varint_prefixed(b"\x08\x63" * 100), bytes(range(256))]
    async with (
        open_host(create_new_key_pair(), LOOPBACK, relay=RelayPolicy()) as relay,
        open_host(create_new_key_pair(), LOOPBACK) as peer,
    ):
        await peer.connect(PeerInfo(relay.get_id(), relay.get_transport_addrs()))
        with trio.fail_after(60):
            for protocol in (HOP, STOP, AUTONAT_PROTOCOL_ID):
                for data in junk:
                    stream = await peer.new_stream(relay.get_id(), [protocol])
                    try:  # the relay may answer, close or reset: anything but stopping
                        await stream.write(data)
                        await stream.close()
                        await stream.read(1024)
                    except Exception:
                        pass
            answer = await _hop(peer, relay.get_id(), HopMessage(type=HopMessage.RESERVE))
        assert answer is not None and answer.status == StatusCode.OK


def test_reachability_is_rechecked_when_listening_or_observed_addresses_change():
    checked = AddressView(frozenset({"/ip4/10.0.0.2/tcp/4001/p2p/ME"}), frozenset({"203.0.113.2"}))
    same = AddressView(checked.listening, checked.observed_ips)
    assert not should_recheck(checked, same, since_check_s=3600)
    new_ip = AddressView(checked.listening, frozenset({"203.0.113.2", "198.51.100.7"}))
    assert should_recheck(checked, new_ip, since_check_s=60)
    assert not should_recheck(checked, new_ip, since_check_s=5)  # at most once per MIN_RECHECK_INTERVAL_S
    observer_left = AddressView(checked.listening, frozenset())
    assert not should_recheck(checked, observer_left, since_check_s=60)
    moved = AddressView(frozenset({"/ip4/10.0.0.2/tcp/4002/p2p/ME"}), checked.observed_ips)
    assert should_recheck(checked, moved, since_check_s=60)


class _Announced:
    """Stands for the node's announcer: records what it is asked to announce."""

    def __init__(self):
        self.entry = types.SimpleNamespace(addrs=[])
        self.published: list[dict] = []

    async def publish(self, **changes) -> None:
        self.published.append(changes)


def test_a_node_judged_private_that_becomes_dialable_rechecks_and_announces_itself_public():
    trio.run(_recheck_after_address_change)


async def _recheck_after_address_change() -> None:
    from petald.config import NodeConfig
    from petald.node import _recheck_reachability, _Relaying

    async with (
        open_host(create_new_key_pair(), LOOPBACK) as node,
        open_host(create_new_key_pair(), LOOPBACK) as peer,
        trio.open_nursery() as nursery,
    ):
        await node.connect(PeerInfo(peer.get_id(), peer.get_transport_addrs()))
        with trio.fail_after(10):
            while not serves_dial_back(node, peer.get_id()):
                await trio.sleep(0.05)
        relaying = _Relaying(node, NodeConfig(), nursery)
        relaying.start()  # as after a first check that said private
        announced = _Announced()
        nursery.start_soon(
            functools.partial(
                _recheck_reachability, node, NodeConfig(), announced, relaying, Reachability.PRIVATE, 0.05, 0.0
            )
        )
        await trio.sleep(0.3)
        assert announced.published == []  # nothing changed: no new check
        await node.get_network().listen(Multiaddr("/ip4/127.0.0.2/tcp/0"))  # a new address (another interface)
        with trio.fail_after(20):
            while not announced.published:
                await trio.sleep(0.05)
        (changes,) = announced.published
        assert changes["reachability"] == "public" and len(changes["addrs"]) == 2
        assert set(changes["addrs"]) == set(node.listening_addrs())
        assert not relaying.active and node.relayed_addrs is None
        nursery.cancel_scope.cancel()


def test_a_dial_back_answers_for_the_requester_only():
    me, other = ID(bytes([0, 1, 1])), ID(bytes([0, 1, 2]))
    assert dial_back_for(me.to_bytes(), me) == me
    assert dial_back_for(b"", me) == me  # a request that leaves its id out is the requester's
    assert dial_back_for(other.to_bytes(), me) is None


def test_a_dial_back_request_naming_another_peer_or_ip_dials_no_one_else():
    trio.run(_dial_back_abuse)


async def _dial_back_abuse() -> None:
    accepted = {"127.0.0.1": 0, "127.0.0.2": 0}  # TCP connections third parties got from the answering node

    async def count(stream) -> None:
        accepted[stream.socket.getsockname()[0]] += 1
        await stream.aclose()

    async with (
        open_host(create_new_key_pair(), LOOPBACK) as answering,
        open_host(create_new_key_pair(), LOOPBACK) as requester,
        open_host(create_new_key_pair(), LOOPBACK) as third,
        trio.open_nursery() as nursery,
    ):
        listeners = [await nursery.start(functools.partial(trio.serve_tcp, count, 0, host=host)) for host in accepted]
        port_on = {ls[0].socket.getsockname()[0]: ls[0].socket.getsockname()[1] for ls in listeners}
        await requester.connect(PeerInfo(answering.get_id(), answering.get_transport_addrs()))

        async def ask(peer_id: ID, addrs: list[str]) -> int:
            request = Message(type=Message.DIAL)
            request.dial.peer.id = peer_id.to_bytes()
            request.dial.peer.addrs.extend(Multiaddr(a).to_bytes() for a in addrs)
            stream = await requester.new_stream(answering.get_id(), [AUTONAT_PROTOCOL_ID])
            await stream.write(encode_varint_prefixed(request.SerializeToString()))
            with trio.fail_after(20):
                answer = Message()
                answer.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 4096))
            return answer.dialResponse.status

        # another peer's id, at an address on the requester's own IP: refused, nothing dialled
        third_addrs = [str(a) for a in third.get_transport_addrs()] + [f"/ip4/127.0.0.1/tcp/{port_on['127.0.0.1']}"]
        assert await ask(third.get_id(), third_addrs) == Message.E_BAD_REQUEST
        assert third.get_id() not in answering.get_network().connections
        # the requester's own id, at another IP: only the requester's IP is dialled (that port at 127.0.0.1)
        assert await ask(requester.get_id(), [f"/ip4/127.0.0.2/tcp/{port_on['127.0.0.2']}"]) == Message.E_DIAL_ERROR
        assert accepted == {"127.0.0.1": 0, "127.0.0.2": 0}
        # and its own addresses: reached
        assert await ask(requester.get_id(), [str(a) for a in requester.get_transport_addrs()]) == Message.OK
        nursery.cancel_scope.cancel()
