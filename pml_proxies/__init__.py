"""pml-proxies: proxy-based deep-metric-learning losses for pytorch-metric-learning.

Submodules are imported lazily, so ``import pml_proxies.losses`` loads only what the losses need
(torch and PML), not the data sets, the benchmark or the metric stack.

``pml_proxies.create_loss(name, num_classes, embedding_size, dataset=None, **overrides)`` builds
a loss of the registry (:mod:`pml_proxies.registry`) with its papers' defaults;
``pml_proxies.list_losses()`` names them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_SUBMODULES = (
    "datasets",
    "distributed",
    "functional",
    "hooks",
    "losses",
    "reducers",
    "registry",
    "regularizers",
    "utils",
)

#: names of :mod:`pml_proxies.registry` exported here
_REGISTRY = ("create_loss", "create_miner", "list_losses")

__all__ = ["AccuracyCalculator", "__version__", *_REGISTRY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "AccuracyCalculator":
        from .utils.accuracy_calculator import AccuracyCalculator

        return AccuracyCalculator
    if name in _REGISTRY:
        return getattr(importlib.import_module(".registry", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
