"""The swarm monitor: who serves which blocks of every model, as the DHT says and as each server answers a ping.

`read_report` reads the swarm once (the DHT, then a bounded ping of every server); `build_report` and what it
calls are pure, tested alone. `Monitor` re-reads every few seconds through a `petal_client` Swarm (the monitor is
a client of the swarm: client-mode DHT, the client's pings), and `monitor_app` serves the block map page, its JSON
(`/api/swarm`) and swarm-wide Prometheus metrics (`/metrics`), for `petald monitor` and for petal-api (under
`/monitor/`). Who serves what is `swarm_map`'s answer, over entries corrected by each server's own answer."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from petald.p2p.dht import MAX_PUBLIC_NAME_LEN, ServerEntry, ServerState
from petald.p2p.swarm_map import block_servers, current_entries
from petald.p2p.wire import ServerInfo
from petald.status import read_blocks

log = logging.getLogger(__name__)

REFRESH_SECONDS = 10.0
PARALLEL_PINGS = 32
MAX_NEW_PINGS = 64  # servers never answered before, pinged per refresh: a DHT flood of made-up entries costs this
PING_QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Ping:
    """A server's answer to the monitor's ping, or why there was none."""

    info: ServerInfo | None
    rtt: float | None = None  # seconds
    error: str = ""


@dataclass
class ServerRow:
    """One server as the monitor shows it: its announcement, corrected by its own answer to the ping."""

    peer_id: str
    public_name: str
    start: int
    end: int
    state: str  # JOINING, ONLINE, OFFLINE, or UNREACHABLE: announced serving, but did not answer the monitor
    throughput: float
    cache_tokens_left: int
    version: str
    quant: str
    adapters: list[str]
    addrs: list[str]
    rtt_ms: float | None  # the ping's round trip; None when it did not answer or was not pinged
    reachable: bool | None  # whether the monitor reached it directly; None: not pinged (it left, or too many new)
    hint: str = ""  # when not reachable: what may be wrong
    ping_error: str = ""  # when not reachable: how the ping failed


@dataclass
class ModelMap:
    """One model: its servers (rows of the block map) and how many ONLINE servers each block has."""

    model: str
    num_blocks: int
    servers: list[ServerRow]
    servers_per_block: list[int]
    unserved_blocks: list[int]  # served by no ONLINE server that answered (and not unread)
    unread_blocks: list[int]  # the swarm did not answer for them: unknown, not unserved
    coverage: float  # served blocks / blocks
    min_servers: int  # fewest ONLINE servers over the blocks


@dataclass
class SwarmReport:
    models: list[ModelMap] = field(default_factory=list)
    updated_at: float | None = None  # unix time of the read; None before the first one
    refresh_seconds: float = REFRESH_SECONDS
    ping_seconds: dict[str, float] = field(default_factory=dict)  # quantile -> RTT over the servers that answered
    error: str = ""  # why the last read failed (the models are then those of the read before)


def display_name(name: str) -> str:
    """A public name as pages show it: readers already refuse bad ones (check_public_name); this caps whatever
    comes another way."""
    name = name[:MAX_PUBLIC_NAME_LEN]
    return name if name.isprintable() else ""


def live_entry(entry: ServerEntry, ping: Ping | None) -> ServerEntry:
    """`entry` as the server itself answered: its span and state now; UNREACHABLE when it did not answer."""
    if ping is None:
        return entry
    if ping.info is None:
        return dataclasses.replace(entry, state=ServerState.UNREACHABLE)
    info = ping.info
    return dataclasses.replace(
        entry,
        start=info.start,
        end=info.end,
        state=ServerState(info.state),
        throughput=info.throughput,
        cache_tokens_left=info.cache_tokens_left,
        quant=info.quant,
        version=info.version,
        adapters=list(info.adapters),
    )


def reachability_hint(addrs: list[str]) -> str:
    """What an operator could check when the monitor could not reach a server at `addrs`."""
    ports = sorted({addr.split("/tcp/")[1].split("/")[0] for addr in addrs if "/tcp/" in addr})
    hint = "it may be down, or a firewall may be blocking "
    hint += f"connections to TCP port {', '.join(ports)}" if ports else "connections to it"
    hosts = [addr.split("/")[2] for addr in addrs if addr.startswith("/ip4/")]
    if hosts and all(_is_private(host) for host in hosts):
        hint += f"; it announces only private addresses ({', '.join(sorted(set(hosts)))}): behind NAT, start it with "
        hint += "--public-host set to its public address and forward the port"
    return hint


def _is_private(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_private
    except ValueError:
        return False


def server_row(entry: ServerEntry, ping: Ping | None) -> ServerRow:
    live = live_entry(entry, ping)
    reachable = None if ping is None else ping.info is not None
    return ServerRow(
        peer_id=live.peer_id,
        public_name=display_name(live.public_name),
        start=live.start,
        end=live.end,
        state=str(live.state),
        throughput=live.throughput,
        cache_tokens_left=live.cache_tokens_left,
        version=live.version,
        quant=live.quant,
        adapters=list(live.adapters),
        addrs=list(live.addrs),
        rtt_ms=None if ping is None or ping.rtt is None else round(ping.rtt * 1000, 1),
        reachable=reachable,
        hint=reachability_hint(live.addrs) if reachable is False else "",
        ping_error=ping.error if reachable is False else "",
    )


def model_map(
    model: str,
    num_blocks: int,
    entries: Mapping[str, ServerEntry],
    pings: Mapping[str, Ping],
    unread: Iterable[int] = (),
) -> ModelMap:
    """The block map of one model, from every server's current entry (`current_entries`) and the pings."""
    live = {peer: live_entry(e, pings.get(peer)) for peer, e in entries.items()}
    per_block = {block: len(peers) for block, peers in block_servers(live, num_blocks).items()}
    unread = sorted(set(unread))
    unserved = [block for block, count in per_block.items() if count == 0 and block not in unread]
    rows = [server_row(e, pings.get(peer)) for peer, e in entries.items()]
    rows.sort(key=lambda row: (row.start, row.end, row.public_name, row.peer_id))
    served = sum(1 for count in per_block.values() if count > 0)
    return ModelMap(
        model=model,
        num_blocks=num_blocks,
        servers=rows,
        servers_per_block=[per_block[block] for block in range(num_blocks)],
        unserved_blocks=unserved,
        unread_blocks=unread,
        coverage=served / num_blocks if num_blocks else 0.0,
        min_servers=min(per_block.values(), default=0),
    )


