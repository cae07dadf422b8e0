"""pml-proxies: proxy-based deep-metric-learning losses for pytorch-metric-learning.

Submodules are imported lazily, so ``import pml_proxies.losses`` loads only what the losses need
(torch and PML), not the data sets, the benchmark or the metric stack.
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
    "regularizers",
    "utils",
)

__all__ = ["AccuracyCalculator", "__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "AccuracyCalculator":
        from .utils.accuracy_calculator import AccuracyCalculator

        return AccuracyCalculator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
