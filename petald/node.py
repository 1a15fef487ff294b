"""The petald daemon: one trio nursery holding the libp2p host, the DHT, the announcer and the handlers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import trio
from multiaddr import Multiaddr

import petald
from petald.config import ConfigError, NodeConfig, parse_memory
from petald.metrics import NodeMetrics, serving_metrics
from petald.models.loading import check_span, load_config, num_blocks, release_free_memory
from petald.p2p.bandwidth import BANDWIDTH_PROTOCOL, handle_bandwidth_probe, measure_bandwidth
from petald.p2p.dht import MAX_DIRECT_PEERS, ServerEntry, ServerState, SwarmDHT, open_swarm_dht
from petald.p2p.host import PetalHost, connect, full_addrs, load_or_create_identity, open_host, peer_id_of
from petald.p2p.reachability import (
    MIN_RECHECK_INTERVAL_S,
    Reachability,
    check_reachability,
    serves_dial_back,
    should_recheck,
)
from petald.p2p.relay import RelayPolicy
from petald.p2p.swarm_map import current_entries, serving
from petald.serving.adapters import load_lora_adapter
from petald.serving.balance import SpanInfo, choose_span, move_candidates, should_move
from petald.serving.handlers import (
    ServingOptions,
    SpanServer,
)
from petald.serving.span import Span, block_weight_bytes, blocks_within_memory, kv_bytes_per_token, weight_bytes
from petald.serving.throughput import (
    announced_throughput,
    cached_throughput,
    measure_cached,
    measure_inference_throughput,
    network_throughput,
    throughput_key,
)

log = logging.getLogger("petald")

# Longest wait for one read of the whole swarm; a balance check without it is skipped.
SWARM_READ_TIMEOUT = 60.0
# Longest wait for the OFFLINE announcement when the node stops.
STOP_ANNOUNCE_TIMEOUT = 10.0
# Longest wait at start for the reachability check, and behind NAT for a first relay reservation.
REACHABILITY_TIMEOUT = 20.0
FIRST_RESERVATION_TIMEOUT = 30.0
RECHECK_PERIOD_S = 5.0  # how often the node looks whether its addresses changed (a re-check: should_recheck)
IDENTIFY_WAIT = 5.0


async def run_dht_node(config: NodeConfig) -> None:
    """A node that serves no blocks: a DHT peer other nodes can bootstrap through."""
    key_pair = load_or_create_identity(config.identity)
    async with open_host(key_pair, (config.host, config.port), _relay_policy(config)) as host:
        host.set_stream_handler(BANDWIDTH_PROTOCOL, handle_bandwidth_probe)
        async with open_swarm_dht(host, config.initial_peers):
            _print_addrs(full_addrs(host))
            log.info("DHT node %s ready", peer_id_of(key_pair))
            await _wait_for_stop_signal()
    log.info("DHT node stopped")


async def run_server(config: NodeConfig) -> None:
    """Join the swarm, claim a span (JOINING), load it, serve it (ONLINE); with --num-blocks, move it when the
    swarm needs it elsewhere; on SIGTERM, drain and leave."""
    from petald.models.checkpoints import swarm_model_name

    model_dir, total_blocks = check_model(config)
    config = fit_to_memory(config, load_config(model_dir), total_blocks)
    model_name = swarm_model_name(config.model)
    key_pair = load_or_create_identity(config.identity)
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)  # several servers on one machine: each its share of the cores
    metrics = NodeMetrics()  # JOINING until the span is served: /health answers 503 from the start
    with contextlib.ExitStack() as stack:
        if config.metrics_port is not None:
            port = stack.enter_context(serving_metrics(metrics, config.host, config.metrics_port))
            log.info("metrics at http://%s:%d/metrics (and /health)", config.host, port)
        await _serve(config, model_dir, model_name, total_blocks, key_pair, metrics)
    log.info("stopped")


async def _serve(
    config: NodeConfig, model_dir: Path, model_name: str, total_blocks: int, key_pair, metrics: NodeMetrics
) -> None:
    async with (
        open_host(key_pair, (config.host, config.port), _relay_policy(config)) as host,
        trio.open_nursery() as relays,
    ):
        host.set_stream_handler(BANDWIDTH_PROTOCOL, handle_bandwidth_probe)
        log.info("listening on %s", " ".join(host.listening_addrs()))
        relaying = _Relaying(host, config, relays)
        reachability = await _learn_reachability(host, config, relaying)
        addrs = host.relayed_addrs or _public_addrs(full_addrs(host), config.public_host)
        _print_addrs(addrs)
        # behind NAT nobody can dial it for DHT requests: a DHT client, like libp2p nodes that AutoNAT says are private
        async with open_swarm_dht(host, config.initial_peers, client=reachability == Reachability.PRIVATE) as dht:
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
                weight_bytes=(end - start) * block_weight_bytes(load_config(model_dir), config.quant),
                version=petald.__version__,
                adapters=list(config.adapter_paths()),
                public_name=config.public_name,
                reachability=_announced_reachability(reachability, host),
            )
            announcer = _Announcer(dht, model_name, key_pair, total_blocks, config.expiry, entry, metrics)
            await announcer.publish()  # claim the span before the (slow) load, so others pick elsewhere
            span = await _load_span(model_dir, start, end, config)
            server = SpanServer(span, ServingOptions.from_config(config, model_name), metrics)
            metrics.watch_cache(server.budget)
            server.throughput = config.throughput or await _measure_throughput(host, config, key, span)
            async with trio.open_nursery() as nursery:
                server.attach(metrics.metered_host(host), nursery)
                await announcer.publish(
                    state=ServerState.ONLINE, throughput=server.throughput, weight_bytes=weight_bytes(span.module)
                )
                log.info("serving blocks %d:%d of %s at %.1f blocks*steps/s", start, end, model_name, server.throughput)
                nursery.start_soon(_heartbeat, announcer, server, config.heartbeat, host)
                nursery.start_soon(_follow_relays, host, announcer, relaying)
                nursery.start_soon(_recheck_reachability, host, config, announcer, relaying, reachability)
                balancing = trio.CancelScope()
                if config.num_blocks is not None and config.balance_period > 0:  # pinned --blocks never move
                    nursery.start_soon(_keep_balanced, balancing, config, announcer, server, model_dir)
                await _wait_for_stop_signal()
                balancing.cancel()  # a move under way must not bring the node back ONLINE
                log.info("stopping: announcing OFFLINE, refusing new sessions")
                server.stop_accepting()
                with trio.move_on_after(STOP_ANNOUNCE_TIMEOUT):
                    await announcer.publish(state=ServerState.OFFLINE)
                await server.drain(
                    config.drain_timeout,
                    "unavailable",
                    "this server stopped; the session's cache is gone: open a new session",
                )
                await server.stop()
                nursery.cancel_scope.cancel()
        relays.cancel_scope.cancel()


def _relay_policy(config: NodeConfig) -> RelayPolicy | None:
    return RelayPolicy() if config.relay else None


class _Relaying:
    """Behind NAT: the relay reservations the node keeps (`Reservations.keep`, in `nursery`), started when a check
    says it is private and stopped when a later one says it is public."""

    def __init__(self, host: PetalHost, config: NodeConfig, nursery: trio.Nursery):
        self.host, self.config, self.nursery = host, config, nursery
        self._scope: trio.CancelScope | None = None

    @property
    def active(self) -> bool:
        return self._scope is not None

    def start(self) -> None:
        if self._scope is not None:
            return
        log.info("behind NAT or a firewall: reserving at relays")
        self.host.reservations.use_relays(self.config.relay_peers)
        self._scope = trio.CancelScope()
        self.nursery.start_soon(self._keep, self._scope)

    async def _keep(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.host.reservations.keep()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        self.host.reservations.held.clear()  # not renewed: the relays drop them at expiry
        self.host.relayed_addrs = None


async def _check_reachability(host: PetalHost, config: NodeConfig) -> Reachability:
    listening = _public_addrs(host.listening_addrs(), config.public_host)
    return await check_reachability(host.dial_back, [Multiaddr(a) for a in listening])


async def _learn_reachability(host: PetalHost, config: NodeConfig, relaying: _Relaying) -> Reachability:
    """Ask the initial peers to dial this node back. Behind NAT, start keeping relay reservations and wait for the
    first one, so the node announces an address peers can use."""
    reachability = Reachability.UNKNOWN
    with trio.move_on_after(REACHABILITY_TIMEOUT):
        for addr in config.initial_peers:
            try:
                await connect(host, addr)
            except Exception as e:  # the DHT bootstrap says which peers are unreachable
                log.debug("reachability: initial peer %s: %r", addr, e)
        with trio.move_on_after(IDENTIFY_WAIT):  # identify tells which peers answer dial-backs, soon after connecting
            while host.get_connected_peers() and not any(serves_dial_back(host, p) for p in host.get_connected_peers()):
                await trio.sleep(0.1)
        reachability = await _check_reachability(host, config)
    log.info("reachability: %s", reachability)
    if reachability != Reachability.PRIVATE:
        return reachability
    relaying.start()
    with trio.move_on_after(FIRST_RESERVATION_TIMEOUT):
        while not host.reservations.addrs():
            await host.reservations.changed.wait()
    host.relayed_addrs = host.reservations.addrs() or None
    if host.relayed_addrs is None:
        log.warning("no relay granted a reservation in %.0f s; still trying", FIRST_RESERVATION_TIMEOUT)
    return reachability


def _announced_reachability(reachability: Reachability, host: PetalHost) -> str:
    if reachability == Reachability.PRIVATE:
        return "relayed" if host.relayed_addrs else "private"
    return str(reachability)


async def _follow_relays(host: PetalHost, announcer: _Announcer, relaying: _Relaying) -> None:
    """Behind NAT: whenever the reservations change (a relay died, another granted one), announce the new
    relayed addresses."""
    while True:
        await host.reservations.changed.wait()
        if not relaying.active:
            continue
        host.relayed_addrs = host.reservations.addrs() or None
        addrs = host.relayed_addrs or announcer.entry.addrs
        await announcer.publish(addrs=addrs, reachability=_announced_reachability(Reachability.PRIVATE, host))


async def _recheck_reachability(
    host: PetalHost,
    config: NodeConfig,
    announcer: _Announcer,
    relaying: _Relaying,
    reachability: Reachability,
    period: float = RECHECK_PERIOD_S,
    min_interval_s: float = MIN_RECHECK_INTERVAL_S,
) -> None:
    """When the node's listening addresses change, or peers see it at a new IP (`should_recheck`), ask for
    dial-backs again; a new verdict starts or stops relaying and is announced with the addresses that go with it.
    The DHT keeps the mode it started in (a client behind NAT)."""
    checked, checked_at = host.address_view(), time.monotonic()
    while True:
        await trio.sleep(period)
        view = host.address_view()
        if not should_recheck(checked, view, time.monotonic() - checked_at, min_interval_s):
            continue
        checked, checked_at = view, time.monotonic()
        verdict = await _check_reachability(host, config)
        log.info("addresses changed (%s); reachability: %s", sorted(view.observed_ips), verdict)
        if verdict == Reachability.UNKNOWN or verdict == reachability:
            continue
        reachability = verdict
        if verdict == Reachability.PRIVATE:
            relaying.start()
            host.relayed_addrs = host.reservations.addrs() or None
            addrs = host.relayed_addrs or announcer.entry.addrs
        else:
            relaying.stop()
            addrs = _public_addrs(full_addrs(host), config.public_host)
        await announcer.publish(addrs=addrs, reachability=_announced_reachability(verdict, host))


def check_model(config: NodeConfig) -> tuple[Path, int]:
    """The model's checkpoint directory and block count, once everything a node can check before it starts holds:
    the checkpoint is readable, --blocks / --num-blocks fit the model, and every adapter loads for it. Raises a
    PetalError (CheckpointError, SpanError, AdapterError, ConfigError) naming what is wrong."""
    from petald.models.checkpoints import check_checkpoint_dir, checkpoint_dir

    model_dir = checkpoint_dir(config.model)
    check_checkpoint_dir(model_dir)
    model_config = load_config(model_dir)
    total = num_blocks(model_config)
    bounds = config.span_bounds()
    if bounds is not None:
        check_span(model_config, *bounds)
    if config.num_blocks is not None and config.num_blocks > total:
        raise ConfigError(f"num_blocks is {config.num_blocks}, but {model_dir.name} has {total} blocks")
    for path in config.adapter_paths().values():
        load_lora_adapter(path, model_config, 0, total)  # the whole model: a moving server may serve any blocks
    return model_dir, total


def fit_to_memory(config: NodeConfig, model_config, total_blocks: int) -> NodeConfig:
    """With --max-memory: `config` serving as many blocks as fit (at most --num-blocks), each taking its weights as
    --quant stores them and its share of the --max-cache-tokens cache; with --blocks, ConfigError unless they fit."""
    if config.max_memory is None:
        return config
    block = block_weight_bytes(model_config, config.quant)
    cache = config.max_cache_tokens * kv_bytes_per_token(model_config)
    fit = blocks_within_memory(block, cache, parse_memory(config.max_memory))
    costs = (
        f"a block takes {block / 2**20:.1f} MB of weights ({config.quant}) and {cache / 2**20:.1f} MB of KV cache "
        f"(max_cache_tokens {config.max_cache_tokens})"
    )
    if fit == 0:
        raise ConfigError(f"max_memory {config.max_memory} holds no block: {costs}")
    bounds = config.span_bounds()
    if bounds is not None:
        if bounds[1] - bounds[0] > fit:
            raise ConfigError(f"blocks {config.blocks} do not fit in max_memory {config.max_memory}: {costs}")
        return config
    count = min(total_blocks, fit, config.num_blocks or total_blocks)
    log.info("max_memory %s: serving %d blocks (%s)", config.max_memory, count, costs)
    return dataclasses.replace(config, num_blocks=count)


class _Announcer:
    """Publishes this server's entry, which it keeps as what the swarm should see of the server; never lets a
    DHT failure stop the node."""

    def __init__(
        self,
        dht: SwarmDHT,
        model: str,
        key_pair,
        total_blocks: int,
        expiry: float,
        entry: ServerEntry,
        metrics: NodeMetrics,
    ):
        self.dht, self.model, self.key_pair, self.total_blocks, self.expiry = dht, model, key_pair, total_blocks, expiry
        self.entry, self.metrics = entry, metrics

    async def publish(self, **changes) -> None:
        """Apply `changes` to the entry, then announce it."""
        self.entry = dataclasses.replace(self.entry, **changes)
        self.metrics.announced(self.entry, self.model)  # at once: /health answers what the node does now
        await self._announce(lambda: self.entry)  # a retry announces what is true now, not what was at the call

    async def retract(self, start: int, end: int) -> None:
        """Announce OFFLINE under blocks [start, end), which this server has left for the span of its entry."""
        offline = dataclasses.replace(self.entry, state=ServerState.OFFLINE, start=start, end=end)
        await self._announce(lambda: offline)

    async def _announce(self, current: Callable[[], ServerEntry], attempts: int = 3) -> None:
        """Up to `attempts` tries of at most 30 s each."""
        for attempt in range(attempts):
            entry = current()
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
                    self.metrics.announce_done(ok=True)
                    return
                self.metrics.announce_done(ok=False)
            except Exception as e:  # the next attempt, or the next heartbeat, retries
                self.metrics.announce_done(ok=False)
                log.warning("announcing %s failed: %r", entry.state, e)
            await trio.sleep(1 + attempt)


async def _heartbeat(announcer: _Announcer, server: SpanServer, period: float, host: PetalHost) -> None:
    while True:
        await trio.sleep(period * random.uniform(0.9, 1.1))  # jitter: servers do not re-announce in lockstep
        direct = host.punched_peers()[:MAX_DIRECT_PEERS]
        await announcer.publish(cache_tokens_left=server.budget.tokens_left, direct_peers=direct)


async def _choose_blocks(config: NodeConfig, dht: SwarmDHT, model: str, total_blocks: int) -> tuple[int, int]:
    bounds = config.span_bounds()
    if bounds is not None:  # checked against the model before the node started (check_model)
        return bounds
    await trio.sleep(random.uniform(0, 1))  # servers joining together do not all read the same swarm state
    servers = await _live_servers(dht, model, total_blocks)
    if servers is None:
        log.warning("choosing blocks as if the swarm were empty; the balance checks will correct the choice")
    return choose_span(total_blocks, config.num_blocks, _spans(servers or {}).values())


async def _live_servers(dht: SwarmDHT, model: str, total_blocks: int) -> dict[str, ServerEntry] | None:
    """Peer id -> entry of every JOINING or ONLINE server; None if the swarm could not be read in time, or
    did not answer for some blocks (a decision on half a picture is worse than none)."""
    with trio.move_on_after(SWARM_READ_TIMEOUT):
        try:
            return serving(current_entries(await dht.get_servers(model, range(total_blocks))))
        except Exception as e:  # a read failure skips one decision, it does not stop the node
            log.warning("reading the swarm failed: %r", e)
            return None
    log.warning("reading the swarm took over %.0f s", SWARM_READ_TIMEOUT)
    return None


def _spans(servers: dict[str, ServerEntry]) -> dict[str, SpanInfo]:
    """Peer id -> (start, end, throughput); a server that has not measured its throughput yet counts as the
    mean of the others."""
    known = [e.throughput for e in servers.values() if e.throughput > 0]
    unknown = sum(known) / len(known) if known else 1.0
    return {peer: (e.start, e.end, e.throughput or unknown) for peer, e in servers.items()}


async def _keep_balanced(
    scope: trio.CancelScope, config: NodeConfig, announcer: _Announcer, server: SpanServer, model_dir: Path
) -> None:
    """Every balance_period (x 0.5-1.5, so servers do not check in lockstep) read the swarm, and move this
    server's span where `should_move` says the swarm needs it. So that servers do not all rush to the same
    gap: while another server is JOINING the swarm is about to change, and the check waits for the next
    period; and of k servers that could move to overlapping blocks, each moves with probability 1/k."""
    me = announcer.entry.peer_id
    with scope:
        while True:
            await trio.sleep(config.balance_period * random.uniform(0.5, 1.5))
            started = trio.current_time()
            servers = await _live_servers(announcer.dht, announcer.model, announcer.total_blocks)
            if servers is None:
                continue
            log.debug("balance check: read %d servers in %.1f s", len(servers), trio.current_time() - started)
            joining = [peer for peer, e in servers.items() if e.state == ServerState.JOINING and peer != me]
            if joining:
                log.debug("balance check skipped: %d servers are joining", len(joining))
                continue
            spans = _spans(servers)
            spans[me] = (server.span.start, server.span.end, server.throughput)  # ours as it is, not as announced
            target = should_move(announcer.total_blocks, me, spans, config.balance_quality)
            if target is None:
                log.debug("balance check: staying on blocks %d:%d", server.span.start, server.span.end)
                continue
            heading = move_candidates(announcer.total_blocks, spans).values()
            rivals = sum(start < target[1] and target[0] < end for start, end in heading)  # this server included
            if random.random() * rivals >= 1:
                log.info(
                    "balance check: %d servers could move to blocks %d:%d; leaving it to the others", rivals, *target
                )
                continue
            await _move(target, config, announcer, server, model_dir)


async def _move(
    target: tuple[int, int], config: NodeConfig, announcer: _Announcer, server: SpanServer, model_dir: Path
) -> None:
    """Serve `target` instead of the current span: claim the new blocks (JOINING) and leave the old ones
    (OFFLINE, refusing new sessions) at once, drain, load the new blocks, swap them in, announce ONLINE.
    If the load fails, serve the old span again."""
    (old_start, old_end), (start, end) = (server.span.start, server.span.end), target
    log.info("moving from blocks %d:%d to %d:%d: the swarm's weakest blocks gain", old_start, old_end, start, end)
    server.stop_accepting()
    # both at once: the sooner others see the claim, the fewer of them pick the same blocks
    log.info("announcing JOINING for blocks %d:%d and OFFLINE for blocks %d:%d", start, end, old_start, old_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(announcer.publish, state=ServerState.JOINING, start=start, end=end))
        nursery.start_soon(announcer.retract, old_start, old_end)
    log.info("draining the sessions open on blocks %d:%d", old_start, old_end)
    await server.drain(
        config.drain_timeout,
        "moved",
        f"this server moved to blocks {start}:{end}; the session's cache is gone: open a new session",
    )
    try:
        span = await _load_span(model_dir, start, end, config)
    except Exception:  # e.g. out of memory: what is loaded still works
        log.exception("loading blocks %d:%d failed; serving blocks %d:%d again", start, end, old_start, old_end)
    else:
        server.swap_span(span)
    server.resume()
    start, end = server.span.start, server.span.end
    await announcer.publish(
        state=ServerState.ONLINE,
        start=start,
        end=end,
        cache_tokens_left=server.budget.tokens_left,
        weight_bytes=weight_bytes(server.span.module),
    )
    # the span's size is unchanged, so is its throughput
    log.info("serving blocks %d:%d of %s at %.1f blocks*steps/s", start, end, announcer.model, server.throughput)


async def _measure_throughput(host, config: NodeConfig, key: str, span: Span) -> float:
    """min(compute, network): compute measured once per setup (cached), the network probed to a swarm peer."""
    compute = await trio.to_thread.run_sync(measure_cached, key, functools.partial(measure_inference_throughput, span))
    bandwidth = await measure_bandwidth(host, config.initial_peers)
    if bandwidth is None:
        log.info("network throughput not measured (no peer answered a probe): announcing compute alone")
        return compute
    network = network_throughput(bandwidth, span.hidden_size, span.num_blocks)
    log.info(
        "network: %.1f MB/s to the swarm = %.0f blocks*tokens/s; compute: %.1f blocks*steps/s",
        bandwidth / 1e6,
        network,
        compute,
    )
    return announced_throughput(compute, network)


async def _load_span(model_dir: Path, start: int, end: int, config: NodeConfig) -> Span:
    """Blocks [start, end), quantized as configured, with the configured LoRA adapters (loaded for those blocks)."""
    log.info("loading blocks %d:%d of %s (%s)", start, end, model_dir.name, config.quant)
    load = functools.partial(_loaded_and_warm, model_dir, start, end, config)
    # abandoned on cancel: a node stopping mid-load exits without waiting for the read to finish
    return await trio.to_thread.run_sync(load, abandon_on_cancel=True)


def _loaded_and_warm(model_dir: Path, start: int, end: int, config: NodeConfig) -> Span:
    """The span, after one step of one token: torch's first pass (lazy set-up, allocations) is slow, and a server
    is not announced ONLINE before it is ready to answer as fast as it will."""
    span = Span.load(model_dir, start, end, config.quant, config.adapter_paths())
    span.step(span.new_session(1, 1), torch.zeros(1, 1, span.hidden_size))
    if config.quant != "none":
        release_free_memory()  # the first pass's temporaries (dequantized weights), freed but kept by malloc
    log.info(
        "blocks %d:%d hold %.1f MB of weights (%s: %.1f MB a block)",
        start,
        end,
        weight_bytes(span.module) / 2**20,
        config.quant,
        block_weight_bytes(span.config, config.quant) / 2**20,
    )
    return span


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
