"""The petald daemon: one trio nursery holding the libp2p host, the DHT, the announcer and the handlers."""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import re
import signal
import sys
import time
from pathlib import Path

import trio

import petald
from petald.config import NodeConfig
from petald.models.loading import load_config, num_blocks
from petald.p2p.dht import ServerEntry, ServerState, SwarmDHT, open_swarm_dht
from petald.p2p.host import full_addrs, load_or_create_identity, open_host, peer_id_of
from petald.serving.balance import SpanInfo, choose_span, should_move
from petald.serving.cache import CacheBudget
from petald.serving.handlers import (
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
    ServingOptions,
    SpanServer,
    open_push_stream,
)
from petald.serving.span import Span
from petald.serving.throughput import cached_throughput, measure_cached, measure_inference_throughput, throughput_key

log = logging.getLogger("petald")

# Longest wait for one read of the whole swarm; a balance check without it is skipped.
SWARM_READ_TIMEOUT = 60.0
# Longest wait for the OFFLINE announcement when the node stops.
STOP_ANNOUNCE_TIMEOUT = 10.0


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
    """Join the swarm, claim a span (JOINING), load it, serve it (ONLINE); with --num-blocks, move it when the
    swarm needs it elsewhere; on SIGTERM, drain and leave."""
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
            key = throughput_key(str(model_dir), end - start, config.quant)
            entry = ServerEntry(
                peer_id=str(peer_id_of(key_pair)),
                state=ServerState.JOINING,
                start=start,
                end=end,
                throughput=config.throughput or cached_throughput(key) or 0.0,
                addrs=addrs,
                cache_tokens_left=config.max_cache_tokens,
                quant=config.quant,
                version=petald.__version__,
            )
            announcer = _Announcer(dht, model_name, key_pair, total_blocks, config.expiry, entry)
            await announcer.publish()  # claim the span before the (slow) load, so others pick elsewhere
            span = await _load_span(model_dir, start, end, config.quant)
            server = SpanServer(span, _serving_options(config, model_name))
            server.throughput = config.throughput or await trio.to_thread.run_sync(
                measure_cached, key, functools.partial(measure_inference_throughput, span)
            )
            host.set_stream_handler(INFERENCE_PROTOCOL, server.handle_inference)
            host.set_stream_handler(INFO_PROTOCOL, server.handle_info)
            host.set_stream_handler(PUSH_PROTOCOL, server.handle_push)
            server.open_push_stream = functools.partial(open_push_stream, host)
            await announcer.publish(state=ServerState.ONLINE, throughput=server.throughput)
            log.info("serving blocks %d:%d of %s at %.1f blocks*steps/s", start, end, model_name, server.throughput)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_heartbeat, announcer, server, config.heartbeat)
                balancing = trio.CancelScope()
                if config.num_blocks is not None and config.balance_period > 0:  # pinned --blocks never move
                    nursery.start_soon(_keep_balanced, balancing, config, announcer, server, model_dir)
                await _wait_for_stop_signal()
                balancing.cancel()  # a move under way must not bring the node back ONLINE
                log.info("stopping: announcing OFFLINE, refusing new sessions")
                server.state = "OFFLINE"
                with trio.move_on_after(STOP_ANNOUNCE_TIMEOUT):
                    await announcer.publish(state=ServerState.OFFLINE)
                await _drain(server, config.drain_timeout)
                nursery.cancel_scope.cancel()
    log.info("stopped")


class _Announcer:
    """Publishes this server's entry, which it keeps as what the swarm should see of the server; never lets a
    DHT failure stop the node."""

    def __init__(self, dht: SwarmDHT, model: str, key_pair, total_blocks: int, expiry: float, entry: ServerEntry):
        self.dht, self.model, self.key_pair, self.total_blocks, self.expiry = dht, model, key_pair, total_blocks, expiry
        self.entry = entry

    async def publish(self, attempts: int = 3, **changes) -> None:
        """Apply `changes` to the entry, then announce it: up to `attempts` tries of at most 30 s each."""
        self.entry = dataclasses.replace(self.entry, **changes)
        for attempt in range(attempts):
            entry = self.entry  # a retry announces what is true now, not what was when this call began
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


async def _heartbeat(announcer: _Announcer, server: SpanServer, period: float) -> None:
    while True:
        await trio.sleep(period * random.uniform(0.9, 1.1))  # jitter: servers do not re-announce in lockstep
        await announcer.publish(cache_tokens_left=server.budget.tokens_left)


async def _choose_blocks(config: NodeConfig, dht: SwarmDHT, model: str, total_blocks: int) -> tuple[int, int]:
    bounds = config.span_bounds()
    if bounds is not None:
        start, end = bounds
        if not 0 <= start < end <= total_blocks:
            raise SystemExit(f"petald: blocks {start}:{end} are outside {model}, which has blocks 0:{total_blocks}")
        return start, end
    await trio.sleep(random.uniform(0, 1))  # servers joining together do not all read the same swarm state
    spans = await _swarm_spans(dht, model, total_blocks)
    if spans is None:
        log.warning("choosing blocks as if the swarm were empty; the balance checks will correct the choice")
    return choose_span(total_blocks, config.num_blocks, (spans or {}).values())


