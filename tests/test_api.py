"""petal-api end to end: the official openai client against a petal-api process in front of a real swarm of the
tiny Llama on 127.0.0.1 (blocks 0:2, 2:4 twice, 4:6), plus the pure parts (decoding, configuration)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from petal_client.api.config import ApiConfigError, load_config
from petal_client.api.decoding import TokenText
from petal_client.api.process import ApiProcess
from petal_client.swarm import Swarm
from petald.local_swarm import NodeProcess, local_swarm, wait_until
from petald.models.checkpoints import make_tiny_llama, make_tiny_tokenizer
from petald.p2p.dht import ServerEntry
from petald.p2p.swarm_map import current_entries

FAST = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
KEY = "sk-test-petal"
MODEL = "tiny-llama"
ORPHAN = "tiny-orphan"  # loaded by petal-api, served by no one
MAX_CONCURRENT = 8


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@dataclass
class TinySwarm:
    """The module's swarm and petal-api, and a client of the swarm (`probe`) that pings its servers."""

    root: Path
    env: dict[str, str]
    orphan: Path
    bootstrap: NodeProcess
    servers: dict[str, tuple[str, NodeProcess]]  # peer id -> (span, node)
    probe: Swarm
    url: str
    entries: dict[str, ServerEntry] = field(default_factory=dict)

    def free_caches(self) -> dict[str, int]:
        """Each live server's free cache right now, from its own answer to a ping (the DHT lags a heartbeat)."""
        free = {}
        for peer_id, entry in self.entries.items():
            if self.servers[peer_id][1].process.poll() is None:
                free[peer_id] = self.probe.run(self.probe.ping, entry).cache_tokens_left
        return free


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tiny = make_tiny_llama(root / MODEL)
    orphan = make_tiny_llama(root / ORPHAN, seed=1)
    env = {**os.environ, "PETAL_HOME": str(root / "home")}
    with local_swarm(root, env) as nodes:
        bootstrap = nodes.start("dht", "--port", "0", "--new-swarm")
        spans = ["0:2", "2:4", "2:4", "4:6"]
        started = [
            nodes.start("start", "--model", str(tiny), "--blocks", s, "--initial-peers", bootstrap.addr, *FAST)
            for s in spans
        ]
        for node in started:
            node.wait_serving()
        servers = {node.peer_id: (span, node) for span, node in zip(spans, started, strict=True)}
        api = ApiProcess(
            ["--initial-peers", bootstrap.addr, "--model", str(tiny), str(orphan), "--port", "0"]
            + ["--api-key", KEY, "--max-concurrent", str(MAX_CONCURRENT), "--max-tokens", "24"],
            root / "api.log",
            env,
        )
        probe = None
        try:
            url = api.wait_url()
            probe = Swarm([bootstrap.addr])
            tiny_swarm = TinySwarm(root, env, orphan, bootstrap, servers, probe, url)

            def announced():
                entries = current_entries(probe.run(probe.dht.get_servers, MODEL, range(6)))
                return len(entries) == 4 and entries

            tiny_swarm.entries = wait_until(announced, 30, "all four servers in the DHT")
            yield tiny_swarm
        finally:
            api.stop()
            if probe is not None:
                probe.close()


@pytest.fixture(scope="module")
def client(swarm) -> OpenAI:
    return OpenAI(base_url=f"{swarm.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_chat_streamed_chunks_concatenate_to_the_plain_answer(client):
    plain = client.chat.completions.create(model=MODEL, messages=ask("Good morning"), temperature=0, max_tokens=16)
    choice = plain.choices[0]
    assert plain.object == "chat.completion" and plain.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 16 and plain.usage.prompt_tokens > 3
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.model_extra["petal"] == {"servers": 3, "failovers": 0}

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask("Good morning"),
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    *_, last, usage = chunks
    assert last.choices[0].finish_reason == choice.finish_reason and last.model_extra["petal"]["servers"] == 3
    assert usage.choices == [] and usage.usage == plain.usage
    assert len(chunks) > 3  # streamed piece by piece, not in one go


def test_completion_counts_tokens_and_streams_the_same_text(client, swarm):
    tokenizer = make_tiny_tokenizer()
    prompt = "The quick brown fox"
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert plain.object == "text_completion"
    assert plain.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    if plain.choices[0].finish_reason == "length":
        assert plain.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    # without max_tokens: petal-api's --max-tokens (24)
    default = client.completions.create(model=MODEL, prompt=prompt, temperature=0)
    assert default.choices[0].finish_reason == "stop" or default.usage.completion_tokens == 24


def test_models_and_health_say_which_models_are_fully_served(client, swarm):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, ORPHAN}
    assert cards[MODEL].object == "model" and cards[MODEL].owned_by == "petal"
    assert cards[MODEL].model_extra["petal"] == {"num_blocks": 6, "loaded": True, "usable": True, "missing_blocks": []}
    assert cards[ORPHAN].model_extra["petal"]["usable"] is False
    assert cards[ORPHAN].model_extra["petal"]["missing_blocks"] == [[0, 6]]
    health = httpx.get(f"{swarm.url}/health")  # no key needed
    assert health.status_code == 200, health.text
    assert health.json()["models"][MODEL]["usable"] is True
    assert health.json()["models"][ORPHAN] == {"usable": False, "missing_blocks": [[0, 6]]}


