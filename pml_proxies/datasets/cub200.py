"""CUB-200-2011 (Wah et al., 2011): classes 1-100 train, 101-200 test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import (
    ImageFileDataset,
    check_split,
    contiguous_labels,
    default_root,
    find_dir,
    read_table,
)
from .download import download_and_extract

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

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        download: bool = False,
    ):
        check_split(split)
        root = default_root(root)
        directory = find_dir(cub_candidates(root), CUB_FILES)
        if directory is None and download:
            target = root / "cub2011"
            download_and_extract(CUB_URLS, target / "CUB_200_2011.tgz", target, md5=CUB_MD5)
            directory = find_dir(cub_candidates(root), CUB_FILES)
        if directory is None:
            raise FileNotFoundError(
                "CUB-200-2011 not found: put the extracted CUB_200_2011/ folder (images.txt, "
                f"image_class_labels.txt, classes.txt, images/) under {root / 'cub2011'}, "
                "or pass download=True"
            )
        self.directory = directory
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
