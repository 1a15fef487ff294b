"""Shared fixtures: tiny random checkpoints (fast) and the real SmolLM2 model (converted once per machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from petald.models.checkpoints import make_tiny_bloom, make_tiny_llama, make_tiny_model, prepare_builtin


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_model: converts and runs the built-in SmolLM2-135M (~40 s cold, ~20 s warm)"
    )


@pytest.fixture(scope="session")
def petal_test_home() -> Path:
    """A PETAL_HOME shared across test sessions ($PETAL_TEST_HOME, else ~/.cache/petal-test), so the real
    model is converted once per machine and the user's own cache is never touched."""
    return Path(os.environ.get("PETAL_TEST_HOME", "~/.cache/petal-test")).expanduser()


@pytest.fixture(scope="session")
def smollm2(petal_test_home: Path) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PETAL_HOME", str(petal_test_home))
        return prepare_builtin("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory) -> Path:
    return make_tiny_bloom(tmp_path_factory.mktemp("models") / "tiny-bloom")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, tiny_llama, tiny_bloom):
    """make(family) -> the tiny random checkpoint of that family (scripts/make_tiny_model --family), made once per
    test session, in a directory named tiny-<family> (its name in a swarm)."""
    made = {"llama": tiny_llama, "bloom": tiny_bloom}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(family, tmp_path_factory.mktemp("models") / f"tiny-{family}")
        return made[family]

    return make


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_bloom"])
def tiny_model(request) -> Path:
    """Each tiny checkpoint in turn."""
    return request.getfixturevalue(request.param)


@dataclass
class TinySwarm:
    addr: str  # the bootstrap node's multiaddr
    peft_model: object  # the peft model of the adapter `lora` the servers serve
    servers: list  # NodeProcess of each server
    nodes: object  # petald.local_swarm.Swarm: start more nodes on it (they are stopped with it)


@pytest.fixture(scope="session")
def tiny_swarm(tiny_llama, tmp_path_factory):
    """One swarm shared by the tests that need an ordinary one: a DHT node and 3 servers of the tiny Llama
    (blocks 0:2, 2:4, 4:6), each also serving the LoRA adapter `lora` and its metrics (NodeProcess.metrics_url).
    A test that kills servers starts its own extra ones on it."""
    from petald.local_swarm import local_swarm
    from tests.test_adapters import LLAMA_TARGETS, base_model, make_adapter

    tmp = tmp_path_factory.mktemp("tiny-swarm")
    adapter_dir, peft_model = make_adapter(base_model(tiny_llama), tmp / "lora", target_modules=LLAMA_TARGETS)
    env = {**os.environ, "PETAL_HOME": str(tmp / "home")}
    fast = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0", "--metrics-port", "0"]
    with local_swarm(tmp, env) as swarm:
        bootstrap, servers = swarm.start_spans(
            str(tiny_llama), ("0:2", "2:4", "4:6"), *fast, "--adapters", f"lora={adapter_dir}"
        )
        yield TinySwarm(bootstrap.addr, peft_model, servers, swarm)


@pytest.fixture
def browser():
    """Debian's headless chromium through its chromedriver (selenium), stopped after the test."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromium and chromedriver