def test_health_is_503_with_the_missing_blocks_when_no_model_is_fully_served(swarm):
    args = ["--initial-peers", swarm.bootstrap.addr, "--model", str(swarm.orphan), "--port", "0"]
    with ApiProcess(args, swarm.root / "api-orphan.log", swarm.env) as api:
        health = httpx.get(f"{api.wait_url()}/health", timeout=60)
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "models": {ORPHAN: {"usable": False, "missing_blocks": [[0, 6]]}}}


def test_a_stop_sequence_ends_the_text_just_before_it(client):
    free = client.chat.completions.create(model=MODEL, messages=ask("Tell me a story"), temperature=0, max_tokens=16)
    text = free.choices[0].message.content
    stop = text[6:9]
    assert len(text) > 9 and stop.strip(), text
    for stream in (False, True):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ask("Tell me a story"),
            temperature=0,
            max_tokens=16,
            stop=[stop, "never seen"],
            stream=stream,
        )
        if stream:
            chunks = list(reply)
            got, reason = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert got == text[: text.index(stop)] and reason == "stop", (stream, got, text, stop)


def test_a_seed_reproduces_a_sampled_answer(client):
    def sample(seed: int) -> str:
        reply = client.completions.create(model=MODEL, prompt="Good evening", temperature=1.0, max_tokens=12, seed=seed)
        return reply.choices[0].text

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first


def test_errors_come_in_openai_envelope_before_reaching_the_swarm(client, swarm):
    def error_of(call) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        return caught.value

    bad = error_of(lambda: client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=-1))
    assert bad.status_code == 400 and bad.body["param"] == "max_tokens" and bad.body["type"] == "invalid_request_error"
    assert "greater than or equal to 1" in bad.body["message"]
    unknown = error_of(lambda: client.chat.completions.create(model="gpt-9", messages=ask("hi")))
    assert unknown.status_code == 404 and unknown.body["code"] == "model_not_found" and MODEL in unknown.body["message"]
    two = error_of(lambda: client.chat.completions.create(model=MODEL, messages=ask("hi"), n=2))
    assert two.status_code == 400 and two.body["param"] == "n" and "n must be 1" in two.body["message"]
    long = error_of(lambda: client.completions.create(model=MODEL, prompt="good morning " * 400, max_tokens=8))
    assert long.status_code == 400 and long.body["code"] == "context_length_exceeded" and long.body["param"] == "prompt"
    assert "at most 512 tokens" in long.body["message"]
    wrong_key = OpenAI(base_url=f"{swarm.url}/v1", api_key="sk-wrong", max_retries=0)
    denied = error_of(lambda: wrong_key.models.list())
    assert denied.status_code == 401 and denied.body["code"] == "invalid_api_key"
    unserved = error_of(lambda: client.chat.completions.create(model=ORPHAN, messages=ask("hi"), max_tokens=4))
    assert unserved.status_code == 503 and unserved.body["code"] == "blocks_unserved"
    assert "blocks 0–5 of tiny-orphan are served by no one" in unserved.body["message"]

    headers = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.post(f"{swarm.url}/v1/chat/completions", json={"model": MODEL}, headers=headers)
    assert missing.status_code == 400
    assert missing.json() == {
        "error": {
            "message": "messages: Field required",
            "type": "invalid_request_error",
            "param": "messages",
            "code": None,
        }
    }
    for content_type in ("application/json", "text/plain"):
        broken = httpx.post(
            f"{swarm.url}/v1/completions", content=b"{", headers={**headers, "Content-Type": content_type}
        )
        assert broken.status_code == 400 and "send a JSON object" in broken.json()["error"]["message"]


def test_eight_concurrent_streams_each_equal_their_solo_answer(client):
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(8)]
    solo = [
        client.chat.completions.create(model=MODEL, messages=ask(p), temperature=0, max_tokens=12)
        .choices[0]
        .message.content
        for p in prompts
    ]

    def streamed(prompt: str) -> str:
        chunks = client.chat.completions.create(
            model=MODEL, messages=ask(prompt), temperature=0, max_tokens=12, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == solo


def test_requests_over_max_concurrent_are_refused_with_429_and_closed_streams_free_their_slots(client, swarm):
    before = swarm.free_caches()
    streams = [
        client.chat.completions.create(
            model=MODEL, messages=ask(f"story {i}"), temperature=0, max_tokens=400, stream=True
        )
        for i in range(MAX_CONCURRENT)
    ]
    try:
        for stream in streams:
            next(iter(stream))
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=ask("one more"), max_tokens=4)
        assert (
            refused.value.body["code"] == "too_many_requests" and "--max-concurrent 8" in refused.value.body["message"]
        )
    finally:
        for stream in streams:
            stream.close()
    wait_until(lambda: swarm.free_caches() == before, 20, "server caches freed after the clients left")
    assert client.chat.completions.create(model=MODEL, messages=ask("one more"), max_tokens=4).choices