async def _swarm_spans(dht: SwarmDHT, model: str, total_blocks: int) -> dict[str, SpanInfo] | None:
    """Peer id -> (start, end, throughput) of every JOINING or ONLINE server, from its newest entry; None if
    the swarm could not be read in time. A server that has not measured its throughput yet counts as the
    mean of the others."""
    with trio.move_on_after(SWARM_READ_TIMEOUT):
        try:
            found = await dht.get_servers(model, range(total_blocks))
        except Exception as e:  # a read failure skips one decision, it does not stop the node
            log.warning("reading the swarm failed: %r", e)
            return None
        newest: dict[str, ServerEntry] = {}
        for entries in found.values():
            for peer, entry in entries.items():
                if peer not in newest or entry.updated_at > newest[peer].updated_at:
                    newest[peer] = entry  # a server that moved still has its old entry under its old blocks
        live = {peer: entry for peer, entry in newest.items() if entry.state != ServerState.OFFLINE}
        known = [entry.throughput for entry in live.values() if entry.throughput > 0]
        unknown = sum(known) / len(known) if known else 1.0
        return {peer: (e.start, e.end, e.throughput or unknown) for peer, e in live.items()}
    log.warning("reading the swarm took over %.0f s", SWARM_READ_TIMEOUT)
    return None


async def _keep_balanced(
    scope: trio.CancelScope, config: NodeConfig, announcer: _Announcer, server: SpanServer, model_dir: Path
) -> None:
    """Every balance_period (x 0.5-1.5, so servers do not check in lockstep) read the swarm, and move this
    server's span where `should_move` says the swarm needs it."""
    with scope:
        while True:
            await trio.sleep(config.balance_period * random.uniform(0.5, 1.5))
            spans = await _swarm_spans(announcer.dht, announcer.model, announcer.total_blocks)
            if spans is None:
                continue
            me = announcer.entry.peer_id
            spans[me] = (server.span.start, server.span.end, server.throughput)  # ours as it is, not as announced
            target = should_move(announcer.total_blocks, me, spans, config.balance_quality)
            if target is None:
                log.debug("balance check: staying on blocks %d:%d", server.span.start, server.span.end)
            else:
                await _move(target, config, announcer, server, model_dir)


async def _move(
    target: tuple[int, int], config: NodeConfig, announcer: _Announcer, server: SpanServer, model_dir: Path
) -> None:
    """Serve `target` instead of the current span: leave the old one (OFFLINE, drain), claim the new one
    (JOINING), load it, swap it in, announce ONLINE. If the load fails, serve the old span again."""
    (old_start, old_end), (start, end) = (server.span.start, server.span.end), target
    log.info("moving from blocks %d:%d to %d:%d: the swarm's weakest blocks gain", old_start, old_end, start, end)
    log.info("announcing OFFLINE for blocks %d:%d, refusing new sessions", old_start, old_end)
    server.state = "OFFLINE"
    await announcer.publish(state=ServerState.OFFLINE)
    # claimed at once, not after the drain: servers checking meanwhile count this one there, not in the gap
    log.info("announcing JOINING for blocks %d:%d", start, end)
    await announcer.publish(state=ServerState.JOINING, start=start, end=end)
    await _drain(server, config.drain_timeout)
    try:
        span = await _load_span(model_dir, start, end, config.quant)
    except Exception:  # e.g. out of memory: what is loaded still works
        log.exception("loading blocks %d:%d failed; serving blocks %d:%d again", start, end, old_start, old_end)
    else:
        server.span = span  # the handlers read server.span; a session still open on the old one fails its next step
        server.budget = CacheBudget(config.max_cache_tokens)
    server.state = "ONLINE"
    start, end = server.span.start, server.span.end
    await announcer.publish(state=ServerState.ONLINE, start=start, end=end, cache_tokens_left=server.budget.tokens_left)
    # the span's size is unchanged, so is its throughput
    log.info("serving blocks %d:%d of %s at %.1f blocks*steps/s", start, end, announcer.model, server.throughput)


async def _load_span(model_dir: Path, start: int, end: int, quant: str) -> Span:
    log.info("loading blocks %d:%d of %s (%s)", start, end, model_dir.name, quant)
    # abandoned on cancel: a node stopping mid-load exits without waiting for the read to finish
    return await trio.to_thread.run_sync(Span.load, model_dir, start, end, quant, abandon_on_cancel=True)


async def _drain(server: SpanServer, timeout: float) -> None:
    """Wait, at most `timeout` s, until the open sessions end."""
    with trio.move_on_after(timeout):
        while server.budget.sessions:
            await server.sessions_done.wait()
    if server.budget.sessions:
        log.warning("drain timeout: %d sessions still open, closing them", server.budget.sessions)


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
