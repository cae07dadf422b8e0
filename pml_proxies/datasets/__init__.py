"""Data sets of the fair-comparison benchmark, with class-disjoint train/test splits.

>>> from pml_proxies.datasets import get_dataset, get_transforms
>>> ds = get_dataset("digits", "train")
>>> image, label = ds[0]  # (1, 8, 8) float tensor in [0, 1], int label
"""

from . import transforms
from .base import ENV_ROOT, BaseDataset, ImageFileDataset, default_root
from .download import CorruptArchiveError, DownloadError, download_url, extract_archive
from .factory import DATASET_NAMES, dataset_class, get_dataset, get_transforms

__all__ = [
    "DATASET_NAMES",
    "ENV_ROOT",
    "BaseDataset",
    "CorruptArchiveError",
    "DownloadError",
    "ImageFileDataset",
    "dataset_class",
    "default_root",
    "download_url",
    "extract_archive",
    "get_dataset",
    "get_transforms",
    "transforms",
]