def percentiles(values: list[float], quantiles: Iterable[float] = PING_QUANTILES) -> dict[str, float]:
    """Quantile (as text, e.g. "0.9") -> the nearest-rank value of `values`; empty without values."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {str(q): ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1] for q in quantiles}


def build_report(
    models: Mapping[str, tuple[int, Mapping[str, ServerEntry], list[int]]],
    pings: Mapping[str, Ping],
    now: float,
    refresh_seconds: float = REFRESH_SECONDS,
) -> SwarmReport:
    """The whole swarm: `models` maps a name to (blocks, current entries, unread blocks)."""
    maps = [model_map(name, total, entries, pings, unread) for name, (total, entries, unread) in sorted(models.items())]
    rtts = [ping.rtt for ping in pings.values() if ping.info is not None and ping.rtt is not None]
    return SwarmReport(maps, now, refresh_seconds, percentiles(rtts))


def choose_pings(entries: Iterable[ServerEntry], answered_before: set[str], new_limit: int = MAX_NEW_PINGS) -> list:
    """The servers to ping in one refresh: every one that answered before, and at most `new_limit` others (a
    DHT flood lists thousands of made-up servers); servers that announced OFFLINE are not pinged."""
    candidates = [e for e in entries if e.state != ServerState.OFFLINE]
    known = [e for e in candidates if e.peer_id in answered_before]
    new = [e for e in candidates if e.peer_id not in answered_before]
    return known + random.sample(new, min(len(new), new_limit))


async def read_report(swarm, answered_before: set[str], refresh_seconds: float) -> SwarmReport:
    """One read of the whole swarm through `swarm` (a petal_client Swarm, on its event loop): every model of the
    index, every block's entries, a ping of every server `choose_pings` picks."""
    from petal_client.swarm import TRANSPORT_ERRORS, SwarmError, describe

    models: dict[str, tuple[int, dict[str, ServerEntry], list[int]]] = {}
    for name, total in (await swarm.dht.list_models()).items():
        found, unread = await read_blocks(swarm.dht, name, total)
        models[name] = (total, current_entries(found), unread)
    pings: dict[str, Ping] = {}
    limiter = trio.CapacityLimiter(PARALLEL_PINGS)

    async def ping(entry: ServerEntry) -> None:
        async with limiter:
            started = trio.current_time()
            try:
                info = await swarm.ping(entry)
                pings[entry.peer_id] = Ping(info, trio.current_time() - started)
            except (*TRANSPORT_ERRORS, SwarmError) as e:
                pings[entry.peer_id] = Ping(None, None, describe(e))

    every_entry = {peer: e for _, entries, _ in models.values() for peer, e in entries.items()}
    async with trio.open_nursery() as nursery:
        for entry in choose_pings(every_entry.values(), answered_before):
            nursery.start_soon(ping, entry)
    answered_before.update(peer for peer, p in pings.items() if p.info is not None)
    return build_report(models, pings, time.time(), refresh_seconds)


