"""Cars-196 (Krause et al., 2013): classes 1-98 train, 99-196 test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import ImageFileDataset, Resource, check_split, contiguous_labels, find_dir, resolve_root

CARS_IMAGES_URLS = [
    "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",
    "http://imagenet.stanford.edu/internal/car196/car_ims.tgz",
]
CARS_ANNOS_URLS = [
    "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",
    "http://imagenet.stanford.edu/internal/car196/cars_annos.mat",
]
CARS_NUM_TRAIN_CLASSES = 98
#: the all-in-one release used by the DML papers and powerful-benchmarker
CARS_FILES = ("cars_annos.mat", "car_ims")
#: the classification "devkit" release (train + test folders, test labels in a separate file)
CARS_DEVKIT_FILES = (
    "devkit/cars_meta.mat",
    "devkit/cars_train_annos.mat",
    "cars_train",
    "cars_test",
)
CARS_DEVKIT_TEST_ANNOS = ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")


def cars_candidates(root: Path) -> list[Path]:
    """Accepted locations: powerful-benchmarker's ROOT/cars196 first."""
    return [root / "cars196", root / "CARS196", root / "cars", root / "stanford_cars", root]


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    return loadmat(str(path), squeeze_me=True)


def _strings(values) -> list[str]:
    return [str(v) for v in np.atleast_1d(values)]


def _ints(values) -> np.ndarray:
    return np.asarray([int(v) for v in np.atleast_1d(values)], dtype=np.int64)


def read_cars_annos(directory: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, class ids 1..196, class names) from ``cars_annos.mat``."""
    mat = _loadmat(directory / "cars_annos.mat")
    ann = np.atleast_1d(mat["annotations"])
    paths = [directory / p for p in _strings(ann["relative_im_path"])]
    return paths, _ints(ann["class"]), _strings(mat["class_names"])


def read_cars_devkit(directory: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, class ids 1..196, class names) from the devkit release, pooling its
    train and (labelled) test images as the DML protocol does."""
    test_annos = next(directory / t for t in CARS_DEVKIT_TEST_ANNOS if (directory / t).exists())
    names = _strings(_loadmat(directory / "devkit" / "cars_meta.mat")["class_names"])
    paths: list[Path] = []
    classes: list[np.ndarray] = []
    for folder, annos in (
        ("cars_train", directory / "devkit" / "cars_train_annos.mat"),
        ("cars_test", test_annos),
    ):
        ann = np.atleast_1d(_loadmat(annos)["annotations"])
        paths += [directory / folder / f for f in _strings(ann["fname"])]
        classes.append(_ints(ann["class"]))
    return paths, np.concatenate(classes), names


class Cars196(ImageFileDataset):
    """Cars-196 (Stanford Cars), 196 car models, 16,185 images; the standard DML split: classes
    1-98 train (8,054 images), classes 99-196 test (8,131 images).

    Reads the all-in-one release ``cars_annos.mat`` + ``car_ims/`` (powerful-benchmarker's
    ``ROOT/cars196`` layout; also ``ROOT/CARS196``, ``ROOT/cars``, ``ROOT/stanford_cars``), or
    the classification devkit release (``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat``,
    ``cars_test_annos_withlabels.mat``, ``cars_train/``, ``cars_test/``), pooling its train and
    test images. ``download=True`` tries the original ai.stanford.edu files (``car_ims.tgz``,
    1.8 GB, and ``cars_annos.mat``); these have moved several times and are often offline, in
    which case get the two files from a mirror and put them under ``ROOT/cars196``.

    Args:
        split: ``"train"`` or ``"test"``.
        root: data root (default ``$PML_PROXIES_DATA`` or ``~/.cache/pml-proxies/data``).
        transform: callable applied to the RGB PIL image.
        download: download and extract the files when they are missing.
    """

    name = "cars196"
    title = "Cars-196"

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        download: bool = False,
    ):
        check_split(split)
        root, origin = resolve_root(root)
        self.directory, self.layout = directory, layout = self.locate(root, origin, download)
        reader = read_cars_annos if layout == "annos" else read_cars_devkit
        paths, class_ids, names = reader(directory)
        keep = (class_ids <= CARS_NUM_TRAIN_CLASSES) == (split == "train")
        labels, kept_ids = contiguous_labels(class_ids[keep].tolist())
        super().__init__(
            split,
            root,
            [p for p, k in zip(paths, keep) if k],
            labels,
            [names[c - 1] for c in kept_ids],
            transform,
        )
        #: original class ids (1..196) of ``classes``
        self.class_ids = np.asarray(kept_ids, dtype=np.int64)

    def find(self, root: Path) -> tuple[Path, str] | None:
        """``(folder, layout)`` with layout ``"annos"`` (all-in-one release) or ``"devkit"``."""
        candidates = cars_candidates(root)
        d = find_dir(candidates, CARS_FILES)
        if d is not None:
            return d, "annos"
        for d in candidates:
            if find_dir([d], CARS_DEVKIT_FILES) and any(
                (d / t).exists() for t in CARS_DEVKIT_TEST_ANNOS
            ):
                return d, "devkit"
        return None

    def resources(self) -> list[Resource]:
        return [
            Resource(tuple(CARS_ANNOS_URLS), "cars_annos.mat"),
            Resource(tuple(CARS_IMAGES_URLS), "car_ims.tgz", extract=True),
        ]

    def download_folder(self, root: Path) -> Path:
        return root / "cars196"

    def expected_files(self, root: Path) -> str:
        return (
            f"put cars_annos.mat and the extracted car_ims/ folder under {root / 'cars196'} (or "
            "the devkit release: devkit/, cars_train/, cars_test/, "
            "cars_test_annos_withlabels.mat)"
        )

    def missing_hint(self, root: Path, origin: str) -> str:
        return (
            "The original ai.stanford.edu files are often offline: then get car_ims.tgz and "
            f"cars_annos.mat from a mirror and put them under {root / 'cars196'} (the archive "
            "is extracted by download=True / --download)."
        )
