"""Common base class of the benchmark data sets, default data root and split checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ENV_ROOT = "PML_PROXIES_DATA"
SPLITS = ("train", "test")


def default_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$PML_PROXIES_DATA``, else ``~/.cache/pml-proxies/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/pml-proxies/data").expanduser()


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")
    return split


def contiguous_labels(raw: Sequence) -> tuple[np.ndarray, list]:
    """Map raw class keys to ids 0..C-1 in sorted key order; returns (labels int64, sorted keys)."""
    keys = sorted(set(raw))
    index = {k: i for i, k in enumerate(keys)}
    return np.fromiter((index[k] for k in raw), dtype=np.int64, count=len(raw)), keys


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and convert it to RGB (CUB and Cars contain a few greyscale/CMYK files)."""
    with Image.open(path) as im:
        return im.convert("RGB")


class BaseDataset(torch.utils.data.Dataset):
    """A class-labelled image set for one split.

    ``ds[i]`` returns ``(transform(image), label)`` with ``label`` a Python int; ``ds.labels`` is
    an int64 array of class ids contiguous in ``0..num_classes-1`` within the split and
    ``ds.classes[c]`` the name of class ``c``. Subclasses set ``labels``/``classes`` and
    implement :meth:`load_image` (the raw PIL image or array, before any transform).
    """

    name: str = ""
    #: default image side for :func:`~pml_proxies.datasets.get_transforms`
    default_image_size: int = 224
    #: default number of channels of the transformed images
    default_channels: int = 3

    def __init__(
        self,
        split: str,
        labels: np.ndarray,
        classes: Sequence[str],
        transform: Callable | None,
    ):
        self.split = split
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = [str(c) for c in classes]
        self.transform = transform
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError("labels must lie in 0..len(classes)-1")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_image(self, index: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes})"
        )


class ImageFileDataset(BaseDataset):
    """Images stored as files: ``paths[i]`` is opened with PIL and converted to RGB."""

    def __init__(
        self,
        split: str,
        root: Path,
        paths: Sequence[str | os.PathLike],
        labels: np.ndarray,
        classes: Sequence[str],
        transform: Callable | None,
    ):
        super().__init__(split, labels, classes, transform)
        self.root = Path(root)
        self.paths = [str(p) for p in paths]
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def load_image(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])


def require_files(directory: Path, names: Sequence[str], what: str, hint: str) -> None:
    """Raise FileNotFoundError naming the missing files and how to provide them."""
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise FileNotFoundError(f"{what}: missing {', '.join(missing)} in {directory}. {hint}")


def find_dir(candidates: Sequence[Path], markers: Sequence[str]) -> Path | None:
    """First directory of ``candidates`` that contains every one of ``markers``."""
    for d in candidates:
        if all((d / m).exists() for m in markers):
            return d
    return None


def read_table(path: Path, skip: int = 0, maxsplit: int = -1) -> list[list[str]]:
    """Whitespace-separated rows of a text file, skipping ``skip`` header lines and blanks."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[skip:]
    return [line.split(maxsplit=maxsplit) for line in lines if line.strip()]
