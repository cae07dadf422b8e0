"""pml-proxies: proxy-based deep-metric-learning losses for pytorch-metric-learning."""

from . import datasets, hooks, losses, regularizers, utils
from .utils.accuracy_calculator import AccuracyCalculator

__version__ = "0.1.0"

__all__ = [
    "AccuracyCalculator",
    "datasets",
    "hooks",
    "losses",
    "regularizers",
    "utils",
    "__version__",
]
