"""The libp2p host: Noise + Yamux only, plaintext refused, persistent identity, bare exceptions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.net_stream import INetStream
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

from petald.p2p.host import (
    IdentityError,
    connect,
    full_addrs,
    load_or_create_identity,
    open_host,
    peer_id_of,
    read_identity,
    write_identity,
)

ECHO = TProtocol("/petal-test/echo/1")
LOOPBACK = ("127.0.0.1", 0)


async def echo(stream: INetStream) -> None:
    data = await stream.read(1 << 16)
    await stream.write(data[::-1])
    await stream.close()


def test_two_hosts_exchange_bytes_over_noise_and_yamux() -> None:
    async def main() -> None:
        server_keys, client_keys = create_new_key_pair(), create_new_key_pair()
        async with open_host(server_keys, LOOPBACK) as server, open_host(client_keys, LOOPBACK) as client:
            server.set_stream_handler(ECHO, echo)
            addr = full_addrs(server)[0]
            assert addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith(f"/p2p/{peer_id_of(server_keys)}")
            with trio.fail_after(10):
                peer = await connect(client, addr)
                stream = await client.new_stream(peer, [ECHO])
                await stream.write(b"petal over noise")
                assert await stream.read(1 << 16) == b"esion revo latep"
                await stream.close()
            (conn,) = client.get_network().get_connections(peer)
            assert conn.muxed_conn.negotiated_security_protocol == "/noise"
            assert type(conn.muxed_conn).__name__ == "Yamux"

    trio.run(main)


def test_plaintext_only_peer_cannot_connect_either_way() -> None:
    async def main() -> None:
        plain_keys = create_new_key_pair()
        plain = new_host(key_pair=plain_keys, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(plain_keys)})
        async with open_host(create_new_key_pair(), LOOPBACK) as ours:
            async with plain.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                plain_addr = f"{plain.get_transport_addrs()[0]}/p2p/{plain.get_id()}"
                # No common security protocol: the dial fails at once rather than timing out.
                with pytest.raises(SwarmException):
                    await connect(plain, full_addrs(ours)[0], timeout=10)
                with pytest.raises(SwarmException):
                    await connect(ours, plain_addr, timeout=10)
                assert ours.get_connected_peers() == [] and plain.get_connected_peers() == []

    trio.run(main)


def test_identity_file_is_private_and_reloads_to_the_same_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.key"
    created = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert peer_id_of(load_or_create_identity(path)) == peer_id_of(created)
    assert peer_id_of(read_identity(path)) == peer_id_of(created)
    assert peer_id_of(load_or_create_identity(None)) != peer_id_of(created)


def test_write_identity_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    write_identity(path, create_new_key_pair())
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        write_identity(path, create_new_key_pair())
    assert path.read_bytes() == before


def test_corrupt_identity_file_raises_identity_error(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="not a libp2p private key"):
        load_or_create_identity(path)


def test_connect_rejects_an_address_without_peer_id() -> None:
    async def main() -> None:
        async with open_host(create_new_key_pair(), LOOPBACK) as host:
            with pytest.raises(ValueError, match="bad peer address"):
                await connect(host, "/ip4/127.0.0.1/tcp/1")

    trio.run(main)


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, LookupError])
def test_exception_inside_host_comes_out_bare(error: type[BaseException]) -> None:
    async def main() -> None:
        async with open_host(create_new_key_pair(), LOOPBACK):
            await trio.sleep(0.05)
            raise error()

    with pytest.raises(error):
        trio.run(main)
