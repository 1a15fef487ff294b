"""A node's metrics and health: counters in its own prometheus-client registry, served with `/health` on
`--metrics-port` by a small Starlette app on uvicorn (in a thread of its own, beside the trio loop).

Everything here answers from the node's own memory: nothing asks the network, so a node whose swarm is
unreachable still answers its scrapes and health checks."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from petald.p2p.dht import ANNOUNCED_STATES, ServerEntry, ServerState
from petald.p2p.wire import Step
from petald.serving.cache import CacheBudget

log = logging.getLogger(__name__)

# decode steps take milliseconds, prefills of long prompts seconds
STEP_SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def step_tokens(step: Step) -> int:
    """The tokens a step adds to its session's cache: batch x new tokens."""
    batch, length = step.hidden.shape[:2]
    return batch * length


def is_replay(step: Step) -> bool:
    """Whether a step replays a session's history to this server after a failover (replays have even ids,
    steps odd ones: petal_client.session)."""
    return step.step % 2 == 0


def health_status(state: ServerState) -> int:
    """The HTTP status of /health: 200 while the node serves (ONLINE), 503 while it loads or moves (JOINING)
    and once it drains (OFFLINE)."""
    return 200 if state == ServerState.ONLINE else 503


class NodeMetrics:
    """Everything a node counts about itself, in a registry of its own (never prometheus-client's global one,
    so several nodes or tests in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.state: ServerState = ServerState.JOINING
        self.steps = Counter("petal_steps", "Inference steps served", registry=r)
        self.tokens = Counter("petal_tokens", "Tokens served by inference steps (batch x new tokens)", registry=r)
        self.step_seconds = Histogram(
            "petal_step_seconds",
            "Time from a step's turn to its answer: compute, push and reply",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "petal_failovers", "Sessions replayed to this server after another server failed or moved", registry=r
        )
        self.pushes = Counter("petal_pushes", "Steps pushed on to the next server", registry=r)
        self.push_fallbacks = Counter(
            "petal_push_fallbacks", "Pushes that failed (the client then sent the step itself)", registry=r
        )
        self.errors = Counter("petal_errors", "Error frames sent to peers, by code", ["code"], registry=r)
        self.received_bytes = Counter(
            "petal_received_bytes", "Bytes read from peers on Petal's protocol streams", registry=r
        )
        self.sent_bytes = Counter("petal_sent_bytes", "Bytes written to peers on Petal's protocol streams", registry=r)
        self.announces = Counter(
            "petal_dht_announces", "DHT announcement attempts, by result (ok or failed)", ["result"], registry=r
        )
        self.open_sessions = Gauge("petal_open_sessions", "Inference sessions open", registry=r)
        self.cache_used = Gauge("petal_cache_tokens_used", "KV cache tokens reserved by open sessions", registry=r)
        self.cache_budget = Gauge("petal_cache_tokens_budget", "KV cache budget in tokens", registry=r)
        self.state_enum = Enum(
            "petal_state", "The server's state", states=[str(s) for s in ANNOUNCED_STATES], registry=r
        )
        self.span_start = Gauge("petal_span_start", "First block served", registry=r)
        self.span_end = Gauge("petal_span_end", "One past the last block served", registry=r)
        self.info = Info("petal_node", "Who this node is", registry=r)
        self.state_enum.state(str(self.state))

    def watch_batching(self, steps) -> None:
        """Read the server's step queue (petald.serving.batching.StepQueue) at every scrape: passes, how many
        carried several sessions' steps, rows run, and how busy the compute lane has been."""
        r = self.registry
        stats = steps.stats
        Gauge("petal_passes", "Forward passes run for inference steps", registry=r).set_function(lambda: stats.passes)
        Gauge(
            "petal_batched_passes", "Forward passes that carried the steps of several sessions", registry=r
        ).set_function(lambda: stats.batched_passes)
        Gauge("petal_pass_rows", "Rows run over all passes", registry=r).set_function(lambda: stats.rows)
        Gauge("petal_queued_steps", "Steps waiting for the compute lane", registry=r).set_function(
            lambda: steps.waiting
        )
        Gauge("petal_busy", "Fraction of the last seconds the compute lane ran", registry=r).set_function(
            steps.lane.busy
        )

    # ---- called by the node and its handlers (each one line at its place)

    def announced(self, entry: ServerEntry, model: str) -> None:
        """The node's entry changed (state, span): what the swarm is told, and what /health answers."""
        self.state = ServerState(entry.state)
        self.state_enum.state(str(self.state))
        self.span_start.set(entry.start)
        self.span_end.set(entry.end)
        self.info.info(
            {
                "peer_id": entry.peer_id,
                "model": model,
                "version": entry.version,
                "quant": entry.quant,
                "public_name": entry.public_name,
            }
        )

    def announce_done(self, ok: bool) -> None:
        self.announces.labels("ok" if ok else "failed").inc()

    def step_served(self, step: Step, seconds: float, pushed: bool) -> None:
        """One inference step answered, `seconds` after its turn came; `pushed`: it went on to the next server."""
        self.steps.inc()
        self.tokens.inc(step_tokens(step))
        self.step_seconds.observe(seconds)
        if is_replay(step):
            self.failovers.inc()
        if step.push_to:
            (self.pushes if pushed else self.push_fallbacks).inc()

    def error_sent(self, code: str) -> None:
        self.errors.labels(code).inc()

    def watch_cache(self, budget: CacheBudget) -> None:
        """Read open sessions and reserved cache from the serving node's budget when scraped."""
        self.open_sessions.set_function(lambda: budget.sessions)
        self.cache_used.set_function(lambda: budget.max_tokens - budget.tokens_left)
        self.cache_budget.set(budget.max_tokens)

    def metered_host(self, host) -> MeteredHost:
        """`host` counting the bytes of every stream it hands to a protocol handler or opens."""
        return MeteredHost(host, self)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class MeteredStream:
    """A libp2p stream that counts the bytes read and written into its node's metrics."""

    def __init__(self, stream, metrics: NodeMetrics):
        self.stream, self.metrics = stream, metrics

    async def read(self, n: int | None = None) -> bytes:
        data = await self.stream.read(n)
        self.metrics.received_bytes.inc(len(data))
        return data

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)
        self.metrics.sent_bytes.inc(len(data))

    async def close(self) -> None:
        await self.stream.close()

    async def reset(self) -> None:
        await self.stream.reset()

    def __getattr__(self, name: str):  # everything else of the stream as it is (muxed_conn, protocol ids...)
        return getattr(self.stream, name)