class Monitor:
    """Re-reads the swarm every `refresh_seconds` in a thread of its own, through `swarm` (a petal_client Swarm
    it does not own); `report` is the latest read. `start` is idempotent: petal-api starts it on the first visit."""

    def __init__(self, swarm, refresh_seconds: float = REFRESH_SECONDS):
        self.swarm, self.refresh_seconds = swarm, refresh_seconds
        self.report = SwarmReport(refresh_seconds=refresh_seconds)
        self._answered: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="petal-monitor", daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a read under way ends at the latest when the swarm is closed

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.report = self.swarm.run(read_report, self.swarm, self._answered, self.refresh_seconds)
            except Exception as e:  # noqa: BLE001 - shown on the page; the next read tries again
                log.warning("reading the swarm failed: %r", e)
                self.report = dataclasses.replace(self.report, error=f"reading the swarm failed: {e}")
            self._stop.wait(max(0.0, self.refresh_seconds - (time.monotonic() - started)))


class SwarmCollector:
    """Swarm-wide Prometheus metrics from the monitor's latest report (collected at each scrape)."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def collect(self):
        report = self.monitor.report
        states = GaugeMetricFamily("petal_swarm_servers", "Servers per model and state", labels=["model", "state"])
        blocks = GaugeMetricFamily("petal_swarm_blocks", "Blocks of each model", labels=["model"])
        unserved = GaugeMetricFamily(
            "petal_swarm_unserved_blocks", "Blocks no ONLINE server that answered covers", labels=["model"]
        )
        fewest = GaugeMetricFamily(
            "petal_swarm_min_servers_per_block", "Fewest ONLINE servers over the blocks", labels=["model"]
        )
        coverage = GaugeMetricFamily("petal_swarm_coverage_ratio", "Served blocks / blocks", labels=["model"])
        versions = GaugeMetricFamily("petal_swarm_servers_by_version", "Servers per version", labels=["version"])
        pings = GaugeMetricFamily(
            "petal_monitor_ping_seconds", "The monitor's ping RTT to the servers, by quantile", labels=["quantile"]
        )
        updated = GaugeMetricFamily("petal_monitor_updated_timestamp_seconds", "When the swarm was last read")
        by_version: Counter[str] = Counter()
        for m in report.models:
            for state, count in sorted(Counter(row.state for row in m.servers).items()):
                states.add_metric([m.model, state], count)
            blocks.add_metric([m.model], m.num_blocks)
            unserved.add_metric([m.model], len(m.unserved_blocks))
            fewest.add_metric([m.model], m.min_servers)
            coverage.add_metric([m.model], m.coverage)
            by_version.update(row.version for row in m.servers)
        for version, count in sorted(by_version.items()):
            versions.add_metric([version], count)
        for quantile, seconds in report.ping_seconds.items():
            pings.add_metric([quantile], seconds)
        if report.updated_at is not None:
            updated.add_metric([], report.updated_at)
        yield from (states, blocks, unserved, fewest, coverage, versions, pings, updated)


def monitor_app(monitor: Monitor) -> Starlette:
    """`/` the block map page, `/api/swarm` its data as JSON, `/metrics` swarm-wide Prometheus metrics."""
    page = files("petald").joinpath("static/monitor.html").read_text()
    registry = CollectorRegistry()
    registry.register(SwarmCollector(monitor))

    async def map_page(request: Request) -> HTMLResponse:
        monitor.start()
        return HTMLResponse(page)

    async def swarm_json(request: Request) -> JSONResponse:
        monitor.start()
        return JSONResponse(dataclasses.asdict(monitor.report))

    async def scrape(request: Request) -> Response:
        monitor.start()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/", map_page), Route("/api/swarm", swarm_json), Route("/metrics", scrape)])


def run_monitor(initial_peers: list[str], host: str, port: int, refresh_seconds: float) -> int:
    """`petald monitor`: serve the monitor on host:port until Ctrl-C or SIGTERM."""
    import socket

    import uvicorn

    from petal_client.swarm import Swarm

    with Swarm(initial_peers) as swarm:
        monitor = Monitor(swarm, refresh_seconds)
        monitor.start()
        sock = socket.create_server((host, port))  # bound before the address is printed
        bound_host, bound_port = sock.getsockname()[:2]
        print(
            f"petald monitor: the swarm's block map at http://{bound_host}:{bound_port}/ "
            f"(JSON: /api/swarm, Prometheus: /metrics)",
            flush=True,
        )
        try:
            uvicorn.Server(uvicorn.Config(monitor_app(monitor), log_level="warning")).run(sockets=[sock])
        finally:
            monitor.close()
    return 0
