"""A node's /metrics (Prometheus' text format, read back with prometheus-client's own parser) and /health, on real
petald processes of the shared tiny swarm; the pure parts (tokens of a step, replays, the health rule) alone."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from petald.local_swarm import wait_until
from petald.metrics import NodeMetrics, health_status, is_replay, step_tokens
from petald.p2p.dht import ServerState
from petald.p2p.wire import NextHop, Step

PROMPT = torch.tensor([[1, 5, 9, 13, 17]])
NEW_TOKENS = 4


def samples_of(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of every sample in Prometheus' text format, as its parser reads it."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample a node's (or the monitor's) /metrics shows."""
    return samples_of(httpx.get(f"{url}/metrics", timeout=10).text)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def health(url: str) -> tuple[int, str]:
    reply = httpx.get(f"{url}/health", timeout=10)
    return reply.status_code, reply.json()["state"]


def test_one_generation_moves_every_servers_step_and_token_counters_by_its_steps(tiny_llama, tiny_swarm):
    from petal_client import DistributedModelForCausalLM

    urls = [server.metrics_url for server in tiny_swarm.servers]  # blocks 0:2, 2:4, 4:6
    before = [scrape(url) for url in urls]
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [tiny_swarm.addr]) as model:
        model.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    after = [scrape(url) for url in urls]
    for i, (old, new) in enumerate(zip(before, after, strict=True)):

        def moved(name: str, old=old, new=new, **labels: str) -> float:
            return value(new, name, **labels) - value(old, name, **labels)

        # a prefill of the prompt, then one step per new token but the last
        assert moved("petal_steps_total") == NEW_TOKENS, (i, new)
        assert moved("petal_tokens_total") == PROMPT.shape[1] + NEW_TOKENS - 1
        assert moved("petal_step_seconds_count") == NEW_TOKENS
        assert moved("petal_step_seconds_sum") > 0
        # each server but the last pushes its output on to the next one
        assert moved("petal_pushes_total") == (NEW_TOKENS if i < 2 else 0)
        assert moved("petal_push_fallbacks_total") == 0
        assert moved("petal_received_bytes_total") > 0 and moved("petal_sent_bytes_total") > 0
        assert value(new, "petal_state", petal_state="ONLINE") == 1
        assert value(new, "petal_state", petal_state="JOINING") == 0
        assert (value(new, "petal_span_start"), value(new, "petal_span_end")) == (2 * i, 2 * i + 2)
        assert value(new, "petal_cache_tokens_budget") == 16384
        assert value(new, "petal_dht_announces_total", result="ok") >= 2  # JOINING, ONLINE, heartbeats
    # the client closed its session: every server freed its cache
    wait_until(
        lambda: all(
            value(s := scrape(url), "petal_open_sessions") == 0 == value(s, "petal_cache_tokens_used") for url in urls
        ),
        10,
        "sessions closed on every server",
    )


def test_health_is_503_while_a_node_joins_and_drains_and_200_while_it_serves(tiny_llama, tiny_swarm, tmp_path):
    from petal_client.swarm import ServerStatus, Swarm
    from petald.models.checkpoints import swarm_model_name
    from petald.p2p.host import load_or_create_identity, peer_id_of
    from petald.p2p.wire import (
        INFERENCE_PROTOCOL,
        CloseSession,
        Limits,
        OpenSession,
        SessionOpened,
        read_message,
        write_message,
    )

    # a peer that accepts connections and never answers: bootstrapping waits 5 s on it, so the node is still
    # joining when its health is first asked
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent_addr = f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{peer_id_of(load_or_create_identity(None))}"
        node = tiny_swarm.nodes.start(
            "start", "--model", str(tiny_llama), "--blocks", "0:6", "--initial-peers", tiny_swarm.addr, silent_addr,
            "--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0", "--metrics-port", "0",
            "--drain-timeout", "60",
        )  # fmt: skip
        url = node.metrics_url
        assert health(url) == (503, "JOINING")
        assert "serving blocks" not in node.output()
        node.wait_serving()
    assert health(url) == (200, "ONLINE")

    server = ServerStatus(node.peer_id, [node.addr], 0, 6, 0.0, (), ServerState.ONLINE, 0)
    request = OpenSession(swarm_model_name(str(tiny_llama)), 0, 6, batch_size=1, max_length=8, session_id="held")

    async def open_session():
        stream = await swarm.open_stream(server, INFERENCE_PROTOCOL)
        await write_message(stream, request)
        assert isinstance(await read_message(stream, Limits(), expect=(SessionOpened,)), SessionOpened)
        return stream

    async def close_session(stream) -> None:
        await write_message(stream, CloseSession())
        await stream.close()

    with Swarm([tiny_swarm.addr]) as swarm:
        stream = swarm.run(open_session)  # an open session keeps the node draining after SIGTERM
        wait_until(lambda: value(scrape(url), "petal_open_sessions") == 1, 10, "the session counted")
        node.process.send_signal(signal.SIGTERM)
        wait_until(lambda: health(url) == (503, "OFFLINE"), 10, "health 503 once draining")
        assert node.process.poll() is None and value(scrape(url), "petal_state", petal_state="OFFLINE") == 1
        swarm.run(close_session, stream)
    assert node.process.wait(30) == 0, node.output()


def test_a_steps_tokens_and_replays_are_read_from_the_step():
    hidden = torch.zeros(2, 3, 8)
    assert step_tokens(Step(7, hidden)) == 6
    assert not is_replay(Step(7, hidden)) and is_replay(Step(6, hidden))  # a failover replays with an even id


@pytest.mark.parametrize(
    ("state", "status"), [(ServerState.JOINING, 503), (ServerState.ONLINE, 200), (ServerState.OFFLINE, 503)]
)
def test_health_is_200_only_while_serving(state, status):
    assert health_status(state) == status


def test_pushes_fallbacks_errors_and_failovers_are_counted_in_the_nodes_own_registry():
    first, second = NodeMetrics(), NodeMetrics()
    hop = NextHop("12D3KooWxyz", ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWxyz"], "s", 2)
    first.step_served(Step(6, torch.zeros(1, 4, 8), push_to=[hop]), 0.01, pushed=False)
    first.step_served(Step(7, torch.zeros(1, 1, 8), push_to=[hop]), 0.01, pushed=True)
    first.error_sent("bad_shape")
    samples = samples_of(first.exposition().decode())
    assert value(samples, "petal_steps_total") == 2 and value(samples, "petal_tokens_total") == 5
    assert value(samples, "petal_pushes_total") == 1 and value(samples, "petal_push_fallbacks_total") == 1
    assert value(samples, "petal_failovers_total") == 1
    assert value(samples, "petal_errors_total", code="bad_shape") == 1
    assert b"petal_steps_total 0.0" in second.exposition()  # registries are not shared
