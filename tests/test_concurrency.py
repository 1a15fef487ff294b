"""Many users at once, with real petald processes on 127.0.0.1: concurrent clients and sessions get exactly their
solo answers, views of the swarm are shared and follow servers that move, a client can be interrupted, and a
DHT that does not answer is never taken for an empty swarm."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import trio

from petal_client import DistributedModelForCausalLM, MissingBlocksError, SwarmError
from petal_client.swarm import Swarm
from petald.local_swarm import local_swarm, wait_until
from petald.p2p.dht import SwarmReadError, open_swarm_dht
from petald.p2p.host import full_addrs, load_or_create_identity, open_host

FAST = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]


@pytest.fixture(scope="module")
def swarm_with_adapter(tiny_swarm):
    return tiny_swarm.addr, tiny_swarm.peft_model, tiny_swarm.servers


def prompts(count: int) -> list[torch.Tensor]:
    """Prompts of different lengths (3 to 3 + 2 * (count - 1) tokens)."""
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(5, 400, (1, 3 + 2 * i), generator=generator) for i in range(count)]


def test_eight_clients_at_once_get_exactly_their_solo_answers(tiny_llama, swarm_with_adapter):
    addr, peft_model, _ = swarm_with_adapter
    inputs = prompts(8)
    adapters = [None, "lora"] * 4  # half the sessions run with the adapter, on the same servers
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [addr]) as base:
        with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [addr], active_adapter="lora") as lora:
            solo = [
                (lora if a else base).generate(x, max_new_tokens=12, eos_token_id=None)
                for x, a in zip(inputs, adapters, strict=True)
            ]
    local = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)])
    assert torch.equal(solo[0], local.generate(inputs[0], max_new_tokens=12, eos_token_id=None))
    with torch.no_grad():  # the adapter's run is peft's own
        tokens = inputs[1]
        for _ in range(12):
            tokens = torch.cat([tokens, peft_model(input_ids=tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(solo[1], tokens)

    results: list = [None] * 8
    start = threading.Barrier(8)

    def client(index: int) -> None:
        try:  # each its own client object (own host, DHT node and view), all starting at once
            start.wait(timeout=60)
            with DistributedModelForCausalLM.from_pretrained(
                str(tiny_llama), [addr], active_adapter=adapters[index]
            ) as model:
                results[index] = model.generate(inputs[index], max_new_tokens=12, eos_token_id=None)
        except Exception as e:  # noqa: BLE001 - reported below, with the index
            results[index] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for index, (got, expected) in enumerate(zip(results, solo, strict=True)):
        assert isinstance(got, torch.Tensor), f"client {index}: {got!r}"
        assert torch.equal(got, expected), f"client {index} (adapter {adapters[index]})"
    # the servers ran concurrent sessions' steps in shared passes: their counters say so
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [addr]) as model:
        swarm = model.blocks.swarm
        view = swarm.run(swarm.watch, model.blocks.model, model.blocks.num_blocks)
        infos = [swarm.run(swarm.ping, status) for status in view.servers.values()]
    assert len(infos) >= 3 and all(info.passes > 0 for info in infos)
    assert sum(info.batched_passes for info in infos) > 0, infos


def test_sessions_of_one_model_object_in_many_threads_are_independent(tiny_llama, swarm_with_adapter):
    addr, _, _ = swarm_with_adapter
    inputs = prompts(4)
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [addr]) as model:
        solo = [model.generate(x, max_new_tokens=8, eos_token_id=None) for x in inputs]
        results: list = [None] * 4

        def client(index: int) -> None:
            with model.inference_session(max_length=64):  # the session belongs to this thread only
                results[index] = model.generate(inputs[index], max_new_tokens=8, eos_token_id=None)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert all(torch.equal(got, expected) for got, expected in zip(results, solo, strict=True))
        assert len(model.blocks.swarm.views) == 1  # one view of the model, shared by every session


def test_a_view_opened_by_a_slice_serves_a_full_session_too(tiny_llama, swarm_with_adapter):
    addr, _, servers = swarm_with_adapter
    local = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(2, 4)])
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [addr]) as model:
        with torch.no_grad():
            torch.testing.assert_close(model.blocks[2:4](hidden), local.blocks.forward(hidden), rtol=0, atol=1e-5)
        view = model.blocks.swarm.views[model.model_name]
        assert view.num_blocks == 6 and {s.peer_id for s in view.servers.values()} == {s.peer_id for s in servers}
        expected = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)])
        ids = prompts(1)[0]
        want = expected.generate(ids, max_new_tokens=6, eos_token_id=None)
        assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=None), want)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_moves_is_routed_on_its_new_span_within_one_refresh(tiny_llama, tmp_path):
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}
    fixed = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", str(free_port())]
    identity = tmp_path / "mover.key"
    local = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)])
    ids = prompts(1)[0]
    want = local.generate(ids, max_new_tokens=6, eos_token_id=None)
    with local_swarm(tmp_path, env) as swarm:
        bootstrap, (_, _) = swarm.start_spans(str(tiny_llama), ("0:3", "3:6"), *FAST)
        common = ("start", "--model", str(tiny_llama), "--initial-peers", bootstrap.addr, "--identity", str(identity))
        mover = swarm.start(*common, "--blocks", "0:3", *fixed)
        mover.wait_serving()
        with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [bootstrap.addr]) as model:
            client = model.blocks.swarm
            client.refresh_period = 1.0
            view = client.run(client.watch, model.model_name, 6)
            wait_until(lambda: mover.peer_id in view.servers, 30, what="the client sees the third server")
            assert (view.servers[mover.peer_id].start, view.servers[mover.peer_id].end) == (0, 3)

            assert mover.stop() == 0
            moved = swarm.start(*common, "--blocks", "3:6", *fixed)  # same peer id and address, other blocks
            moved.wait_serving()
            # its own answer to the next ping places it: no DHT read needed (they come every 30 s)
            wait_until(lambda: view.servers[mover.peer_id].start == 3, 5 + 2 * client.refresh_period)
            assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=None), want)
            route = model.blocks.inference_session(1, 32)
            try:
                route.step(model.parts.embed(ids))
                assert all(not (s.hop.peer_id == mover.peer_id and s.hop.start < 3) for s in route.route)
            finally:
                route.close()


CHILD = textwrap.dedent(
    """
    import sys, torch
    from petal_client import DistributedModelForCausalLM

    class Announce:
        def __init__(self): self.seen = 0
        def put(self, value):
            self.seen += 1
            if self.seen == 4: print("generating", flush=True)
        def end(self): pass

    model = DistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=[sys.argv[2]])
    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        model.generate(ids, max_new_tokens=400, eos_token_id=None, streamer=Announce())
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        # no call is left running on the swarm's loop: only the view's refresher
        print("interrupted", len(model.blocks.swarm._nursery.child_tasks), flush=True)
    out = model.generate(ids, max_new_tokens=3, eos_token_id=None)  # the next call still works
    print("again", out[0, -3:].tolist(), flush=True)
    model.close()
    """
)


def test_ctrl_c_during_generate_cancels_the_step_and_servers_free_the_cache(tiny_llama, swarm_with_adapter, tmp_path):
    addr, _, servers = swarm_with_adapter
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}

    def free_cache() -> dict[str, int]:
        status = subprocess.run(
            [sys.executable, "-m", "petald.cli", "status", "--initial-peers", addr, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        entries = json.loads(status.stdout)[tiny_llama.name]["servers"]
        return {peer: entry["cache_tokens_left"] for peer, entry in entries.items()}

    full = wait_until(lambda: (cache := free_cache()) and len(cache) == 3 and cache, 30)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tiny_llama), addr], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "generating", line + (child.stderr.read() if not line else "")
        assert free_cache() != full or wait_until(lambda: free_cache() != full, 10)  # the session holds cache
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert out.splitlines()[0] == "interrupted 1" and out.splitlines()[1].startswith("again"), out
    assert "Traceback" not in err, err
    wait_until(lambda: free_cache() == full, 20, what="every server frees the interrupted session's cache")


def test_a_dht_that_does_not_answer_is_not_an_empty_swarm(tiny_llama, swarm_with_adapter):
    """The DHT read fails (SwarmReadError): the client asks the servers it knows (here the initial peers) over
    the info protocol, and says the swarm did not answer, never that blocks are served by no one."""
    addr, _, servers = swarm_with_adapter

    class Unanswering:  # stands for a DHT whose peers all time out
        async def get_servers(self, model, blocks):
            raise SwarmReadError(f"no answer for {len(blocks)} blocks")

    local = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)])
    ids = prompts(1)[0]
    want = local.generate(ids, max_new_tokens=4, eos_token_id=None)
    server_addrs = [server.addr for server in servers]
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), server_addrs) as model:
        model.blocks.swarm.dht = Unanswering()
        assert torch.equal(model.generate(ids, max_new_tokens=4, eos_token_id=None), want)
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [addr]) as model:  # only a DHT-only peer
        model.blocks.swarm.dht = Unanswering()
        with pytest.raises(SwarmError, match="did not answer") as error:
            model.generate(ids, max_new_tokens=4)
        assert not isinstance(error.value, MissingBlocksError)


def test_clients_stay_out_of_servers_routing_tables(swarm_with_adapter):
    addr, _, servers = swarm_with_adapter

    async def main() -> None:
        async with open_host(load_or_create_identity(None), ("127.0.0.1", 0)) as host:
            async with open_swarm_dht(host, [addr]) as server_dht:  # a server-mode node, as petald runs
                async with open_host(load_or_create_identity(None), ("127.0.0.1", 0)) as client_host:
                    async with open_swarm_dht(client_host, full_addrs(host)[:1], client=True) as client_dht:
                        await client_dht.get_servers("tiny-llama", range(6))
                        await client_dht.get_servers("tiny-llama", range(6))
                    assert client_host.get_id() not in server_dht.kad.routing_table.get_peer_ids()
                assert server_dht.kad.routing_table.get_peer_ids()  # server-mode peers do get in

    trio.run(main)


def test_swarm_refuses_initial_peers_that_are_not_multiaddrs():
    with pytest.raises(SwarmError, match="not a multiaddr"):
        Swarm(["Why is the sea salty?"])


def test_push_mode_gives_exactly_the_output_of_star_mode(tiny_llama, swarm_with_adapter):
    addr, _, _ = swarm_with_adapter
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    local = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 6)])
    expected = local.generate(prompt, max_new_tokens=16, eos_token_id=None)
    outputs = {}
    for push in (False, True):
        with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [addr], server_push=push) as model:
            with model.inference_session(max_length=64) as conversation:
                outputs[push] = model.generate(prompt, max_new_tokens=16, eos_token_id=None)
                assert len(conversation.blocks.route) == 3 and conversation.blocks.failovers == 0
                pushes = conversation.blocks.pushes
                # star: never; push: two hops per step get their input from the previous server
                # (a push that times out on a loaded machine falls back to the client, so not always all)
                assert pushes == 0 if not push else pushes >= 16
    assert torch.equal(outputs[True], outputs[False])
    assert torch.equal(outputs[True], expected)
