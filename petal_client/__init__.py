"""Petal client: run a model whose blocks live on a swarm of petald servers.

    from petal_client import DistributedModelForCausalLM

The names below are imported on first use, so that `petal-generate --help` does not wait for torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DistributedModelForCausalLM": "petal_client.model",
    "DistributedModelForSequenceClassification": "petal_client.model",
    "RemoteSequential": "petal_client.sequential",
    "RemoteInferenceSession": "petal_client.session",
    "Swarm": "petal_client.swarm",
    "SwarmError": "petal_client.swarm",
    "ServerFailure": "petal_client.swarm",
    "MissingBlocksError": "petal_client.routing",
    "PetalError": "petald.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'petal_client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
