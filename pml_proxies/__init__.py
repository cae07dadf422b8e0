"""pml-proxies: proxy-based deep-metric-learning losses for pytorch-metric-learning."""

from . import losses, regularizers, utils

__version__ = "0.1.0"

__all__ = ["losses", "regularizers", "utils", "__version__"]
