"""The petald daemon: one trio nursery holding the libp2p host, the DHT, the announcer and the handlers."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import signal
import sys
import time

import trio

import petald
from petald.config import NodeConfig
from petald.models.loading import load_config, num_blocks
from petald.p2p.dht import ServerEntry, ServerState, SwarmDHT, open_swarm_dht
from petald.p2p.host import full_addrs, load_or_create_identity, open_host, peer_id_of
from petald.serving.balance import choose_span
from petald.serving.handlers import INFERENCE_PROTOCOL, INFO_PROTOCOL, ServingOptions, SpanServer
from petald.serving.span import Span
from petald.serving.throughput import measure_inference_throughput

log = logging.getLogger("petald")


async def run_dht_node(config: NodeConfig) -> None:
    """A node that serves no blocks: a DHT peer other nodes can bootstrap through."""
    key_pair = load_or_create_identity(config.identity)
    async with open_host(key_pair, (config.host, config.port)) as host:
        async with open_swarm_dht(host, config.initial_peers):
            _print_addrs(full_addrs(host))
            log.info("DHT node %s ready", peer_id_of(key_pair))
            await _wait_for_stop_signal()
    log.info("DHT node stopped")


async def run_server(config: NodeConfig) -> None:
    """Join the swarm, claim a span (JOINING), load it, serve it (ONLINE); on SIGTERM, drain and leave."""
    from petald.models.checkpoints import checkpoint_dir, swarm_model_name

    model_dir = checkpoint_dir(config.model)
    model_name = swarm_model_name(config.model)
    total_blocks = num_blocks(load_config(model_dir))
    key_pair = load_or_create_identity(config.identity)
    async with open_host(key_pair, (config.host, config.port)) as host:
        addrs = _public_addrs(full_addrs(host), config.public_host)
        _print_addrs(addrs)
        async with open_swarm_dht(host, config.initial_peers) as dht:
            start, end = await _choose_blocks(config, dht, model_name, total_blocks)
            entry = ServerEntry(
                peer_id=str(peer_id_of(key_pair)),
                state=ServerState.JOINING,
                start=start,
                end=end,
                throughput=config.throughput or 0.0,
                addrs=addrs,
                cache_tokens_left=config.max_cache_tokens,
                quant=config.quant,
                version=petald.__version__,
            )
            announce = _Announcer(dht, model_name, key_pair, total_blocks, config.expiry)
            await announce(entry)  # claim the span before the (slow) load, so others pick elsewhere
            log.info("loading blocks %d:%d of %s (%s)", start, end, model_name, config.quant)
            span = await trio.to_thread.run_sync(Span.load, model_dir, start, end, config.quant)
            server = SpanServer(span, _serving_options(config, model_name))
            server.throughput = config.throughput or await trio.to_thread.run_sync(measure_inference_throughput, span)
            host.set_stream_handler(INFERENCE_PROTOCOL, server.handle_inference)
            host.set_stream_handler(INFO_PROTOCOL, server.handle_info)

            def current_entry() -> ServerEntry:
                return dataclasses.replace(
                    entry,
                    state=ServerState(server.state),
                    throughput=server.throughput,
                    cache_tokens_left=server.budget.tokens_left,
                )

            await announce(current_entry())
            log.info("serving blocks %d:%d of %s at %.1f blocks*steps/s", start, end, model_name, server.throughput)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_heartbeat, announce, current_entry, config.heartbeat)
                await _wait_for_stop_signal()
                log.info("stopping: announcing OFFLINE, refusing new sessions")
                server.state = "OFFLINE"
                with trio.move_on_after(10):
                    await announce(current_entry())
                with trio.move_on_after(config.drain_timeout):
                    while server.budget.sessions:
                        await server.sessions_done.wait()
                if server.budget.sessions:
                    log.warning("drain timeout: %d sessions still open, closing them", server.budget.sessions)
                nursery.cancel_scope.cancel()
    log.info("stopped")


class _Announcer:
    """Publishes this server's entry; never lets a DHT failure stop the node."""

    def __init__(self, dht: SwarmDHT, model: str, key_pair, total_blocks: int, expiry: float):
        self.dht, self.model, self.key_pair, self.total_blocks, self.expiry = dht, model, key_pair, total_blocks, expiry

    async def __call__(self, entry: ServerEntry, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                with trio.fail_after(30):
                    stored = await self.dht.announce(
                        self.model, entry, self.key_pair, num_blocks=self.total_blocks, ttl=self.expiry
                    )
                log.debug(
                    "announced %s for blocks %d:%d (stored by %d peers)", entry.state, entry.start, entry.end, stored
                )
                # a node alone in its swarm stores only its own copy; otherwise no peer means the write was lost
                if stored > 0 or not self.dht.kad.routing_table.get_peer_ids():
                    return
            except Exception as e:  # the next attempt, or the next heartbeat, retries
                log.warning("announcing %s failed: %r", entry.state, e)
            await trio.sleep(1 + attempt)


async def _heartbeat(announce: _Announcer, current_entry, period: float) -> None:
    while True:
        await trio.sleep(period * random.uniform(0.9, 1.1))  # jitter: servers do not re-announce in lockstep
        await announce(current_entry())


async def _choose_blocks(config: NodeConfig, dht: SwarmDHT, model: str, total_blocks: int) -> tuple[int, int]:
    bounds = config.span_bounds()
    if bounds is not None:
        start, end = bounds
        if not 0 <= start < end <= total_blocks:
            raise SystemExit(f"petald: blocks {start}:{end} are outside {model}, which has blocks 0:{total_blocks}")
        return start, end
    await trio.sleep(random.uniform(0, 1))  # servers joining together do not all read the same swarm state
    found = await dht.get_servers(model, range(total_blocks))
    spans = {
        (peer, e.start, e.end, e.throughput or 1.0)
        for entries in found.values()
        for peer, e in entries.items()
        if e.state != ServerState.OFFLINE
    }
    return choose_span(total_blocks, config.num_blocks, [(s, e, t) for _, s, e, t in spans])


def _serving_options(config: NodeConfig, model: str) -> ServingOptions:
    return ServingOptions(
        model=model,
        max_cache_tokens=config.max_cache_tokens,
        max_batch_size=config.max_batch_size,
        step_timeout=config.step_timeout,
        session_timeout=config.session_timeout,
        version=petald.__version__,
    )


def _public_addrs(addrs: list[str], public_host: str | None) -> list[str]:
    if public_host is None:
        return addrs
    return [re.sub(r"^/ip4/[^/]+/", f"/ip4/{public_host}/", addr) for addr in addrs]


def _print_addrs(addrs: list[str]) -> None:
    for addr in addrs:
        print(addr, flush=True)


async def _wait_for_stop_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            return


def configure_logging(config: NodeConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("petald").setLevel(config.log_level.upper())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        return json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )
