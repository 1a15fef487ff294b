"""The network half of a server's throughput: how fast bytes reach a peer of the swarm over libp2p.

A new server sends a probe of a few MiB to one of its initial peers (every node answers probes) and times
it until the acknowledgement. It measures the path that matters, to the swarm, through the same
encryption and multiplexing as real traffic; it is not a speedtest against internet servers (which a
private swarm may not reach)."""

from __future__ import annotations

import logging

import trio

from petald.p2p.host import connect
from petald.p2p.wire import (
    MAX_PROBE_BYTES,
    BandwidthAck,
    BandwidthProbe,
    ErrorReply,
    Limits,
    ProtocolError,
    read_message,
    write_message,
)

log = logging.getLogger(__name__)
BANDWIDTH_PROTOCOL = "/petal/bandwidth/1.0.0"
PROBE_BYTES = 4 * 2**20
PROBE_TIMEOUT = 30.0
PROBE_LIMITS = Limits(max_tensor_bytes=MAX_PROBE_BYTES)


async def handle_bandwidth_probe(stream) -> None:
    """Answer one probe once all of it arrived; a malformed one gets an error frame."""
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            try:
                probe = await read_message(stream, PROBE_LIMITS, expect=(BandwidthProbe,))
                if not isinstance(probe, BandwidthProbe):
                    raise ProtocolError("expected a 'probe' message here, got an error", "unexpected")
                reply = BandwidthAck(len(probe.payload))
            except ProtocolError as e:
                reply = ErrorReply(e.code, str(e))
            await write_message(stream, reply)
    except Exception as e:  # noqa: BLE001 - a peer's failure ends only its own probe
        log.debug("bandwidth probe ended: %r", e)
    finally:
        with trio.move_on_after(5):
            try:
                await stream.close()
            except Exception:  # noqa: BLE001 - already closed by the peer
                pass


async def measure_bandwidth(host, peer_addrs: list[str], probe_bytes: int = PROBE_BYTES) -> float | None:
    """Bytes per second to the first of `peer_addrs` that answers a probe; None if none does."""
    payload = bytes(probe_bytes)
    for addr in peer_addrs:
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                peer = await connect(host, addr)
                stream = await host.new_stream(peer, [BANDWIDTH_PROTOCOL])
                try:
                    started = trio.current_time()
                    await write_message(stream, BandwidthProbe(payload))
                    reply = await read_message(stream, PROBE_LIMITS, expect=(BandwidthAck,))
                    elapsed = trio.current_time() - started
                finally:
                    await stream.close()
            if not isinstance(reply, BandwidthAck) or reply.received != probe_bytes:
                raise ProtocolError(f"the peer answered {reply}")
            return probe_bytes / max(elapsed, 1e-6)
        except Exception as e:  # noqa: BLE001 - try the next peer
            log.info("bandwidth probe to %s failed: %r", addr, e)
    return None
