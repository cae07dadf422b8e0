"""Fair-comparison benchmark of the losses of pml-proxies and PML baselines.

``pml-proxies-benchmark`` (or ``python -m pml_proxies.benchmark``) trains every selected loss
with several seeds under one protocol, selects each run's epoch on held-out training classes,
evaluates it on the test classes and writes CSV / Markdown tables and PNG plots.
"""

from .config import BenchmarkConfig
from .losses import LOSS_NAMES, LOSSES, available_losses, build_loss, get_proxies, loss_kwargs
from .runner import run_benchmark
from .spec import RunSpec, TrunkRecipe, build_run_spec, build_run_specs
from .stats import mean_confidence_interval
from .train import train_and_evaluate

__all__ = [
    "LOSSES",
    "RunSpec",
    "TrunkRecipe",
    "build_run_spec",
    "build_run_specs",
    "train_and_evaluate",
    "LOSS_NAMES",
    "BenchmarkConfig",
    "available_losses",
    "build_loss",
    "get_proxies",
    "loss_kwargs",
    "mean_confidence_interval",
    "run_benchmark",
]
