"""Run this package's losses under powerful-benchmarker's Metric Learning Reality Check protocol.

Everything that needs powerful-benchmarker is imported lazily (inside :func:`launcher.main` and
:mod:`shims`), so ``import pml_proxies.mlrc`` works without it.
"""

from .datasets import ImageFolderDataset
from .models import TinyConvTrunk

__all__ = ["ImageFolderDataset", "TinyConvTrunk"]
