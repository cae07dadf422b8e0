"""Utilities: the accuracy calculator (nDCG@k, Recall@k), the pure-torch kNN, and the components
the losses are built from (:mod:`.class_memory_bank`, :mod:`.rng_state`).

Submodules load on first use, so that a loss importing its components does not load the
calculator's metric stack (scikit-learn, faiss, pandas).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import accuracy_calculator, class_memory_bank, knn, rng_state
    from .accuracy_calculator import AccuracyCalculator
    from .class_memory_bank import ClassMemoryBank
    from .knn import TorchKNN

_SUBMODULES = ("accuracy_calculator", "class_memory_bank", "knn", "rng_state")
_NAMES = {
    "AccuracyCalculator": "accuracy_calculator",
    "ClassMemoryBank": "class_memory_bank",
    "TorchKNN": "knn",
}

__all__ = [
    "AccuracyCalculator",
    "ClassMemoryBank",
    "TorchKNN",
    "accuracy_calculator",
    "class_memory_bank",
    "knn",
    "rng_state",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
