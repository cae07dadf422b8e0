"""Run this package's losses under powerful-benchmarker's Metric Learning Reality Check protocol.

Needs the ``benchmark`` extra (``pip install "pml-proxies[benchmark]"``): without it, importing
this package raises an ImportError that names the extra. Everything that needs
powerful-benchmarker is imported lazily (inside :func:`launcher.main` and :mod:`shims`), so
``import pml_proxies.mlrc`` works without it.
"""

from .._extras import require_benchmark_extra
from .datasets import ImageFolderDataset
from .models import TinyConvTrunk

require_benchmark_extra(__name__)

__all__ = ["ImageFolderDataset", "TinyConvTrunk"]
