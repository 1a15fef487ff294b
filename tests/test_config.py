"""NodeConfig: where values come from (defaults < TOML < PETALD_* < flags), how they are checked, and the shipped
example config and systemd unit."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from petald.config import ConfigError, NodeConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXAMPLE_TOML = CONFIGS / "petald.toml"
UNIT = CONFIGS / "petald.service"
FIELDS = [f.name for f in dataclasses.fields(NodeConfig)]


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "petald.toml"
    path.write_text(text)
    return path


def serving_config(**changes) -> NodeConfig:
    """A config that passes check_serving, with `changes` applied."""
    return dataclasses.replace(NodeConfig(model="smollm2-135m", num_blocks=4, new_swarm=True), **changes)


# --- where values come from ---


def test_nothing_given_yields_the_dataclass_defaults():
    assert load_config(None, {}, environ={}) == NodeConfig()


def test_toml_overrides_defaults_env_overrides_toml_flags_override_env(tmp_path):
    toml = write_toml(tmp_path, 'model = "from-toml"\nport = 1000\nheartbeat = 10.0\nlog_level = "debug"\n')
    environ = {"PETALD_MODEL": "from-env", "PETALD_PORT": "2000", "PETALD_LOG_FORMAT": "json"}
    flags = {"port": 3000, "log_level": None}  # None: a flag that was not given

    config = load_config(toml, flags, environ=environ)

    assert config.port == 3000  # flag beats env and TOML
    assert config.model == "from-env"  # env beats TOML
    assert config.log_format == "json"  # env beats default
    assert config.heartbeat == 10.0 and config.log_level == "debug"  # TOML beats default; unset flag does not
    assert config.host == NodeConfig().host  # untouched everywhere


def test_flags_outside_node_config_and_unrelated_env_are_ignored():
    config = load_config(None, {"command": "start", "config": "x.toml"}, environ={"PETALD_COLOR": "1", "PORT": "1"})
    assert config == NodeConfig()


@pytest.mark.parametrize(
    ("variable", "text", "field", "expected"),
    [
        ("PETALD_PORT", "31337", "port", 31337),
        ("PETALD_NUM_BLOCKS", "12", "num_blocks", 12),
        ("PETALD_HEARTBEAT", "5", "heartbeat", 5.0),
        ("PETALD_THROUGHPUT", "12.5", "throughput", 12.5),
        ("PETALD_NEW_SWARM", "true", "new_swarm", True),
        ("PETALD_NEW_SWARM", "YES", "new_swarm", True),
        ("PETALD_NEW_SWARM", "1", "new_swarm", True),
        ("PETALD_NEW_SWARM", "0", "new_swarm", False),
        ("PETALD_NEW_SWARM", "False", "new_swarm", False),
        (
            "PETALD_INITIAL_PEERS",
            "/ip4/10.0.0.1/tcp/1/p2p/A  /ip4/10.0.0.2/tcp/2/p2p/B",
            "initial_peers",
            ["/ip4/10.0.0.1/tcp/1/p2p/A", "/ip4/10.0.0.2/tcp/2/p2p/B"],
        ),
        ("PETALD_IDENTITY", "~/petal/identity.key", "identity", Path.home() / "petal" / "identity.key"),
        ("PETALD_MODEL", "HuggingFaceTB/SmolLM2-135M", "model", "HuggingFaceTB/SmolLM2-135M"),
    ],
)
def test_env_strings_are_coerced_to_the_field_type(variable, text, field, expected):
    value = getattr(load_config(None, {}, environ={variable: text}), field)
    assert value == expected and type(value) is type(expected)


def test_toml_values_are_coerced_to_the_field_type(tmp_path):
    toml = write_toml(tmp_path, 'heartbeat = 10\nexpiry = 40\nidentity = "~/id.key"\ninitial_peers = []\n')
    config = load_config(toml, {}, environ={})
    assert config.heartbeat == 10.0 and type(config.heartbeat) is float
    assert config.identity == Path.home() / "id.key"
    assert config.initial_peers == []


# --- errors a user can act on ---


def test_unknown_toml_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown configuration keys: prot"):
        load_config(write_toml(tmp_path, "prot = 1\n"), {}, environ={})


@pytest.mark.parametrize(
    ("toml", "environ", "named"),
    [
        ('port = "abc"\n', {}, r"port: 'abc' is not a valid int"),
        ("", {"PETALD_PORT": "31330.5"}, r"port: '31330.5'"),
        ("", {"PETALD_HEARTBEAT": "soon"}, r"heartbeat: 'soon' is not a valid float"),
        ("", {"PETALD_NEW_SWARM": "maybe"}, r"new_swarm: 'maybe' is not a valid bool"),
    ],
)
def test_malformed_value_names_field_and_value(tmp_path, toml, environ, named):
    with pytest.raises(ConfigError, match=named):
        load_config(write_toml(tmp_path, toml), {}, environ=environ)


def test_missing_config_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=f"cannot read config file {re.escape(str(missing))}"):
        load_config(missing, {}, environ={})


def test_invalid_toml_is_a_config_error_with_the_parser_message(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*line 1"):
        load_config(write_toml(tmp_path, "port = \n"), {}, environ={})


def test_blocks_as_start_colon_end():
    assert NodeConfig(blocks="10:20").span_bounds() == (10, 20)
    assert NodeConfig(num_blocks=4).span_bounds() is None


@pytest.mark.parametrize("blocks", ["10-20", "10", "a:b", "1:2:3", ""])
def test_blocks_not_like_start_colon_end_is_rejected(blocks):
    with pytest.raises(ConfigError, match=f"blocks must look like 10:20, got {blocks!r}"):
        NodeConfig(blocks=blocks).span_bounds()


def test_a_complete_serving_config_passes():
    serving_config().check_serving()
    serving_config(num_blocks=None, blocks="0:4", new_swarm=False, initial_peers=["/ip4/1.2.3.4/tcp/1"]).check_serving()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model": None}, "no model: give --model"),
        ({"blocks": "0:4"}, "either --blocks A:B or --num-blocks N, not both"),
        ({"num_blocks": None}, "give --blocks A:B, --num-blocks N or --max-memory SIZE"),
        ({"num_blocks": None, "max_memory": "2 parsecs"}, "max_memory must be a size such as 2GB"),
        ({"initial_peers": ["/ip4/1.2.3.4/tcp/1"]}, "--new-swarm .* takes no --initial-peers"),
        ({"new_swarm": False}, "give --initial-peers MULTIADDR ... to join a swarm, or --new-swarm"),
        ({"quant": "fp4"}, "quant must be one of none, int8, nf4, got 'fp4'"),
        ({"log_format": "xml"}, "log_format must be text or json, got 'xml'"),
        ({"expiry": 30.0}, r"expiry \(30.0 s\) must be longer than heartbeat \(30.0 s\)"),
        ({"expiry": 10.0}, r"expiry \(10.0 s\) must be longer than heartbeat"),
        ({"balance_quality": 0.0}, r"balance_quality must be in \(0, 1\], got 0.0"),
        ({"balance_quality": 1.5}, r"balance_quality must be in \(0, 1\], got 1.5"),
        ({"balance_period": -1.0}, r"balance_period must be 0 \(never move\) or more seconds, got -1.0"),
    ],
)
def test_check_serving_names_what_is_wrong(changes, named):
    with pytest.raises(ConfigError, match=named):
        serving_config(**changes).check_serving()


# --- configs/petald.toml ---


def test_example_config_loads_with_the_values_it_shows():
    config = load_config(EXAMPLE_TOML, {}, environ={})
    written = tomllib.loads(EXAMPLE_TOML.read_text())

    assert config.model == "smollm2-135m"
    assert config.num_blocks == 10 and config.blocks is None
    assert config.host == "0.0.0.0" and config.port == 31330 and config.public_host is None
    assert config.identity == Path("/var/lib/petal/identity.key")
    assert len(config.initial_peers) == 1 and config.initial_peers[0].startswith("/ip4/203.0.113.7/tcp/31330/p2p/")
    assert config.throughput is None
    for name, value in written.items():
        assert getattr(config, name) == (Path(value) if name == "identity" else value), name
    config.check_serving()


def test_example_config_shows_every_field_and_comments_out_only_none_defaults():
    text = EXAMPLE_TOML.read_text()
    written = tomllib.loads(text)
    commented = set(re.findall(r"^#\s*(\w+)\s*=", text, flags=re.MULTILINE))
    defaults = NodeConfig()

    assert [name for name in FIELDS if name not in written and name not in commented] == []
    assert [name for name in FIELDS if name not in written and getattr(defaults, name) is not None] == []


def test_example_config_commented_out_values_are_valid_when_uncommented(tmp_path):
    text = EXAMPLE_TOML.read_text()
    for name in set(re.findall(r"^#\s*(\w+)\s*=", text, flags=re.MULTILINE)) & set(FIELDS):
        uncommented = re.sub(rf"^#\s*({name}\s*=)", r"\1", text, flags=re.MULTILINE)
        config = load_config(write_toml(tmp_path, uncommented), {}, environ={})
        assert getattr(config, name) is not None, name


# --- configs/petald.service ---


def systemd_analyze() -> str:
    """The systemd-analyze binary, installing Debian's systemd package if it is missing (root only)."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("systemd-analyze is missing and installing systemd needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "systemd"]
    if subprocess.run(install, env=env, capture_output=True, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300, check=True)
        subprocess.run(install, env=env, capture_output=True, timeout=300, check=True)
    found = shutil.which("systemd-analyze")
    assert found, "installed systemd but systemd-analyze is still not on PATH"
    return found


def test_systemd_unit_verifies(tmp_path):
    # verify insists that ExecStart's binary exists: point it at this checkout's petald
    petald = Path(sys.executable).parent / "petald"
    assert petald.is_file(), f"{petald} is missing: run scripts/setup"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/petal/.venv/bin/petald", str(petald)))

    result = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)

    output = result.stdout + result.stderr
    # unknown keys and unparsable values are only warnings (exit 0): any line about our unit is a defect
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if UNIT.name in line] == []


def test_systemd_unit_waits_longer_than_the_drain_before_killing():
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.MULTILINE))

    assert settings["ExecStart"] == "/opt/petal/.venv/bin/petald start --config /etc/petal/petald.toml"
    assert settings["KillSignal"] == "SIGTERM" and settings["Restart"] == "on-failure"
    timeout = re.fullmatch(r"(\d+)s?", settings["TimeoutStopSec"])
    assert timeout and int(timeout[1]) > NodeConfig().drain_timeout
