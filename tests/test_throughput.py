"""The throughput figure: measured once per machine, model, span size and quant, then read from the disk cache."""

from __future__ import annotations

import json

from petald.serving.throughput import cached_throughput, measure_cached, throughput_cache_path, throughput_key


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
