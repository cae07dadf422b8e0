"""CUB-200-2011 (Wah et al., 2011): classes 1-100 train, 101-200 test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import (
    ImageFileDataset,
    Resource,
    check_split,
    contiguous_labels,
    find_dir,
    read_table,
    resolve_root,
)

CUB_URLS = ["https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"]
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "images")
CUB_NUM_TRAIN_CLASSES = 100


def cub_candidates(root: Path) -> list[Path]:
    """Accepted locations: powerful-benchmarker's ROOT/cub2011/CUB_200_2011 first."""
    return [
        root / "cub2011" / "CUB_200_2011",
        root / "CUB_200_2011",
        root / "cub200" / "CUB_200_2011",
        root / "cub200",
        root / "cub2011",
        root,
    ]


class CUB200(ImageFileDataset):
    """CUB-200-2011, 200 bird species, 11,788 images; the standard DML split: classes 1-100
    train (5,864 images), classes 101-200 test (5,924 images), from ``images.txt``,
    ``image_class_labels.txt`` and ``classes.txt`` (the official train/test file is ignored).

    Looked for in ``ROOT/cub2011/CUB_200_2011`` (powerful-benchmarker's layout),
    ``ROOT/CUB_200_2011``, ``ROOT/cub200[/CUB_200_2011]``. ``download=True`` fetches
    ``CUB_200_2011.tgz`` (1.1 GB, data.caltech.edu) into ``ROOT/cub2011`` and extracts it there.

    Args:
        split: ``"train"`` or ``"test"``.
        root: data root (default ``$PML_PROXIES_DATA`` or ``~/.cache/pml-proxies/data``).
        transform: callable applied to the RGB PIL image.
        download: download and extract the archive when the files are missing.
    """

    name = "cub200"
    title = "CUB-200-2011"

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        download: bool = False,
    ):
        check_split(split)
        root, origin = resolve_root(root)
        self.directory = directory = self.locate(root, origin, download)
        paths = dict(read_table(directory / "images.txt", maxsplit=1))
        class_of = {i: int(c) for i, c in read_table(directory / "image_class_labels.txt")}
        class_names = {
            int(c): name for c, name in read_table(directory / "classes.txt", maxsplit=1)
        }
        keep = [
            i
            for i in sorted(paths, key=int)
            if (class_of[i] <= CUB_NUM_TRAIN_CLASSES) == (split == "train")
        ]
        raw = [class_of[i] for i in keep]
        labels, class_ids = contiguous_labels(raw)
        super().__init__(
            split,
            root,
            [directory / "images" / paths[i] for i in keep],
            labels,
            [class_names[c] for c in class_ids],
            transform,
        )
        #: original CUB class ids (1..200) of ``classes``
        self.class_ids = np.asarray(class_ids, dtype=np.int64)

    def find(self, root: Path) -> Path | None:
        return find_dir(cub_candidates(root), CUB_FILES)

    def resources(self) -> list[Resource]:
        return [Resource(tuple(CUB_URLS), "CUB_200_2011.tgz", CUB_MD5, extract=True)]

    def download_folder(self, root: Path) -> Path:
        return root / "cub2011"

    def expected_files(self, root: Path) -> str:
        return (
            "put the extracted CUB_200_2011/ folder (images.txt, image_class_labels.txt, "
            f"classes.txt, images/) under {root / 'cub2011'}"
        )
