"""The throughput figure: measured once per machine, model, span size and quant, then read from the disk cache."""

from __future__ import annotations

import json
import os

import pytest

from petald.local_swarm import local_swarm
from petald.serving.throughput import (
    announced_throughput,
    cached_throughput,
    measure_cached,
    network_throughput,
    throughput_cache_path,
    throughput_key,
)


class FakeMeasure:
    def __init__(self, value: float):
        self.value, self.calls = value, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def test_a_second_start_reads_the_cached_figure_instead_of_measuring(tmp_path):
    path = tmp_path / "throughput.json"
    key = throughput_key("tiny-llama", 10, "none")
    measure = FakeMeasure(123.5)

    assert measure_cached(key, measure, path) == 123.5
    assert measure_cached(key, measure, path) == 123.5
    assert measure.calls == 1
    assert cached_throughput(key, path) == 123.5
    assert json.loads(path.read_text()) == {key: 123.5}


def test_another_span_size_quant_or_model_is_measured_anew(tmp_path):
    path = tmp_path / "throughput.json"
    measure_cached(throughput_key("tiny-llama", 10, "none"), FakeMeasure(100.0), path)
    for key in (
        throughput_key("tiny-llama", 5, "none"),
        throughput_key("tiny-llama", 10, "int8"),
        throughput_key("smollm2-135m", 10, "none"),
    ):
        measure = FakeMeasure(7.0)
        assert measure_cached(key, measure, path) == 7.0
        assert measure.calls == 1
    assert len(json.loads(path.read_text())) == 4


def test_the_key_names_the_hardware_and_software_it_was_measured_on():
    key = throughput_key("tiny-llama", 10, "nf4")
    for part in ("torch=", "device=", "threads=", "model=tiny-llama", "blocks=10", "quant=nf4"):
        assert part in key


def test_a_corrupt_or_unwritable_cache_only_costs_a_measurement(tmp_path):
    path = tmp_path / "throughput.json"
    path.write_text("{not json")
    measure = FakeMeasure(5.0)
    assert measure_cached("k", measure, path) == 5.0 and measure.calls == 1
    assert cached_throughput("k", path) == 5.0  # rewritten whole

    blocked = tmp_path / "file" / "throughput.json"
    (tmp_path / "file").write_text("a file where the directory should be")
    assert measure_cached("k", FakeMeasure(6.0), blocked) == 6.0


def test_the_cache_lives_in_petal_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path))
    assert throughput_cache_path() == tmp_path / "throughput.json"
    monkeypatch.delenv("PETAL_HOME")
    assert throughput_cache_path().parts[-3:] == (".cache", "petal", "throughput.json")


def test_network_throughput_counts_each_token_crossing_the_link_twice_for_all_its_blocks():
    # 1 MB/s, hidden 500 fp32: 2 x 2000 bytes per token = 250 tokens/s, for each of 10 blocks
    assert network_throughput(1e6, hidden_size=500, num_blocks=10) == pytest.approx(2500.0)
    assert announced_throughput(compute=40.0, network=2500.0) == 40.0
    assert announced_throughput(compute=40.0, network=12.5) == 12.5
    assert announced_throughput(compute=40.0, network=None) == 40.0


def test_a_server_probes_its_network_to_a_swarm_peer_and_announces_the_lower_figure(tiny_llama, tmp_path):
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}
    with local_swarm(tmp_path, env) as swarm:
        first = swarm.start("dht", "--port", "0", "--new-swarm")
        server = swarm.start(
            "start", "--model", str(tiny_llama), "--blocks", "0:6", "--port", "0", "--initial-peers", first.addr
        )
        server.wait_serving()
        found = server.wait_for(r"network: ([\d.]+) MB/s to the swarm = (\d+) blocks\*tokens/s; compute: ([\d.]+)")
        bandwidth, network, compute = float(found[1]), float(found[2]), float(found[3])
        assert bandwidth > 0 and network > 0 and compute > 0
        serving = server.wait_for(r"serving blocks 0:6 of \S+ at ([\d.]+) blocks\*steps/s")
        assert float(serving[1]) == pytest.approx(min(network, compute), rel=0.01, abs=0.1)