class MeteredHost:
    """A libp2p host whose protocol handlers and opened streams get MeteredStreams; the rest is the host's."""

    def __init__(self, host, metrics: NodeMetrics):
        self.host, self.metrics = host, metrics

    def set_stream_handler(self, protocol, handler) -> None:
        async def metered(stream) -> None:
            await handler(MeteredStream(stream, self.metrics))

        self.host.set_stream_handler(protocol, metered)

    async def new_stream(self, peer_id, protocols) -> MeteredStream:
        return MeteredStream(await self.host.new_stream(peer_id, protocols), self.metrics)

    def __getattr__(self, name: str):
        return getattr(self.host, name)


def count_error(stream, code: str) -> None:
    """Count an error frame about to be written on `stream`, if it is a metered one."""
    if isinstance(stream, MeteredStream):
        stream.metrics.error_sent(code)


def metrics_app(metrics: NodeMetrics) -> Starlette:
    """GET /metrics (Prometheus' text format) and GET /health (200 serving, 503 otherwise)."""

    async def scrape(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> JSONResponse:
        state = metrics.state
        return JSONResponse({"state": str(state)}, status_code=health_status(state))

    return Starlette(routes=[Route("/metrics", scrape), Route("/health", health)])


@contextmanager
def serving_metrics(metrics: NodeMetrics, host: str, port: int) -> Iterator[int]:
    """Serve `metrics_app(metrics)` on host:port in a thread of its own until the block ends; yields the port
    (the one taken, for port 0). The socket is bound here, so a taken port fails the node at once (OSError)."""
    import uvicorn

    sock = socket.create_server((host, port))
    server = uvicorn.Server(uvicorn.Config(metrics_app(metrics), log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="petal-metrics", daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
