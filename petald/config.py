"""The node's configuration: one dataclass, from a TOML file, then PETALD_* environment variables, then flags."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petald.errors import PetalError

ENV_PREFIX = "PETALD_"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ConfigError(PetalError, ValueError):
    """A configuration value is missing, unknown or malformed."""


@dataclass
class NodeConfig:
    """Everything `petald start` / `petald dht` needs. Names match the TOML keys and the --flags."""

    model: str | None = None  # built-in name, local HF directory or hub id
    blocks: str | None = None  # "A:B": serve blocks [A, B)
    num_blocks: int | None = None  # or: serve this many blocks, chosen where the swarm is weakest
    max_memory: str | None = None  # e.g. "2GB": serve as many blocks as their weights and KV cache fit in this
    balance_quality: float = 0.75  # with num_blocks: move if the weakest block's throughput before/after is below
    balance_period: float = 60.0  # with num_blocks: seconds (x 0.5-1.5) between balance checks; 0 = never move
    host: str = "127.0.0.1"  # address to listen on
    port: int = 31330  # 0 = any free port
    public_host: str | None = None  # address to announce instead of the listening one (behind NAT)
    public_name: str = ""  # a short display name announced in the DHT (monitor, status); "" = none
    metrics_port: int | None = None  # serve /metrics (Prometheus) and /health on host:metrics_port; none = off
    identity: Path | None = None  # Ed25519 key file; created (0600) if missing; none = new identity each run
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of peers to join through
    new_swarm: bool = False  # start a swarm of one instead of joining
    relay: bool = False  # offer circuit relay v2 reservations to nodes behind NAT (a public node)
    relay_peers: list[str] = field(default_factory=list)  # relays to reserve at first when behind NAT
    quant: str = "none"  # none | int8 | nf4
    adapters: list[str] = field(default_factory=list)  # LoRA adapters to serve, as NAME=PATH (peft directories)
    max_cache_tokens: int = 16384  # KV cache budget, in tokens (batch x length), for the whole span
    max_batch_size: int = 64
    max_forward_tokens: int = 16384  # batch x tokens of one forward or backward (training) request
    no_batching: bool = False  # run each session's steps alone instead of in passes shared with other sessions
    torch_threads: int | None = None  # threads of torch's intra-op pool; none = torch's default (one per core)
    throughput: float | None = None  # blocks x steps / s to announce; none = measure at start
    heartbeat: float = 30.0  # seconds between re-announcements
    expiry: float = 90.0  # seconds an announcement stays valid
    step_timeout: float = 300.0  # seconds a session may wait between steps
    session_timeout: float = 1800.0  # seconds a session may last
    drain_timeout: float = 30.0  # seconds open sessions may finish after SIGTERM
    log_format: str = "text"  # text | json
    log_level: str = "info"

    def span_bounds(self) -> tuple[int, int] | None:
        """(start, end) from `blocks`, or None when the node picks its span."""
        if self.blocks is None:
            return None
        try:
            start, end = (int(part) for part in self.blocks.split(":"))
        except ValueError:
            raise ConfigError(f"blocks must look like 10:20, got {self.blocks!r}") from None
        return start, end

    def adapter_paths(self) -> dict[str, Path]:
        """Adapter name -> peft adapter directory, from `adapters` ("NAME=PATH" each)."""
        paths: dict[str, Path] = {}
        for item in self.adapters:
            name, equals, path = item.partition("=")
            if not equals or not path or not ADAPTER_NAME.fullmatch(name):
                raise ConfigError(
                    f"adapters: {item!r} is not NAME=PATH (a name of 1 to 64 letters, digits, '.', '_' or '-')"
                )
            if name in paths:
                raise ConfigError(f"adapters: {name!r} is given twice")
            paths[name] = Path(path).expanduser()
        return paths

    def check_serving(self) -> None:
        """Raise ConfigError unless this config can start a serving node."""
        if not self.model:
            raise ConfigError("no model: give --model (a built-in name such as smollm2-135m, or a directory)")
        if self.blocks is not None and self.num_blocks is not None:
            raise ConfigError("give either --blocks A:B or --num-blocks N, not both")
        if self.blocks is None and self.num_blocks is None and self.max_memory is None:
            raise ConfigError("give --blocks A:B, --num-blocks N or --max-memory SIZE (e.g. 2GB)")
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        bounds = self.span_bounds()
        if bounds is not None and not 0 <= bounds[0] < bounds[1]:
            raise ConfigError(f"blocks {self.blocks} is empty or negative: give A:B with 0 <= A < B, e.g. 10:20")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be 1 or more, got {self.num_blocks}")
        if not 0 < self.balance_quality <= 1:
            raise ConfigError(f"balance_quality must be in (0, 1], got {self.balance_quality}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be 1 or more, got {self.torch_threads}")
        self.adapter_paths()
        from petald.p2p.dht import InvalidRecord, check_public_name  # imports libp2p: only when a node starts

        try:
            check_public_name(self.public_name)
        except InvalidRecord as e:
            raise ConfigError(f"{e}: give a public_name of at most 32 printable characters") from None
        if self.balance_period < 0:
            raise ConfigError(f"balance_period must be 0 (never move) or more seconds, got {self.balance_period}")
        self.check_swarm()

    def check_swarm(self) -> None:
        if self.new_swarm and self.initial_peers:
            raise ConfigError("--new-swarm starts a swarm of its own: it takes no --initial-peers")
        if not self.new_swarm and not self.initial_peers:
            raise ConfigError("give --initial-peers MULTIADDR ... to join a swarm, or --new-swarm to start one")
        from petald.p2p.dht import QUANTS  # imports libp2p: only when a node is about to start

        if self.quant not in QUANTS:
            raise ConfigError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be a TCP port (0 = any free one), got {self.metrics_port}")
        if self.expiry <= self.heartbeat:
            raise ConfigError(f"expiry ({self.expiry} s) must be longer than heartbeat ({self.heartbeat} s)")


MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
MEMORY_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MEMORY_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_memory(text: str) -> int:
    """Bytes from a size such as 2GB, 1.5 GiB, 800MiB or 1000000 (decimal and binary units); ConfigError if not one."""
    match = MEMORY_SIZE.fullmatch(text)
    unit = match and match.group(2).lower()
    if match is None or unit not in MEMORY_UNITS:
        raise ConfigError(f"max_memory must be a size such as 2GB, 1.5GiB or 800MB, got {text!r}")
    size = float(match.group(1)) * MEMORY_UNITS[unit]
    if not 1 <= size < 2**63:
        raise ConfigError(f"max_memory must be at least 1 byte and below 8 EiB, got {text!r}")
    return int(size)


def load_config(config_file: Path | None, flags: dict[str, Any], environ: dict[str, str] | None = None) -> NodeConfig:
    """Defaults, overridden by the TOML file, then by PETALD_* variables, then by flags that were given."""
    values = layered_values(NodeConfig, ENV_PREFIX, config_file, flags, environ, ConfigError)
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    return NodeConfig(**{name: _coerce(name, value, fields[name].type) for name, value in values.items()})


def layered_values(
    cls: type,
    env_prefix: str,
    config_file: Path | None,
    flags: dict[str, Any],
    environ: dict[str, str] | None,
    error: type[Exception],
) -> dict[str, Any]:
    """The raw values of dataclass `cls`'s fields: from the TOML file, then `env_prefix`* variables, then the
    flags that were given (not None); `error` for an unreadable file or an unknown key. Types are the caller's."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(config_file.read_text()))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise error(f"cannot read config file {config_file}: {e}") from e
    fields = [f.name for f in dataclasses.fields(cls)]
    for name in fields:
        if env_prefix + name.upper() in environ:
            values[name] = environ[env_prefix + name.upper()]
    values.update({k: v for k, v in flags.items() if v is not None and k in fields})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise error(f"unknown configuration keys: {', '.join(unknown)} (known: {', '.join(fields)})")
    return values


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Turn a TOML or environment value into the field's type, with an error naming the field.

    Strings (from the environment or flags) are parsed; other TOML values must already have the type."""
    kind = annotation.removesuffix(" | None")
    if not isinstance(value, str) and not _has_type(value, kind):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}")
    try:
        if "list[str]" in annotation:
            return value.split() if isinstance(value, str) else [str(v) for v in value]
        if annotation.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if "Path" in annotation:
            return Path(value).expanduser()
        if annotation.startswith("int"):
            return int(value)
        if annotation.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from None


def _has_type(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, (str, Path))