def test_a_client_that_disconnects_mid_stream_frees_the_servers_caches(client, swarm):
    before = swarm.free_caches()
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("A long story"), temperature=0, max_tokens=400, stream=True
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    during = swarm.free_caches()
    assert sum(during.values()) < sum(before.values())  # the session holds cache on its route's servers
    stream.close()
    left = time.monotonic()
    # 400 tokens would take far longer than this: generation stopped and the session was closed
    wait_until(lambda: swarm.free_caches() == before, 5, "caches back to their value before the request")
    print(f"caches freed {time.monotonic() - left:.2f} s after the client left")


def test_speculative_decoding_is_a_server_side_setting_with_the_same_answers(client, swarm):
    tiny = swarm.root / MODEL
    args = ["--initial-peers", swarm.bootstrap.addr, "--model", str(tiny), "--port", "0", "--api-key", KEY]
    messages = ask("one two three one two three one two")
    expected = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
    for option in (["--prompt-lookup", "4"], ["--draft-model", str(tiny)]):
        with ApiProcess(args + option, swarm.root / f"api{option[0]}.log", swarm.env) as api:
            speculative = OpenAI(base_url=f"{api.wait_url()}/v1", api_key=KEY, max_retries=0, timeout=120)
            answer = speculative.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
            assert answer.choices[0].message.content == expected.choices[0].message.content, option
            assert answer.usage == expected.usage


def test_kill_9_of_a_server_mid_stream_is_routed_around_and_the_text_is_unchanged(client, swarm):
    """Runs last in this module: it leaves one 2:4 server of the two."""
    messages = ask("Why is the sea salty?")
    expected = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    assert expected.choices[0].finish_reason == "length", "the failover needs an answer long enough to kill in"
    before = swarm.free_caches()
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True)
    chunks = iter(stream)
    text = [next(chunks).choices[0].delta.content for _ in range(4)]
    during = swarm.free_caches()
    busy = [p for p, (span, _) in swarm.servers.items() if span == "2:4" and during[p] < before[p]]
    assert len(busy) == 1, (before, during)
    swarm.servers[busy[0]][1].kill()  # SIGKILL
    rest = list(chunks)
    text += [c.choices[0].delta.content or "" for c in rest]
    assert "".join(text) == expected.choices[0].message.content
    assert rest[-1].model_extra["petal"] == {"servers": 4, "failovers": 1}


# ---- the pure parts


def test_decoding_never_splits_a_character_and_holds_back_a_possible_stop():
    tokenizer = make_tiny_tokenizer()
    text = "Prix: 3 € — naïve café. STOP here"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text) / 2  # byte-level: "€" and friends take several tokens
    pieces = TokenText(tokenizer, [])
    given = [pieces.add(i) for i in ids] + [pieces.flush()]
    assert "".join(given) == text and not any("\ufffd" in p for p in given)

    stopping = TokenText(tokenizer, [". STOP"])
    out = ""
    for i in ids:
        out += stopping.add(i)
        assert not out.endswith((".", ". ", ". S", ". ST", ". STO")) or stopping.stopped
        if stopping.stopped:
            break
    assert stopping.stopped and out == "Prix: 3 € — naïve café"
    assert stopping.add(ids[-1]) == "" and stopping.flush() == ""


def test_config_comes_from_file_then_environment_then_flags(tmp_path: Path):
    config_file = tmp_path / "api.toml"
    config_file.write_text('initial_peers = ["/ip4/1.2.3.4/tcp/1/p2p/A"]\nport = 9000\nmax_concurrent = 3\n')
    environ = {"PETAL_API_PORT": "9001", "PETAL_API_API_KEYS": "k1 k2", "PETAL_API_MODELS": "m1"}
    config = load_config(config_file, {"port": 9002, "models": None}, environ)
    assert config.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/A"] and config.port == 9002
    assert config.api_keys == ["k1", "k2"] and config.models == ["m1"] and config.max_concurrent == 3
    typo = tmp_path / "typo.toml"
    typo.write_text("prot = 1\n")
    with pytest.raises(ApiConfigError, match="unknown configuration keys: prot"):
        load_config(typo, {}, {})
    with pytest.raises(ApiConfigError, match="max_concurrent: 'many' is not a valid int"):
        load_config(config_file, {}, {"PETAL_API_MAX_CONCURRENT": "many"})
    with pytest.raises(ApiConfigError, match="give --initial-peers"):
        load_config(None, {}, {})


def test_cli_lists_take_repeated_flags_and_swallow_nothing():
    from petal_client.api.cli import parser

    args = parser().parse_args(["--initial-peers", "/a", "/b", "--model", "m1", "--initial-peers", "/c", "--port", "0"])
    assert args.initial_peers == ["/a", "/b", "/c"] and args.models == ["m1"] and args.port == 0
    with pytest.raises(SystemExit):  # no positional argument exists that a list could swallow
        parser().parse_args(["stray"])
