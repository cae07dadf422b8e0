"""Fair-comparison benchmark of the losses of pml-proxies and PML baselines.

``pml-proxies-benchmark`` (or ``python -m pml_proxies.benchmark``) trains every selected loss
with several seeds under one protocol, selects each run's epoch on held-out training classes,
evaluates it on the test classes and writes CSV / Markdown tables, plots and ``report.md``.

Needs the ``benchmark`` extra (``pip install "pml-proxies[benchmark]"``): without it, importing
this package raises an ImportError that names the extra. Names are imported lazily (``--help``
does not load torch). ``load_model(run_dir)`` loads back a run's model kept by
``--save-models``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._extras import require_benchmark_extra

require_benchmark_extra(__name__)

_EXPORTS = {
    "BenchmarkConfig": "config",
    "ConfigError": "config",
    "LOSSES": "losses",
    "LOSS_NAMES": "losses",
    "build_loss": "losses",
    "get_proxies": "losses",
    "loss_kwargs": "losses",
    "load_model": "models_io",
    "SavedModel": "models_io",
    "mean_confidence_interval": "stats",
    "run_benchmark": "runner",
    "RunSpec": "spec",
    "TrunkRecipe": "spec",
    "build_run_spec": "spec",
    "build_run_specs": "spec",
    "train_and_evaluate": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
