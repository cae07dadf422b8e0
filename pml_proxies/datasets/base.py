"""Common base class of the benchmark data sets: data root, split checks, and the one
locate / download / "not found" implementation every file-backed data set uses."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..functional.validation import check_bool, check_choice
from .download import download_first, extract_archive, new_dirs

ENV_ROOT = "PML_PROXIES_DATA"
CACHE_ROOT = "~/.cache/pml-proxies/data"
SPLITS = ("train", "test")

#: where a data root came from (:func:`resolve_root`), as the error messages explain it
ROOT_ORIGINS = {
    "argument": "the folder given by root= in Python / --root on the CLI",
    "environment": f"the folder of ${ENV_ROOT}",
    "cache": f"the default data root: neither root= / --root nor ${ENV_ROOT} was given",
}


def resolve_root(root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``(data root, origin)``: ``root`` if given (origin ``"argument"``), else
    ``$PML_PROXIES_DATA`` (``"environment"``), else ``~/.cache/pml-proxies/data`` (``"cache"``)."""
    if root is not None:
        return Path(root).expanduser(), "argument"
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser(), "environment"
    return Path(CACHE_ROOT).expanduser(), "cache"


def default_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$PML_PROXIES_DATA``, else ``~/.cache/pml-proxies/data``."""
    return resolve_root(root)[0]


@dataclass(frozen=True)
class Resource:
    """One file of a data set's download: tried from ``urls`` in order, saved as ``filename`` in
    the data set's download folder (and kept there), checked against ``md5`` when known, and
    extracted into that folder when ``extract``."""

    urls: tuple[str, ...]
    filename: str
    md5: str | None = None
    extract: bool = False


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    return check_choice("split", split, allowed)


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

    # ------------------------------------------------------------- locate / download / raise
    # File-backed data sets implement ``find`` (and ``resources`` where a download exists,
    # ``download_folder``, ``expected_files``, ``missing_hint``) and call ``locate``.

    #: human-readable name used in messages
    title: str = ""

    def find(self, root: Path) -> Any:
        """Where the data set's files are under ``root`` (a subclass-specific value, e.g. the
        folder holding them), or ``None`` when they are not there."""
        raise NotImplementedError

    def resources(self) -> list[Resource]:
        """The files ``download=True`` fetches, in order; empty when no download is possible."""
        return []

    def download_folder(self, root: Path) -> Path:
        """The folder the resources are downloaded (and extracted) into."""
        return root / self.name

    def expected_files(self, root: Path) -> str:
        """What to put where, as a sentence without its full stop ("put ... under ...")."""
        raise NotImplementedError

    def missing_hint(self, root: Path, origin: str) -> str:
        """Extra advice appended to the "not found" message (e.g. mirrors, other variants)."""
        return ""

    def locate(self, root: Path, origin: str, download: bool, progress: bool = True) -> Any:
        """``find(root)``; if absent and ``download``, fetch :meth:`resources` into
        :meth:`download_folder` and look again; else raise FileNotFoundError saying what to put
        where and naming both the Python keywords and the CLI options. A failed download raises
        and leaves no partial file and no folder it created behind."""
        check_bool("download", download)
        found = self.find(root)
        if found is not None:
            return found
        resources = self.resources()
        if download and resources:
            folder = self.download_folder(root)
            with new_dirs(folder):
                for r in resources:
                    path = download_first(r.urls, folder / r.filename, md5=r.md5, progress=progress)
                    if r.extract:
                        extract_archive(path, folder, progress=progress)
            found = self.find(root)
            if found is None:
                raise FileNotFoundError(
                    f"{self.title}: downloaded {', '.join(r.filename for r in resources)} into "
                    f"{folder}, but the expected files are still missing there: "
                    f"{self.expected_files(root)}"
                )
            return found
        raise FileNotFoundError(self.missing_message(root, origin))

    def missing_message(self, root: Path, origin: str) -> str:
        """The FileNotFoundError text of :meth:`locate` (shown to Python and CLI users alike)."""
        expected = self.expected_files(root)
        lines = [
            f"{self.title} not found under {root} ({ROOT_ORIGINS.get(origin, origin)}).",
            f"{expected[:1].upper()}{expected[1:]}.",
            f"If it is elsewhere, point to its data root: root=DIR in Python, --root DIR on the "
            f"CLI, or the environment variable ${ENV_ROOT}=DIR.",
        ]
        resources = self.resources()
        present = [
            self.download_folder(root) / r.filename
            for r in resources
            if (self.download_folder(root) / r.filename).is_file()
        ]
        if present:
            lines.append(
                f"Found {', '.join(map(str, present))}: download=True in Python / --download on "
                "the CLI checks it (MD5 where known), extracts it where needed and downloads "
                "only what is missing."
            )
        elif resources:
            lines.append(
                "Or let the package fetch it: download=True in Python, --download on the CLI."
            )
        else:
            lines.append(
                f"{self.title} cannot be downloaded automatically (download=True / --download "
                "cannot fetch it)."
            )
        hint = self.missing_hint(root, origin)
        if hint:
            lines.append(hint)
        return " ".join(lines)

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
