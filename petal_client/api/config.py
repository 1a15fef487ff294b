"""petal-api's configuration: one dataclass, from a TOML file, then PETAL_API_* variables, then flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petald.config import layered_values
from petald.errors import PetalError

ENV_PREFIX = "PETAL_API_"


class ApiConfigError(PetalError, ValueError):
    """A configuration value is missing, unknown or malformed."""


@dataclass
class ApiConfig:
    """Everything `petal-api` needs. Names match the TOML keys; the flags are --initial-peers, --model, --host,
    --port, --api-key, --max-concurrent, --max-tokens."""

    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of peers of the swarm
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])  # built-in names, directories or hub ids
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # accepted bearer tokens; none = no authentication
    max_concurrent: int = 16  # generations at once; more are answered 429
    max_tokens: int = 512  # new tokens of a request that does not say (capped by the model's context)
    draft_model: str = ""  # speculative decoding with this local draft model (a directory or built-in name)
    prompt_lookup: int = 0  # speculative decoding with up to this many drafts from the prompt's n-grams (0: off)

    def check(self) -> None:
        if not self.initial_peers:
            raise ApiConfigError("give --initial-peers MULTIADDR ... (the swarm's peers, as petald prints them)")
        if not self.models:
            raise ApiConfigError("give --model NAME ... (a built-in name such as smollm2-135m, or a directory)")
        if not 0 <= self.port < 65536:
            raise ApiConfigError(f"port must be 0..65535, got {self.port}")
        if self.max_concurrent < 1:
            raise ApiConfigError(f"max_concurrent must be at least 1, got {self.max_concurrent}")
        if self.max_tokens < 1:
            raise ApiConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.prompt_lookup < 0:
            raise ApiConfigError(f"prompt_lookup must be 0 (off) or a number of draft tokens, got {self.prompt_lookup}")
        if self.draft_model and self.prompt_lookup:
            raise ApiConfigError("give draft_model or prompt_lookup, not both")


def load_config(config_file: Path | None, flags: dict[str, Any], environ: dict[str, str] | None = None) -> ApiConfig:
    """Defaults, overridden by the TOML file, then by PETAL_API_* variables (lists space-separated), then by
    the flags that were given."""
    values = layered_values(ApiConfig, ENV_PREFIX, config_file, flags, environ, ApiConfigError)
    fields = {f.name: f for f in dataclasses.fields(ApiConfig)}
    config = ApiConfig(**{name: _coerce(name, value, fields[name].type) for name, value in values.items()})
    config.check()
    return config


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """A TOML, environment or flag value as the field's type (strings are parsed), or an error naming the field."""
    if annotation == "list[str]":
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif annotation == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif isinstance(value, str):
        return value
    raise ApiConfigError(f"{name}: {value!r} is not a valid {annotation}")
