"""Stanford Online Products (Song et al., 2016): Ebay_train.txt / Ebay_test.txt."""

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

SOP_URLS = [
    "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
    "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
]
SOP_MD5 = "7f73d41a2f44250d4779881525aea32e"
SOP_FILES = ("Ebay_train.txt", "Ebay_test.txt")


def sop_candidates(root: Path) -> list[Path]:
    """Accepted locations: powerful-benchmarker's ROOT/Stanford_Online_Products first."""
    return [root / "Stanford_Online_Products", root / "sop", root / "SOP", root]


class StanfordOnlineProducts(ImageFileDataset):
    """Stanford Online Products, 22,634 products (classes) in 12 super-classes, 120,053 images;
    the standard split of the authors' files: ``Ebay_train.txt`` (11,318 classes, 59,551 images)
    and ``Ebay_test.txt`` (11,316 classes, 60,502 images).

    Class names are ``"<super class>/<class_id>"`` (e.g. ``"bicycle/1"``); ``super_labels``
    (int64, 0..11, shared by both splits) and ``super_classes`` give the super-classes.
    Looked for in ``ROOT/Stanford_Online_Products`` (powerful-benchmarker's layout),
    ``ROOT/sop``, ``ROOT/SOP``. ``download=True`` fetches ``Stanford_Online_Products.zip``
    (2.9 GB, Stanford FTP) into ``ROOT`` and extracts it there.

    Args:
        split: ``"train"`` or ``"test"``.
        root: data root (default ``$PML_PROXIES_DATA`` or ``~/.cache/pml-proxies/data``).
        transform: callable applied to the RGB PIL image.
        download: download and extract the archive when the files are missing.
    """

    name = "sop"
    title = "Stanford Online Products"

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
        rows = read_table(directory / f"Ebay_{split}.txt", skip=1)
        class_ids = [int(r[1]) for r in rows]
        super_ids = np.asarray([int(r[2]) for r in rows], dtype=np.int64)
        rel_paths = [r[3] for r in rows]
        labels, kept_ids = contiguous_labels(class_ids)
        super_name: dict[int, str] = {}
        for s, p in zip(super_ids.tolist(), rel_paths):
            super_name.setdefault(s, p.split("/", 1)[0].removesuffix("_final"))
        first: dict[int, int] = {}
        for c, s in zip(class_ids, super_ids.tolist()):
            first.setdefault(c, s)
        super().__init__(
            split,
            root,
            [directory / p for p in rel_paths],
            labels,
            [f"{super_name[first[c]]}/{c}" for c in kept_ids],
            transform,
        )
        #: original class ids of ``classes``
        self.class_ids = np.asarray(kept_ids, dtype=np.int64)
        #: super-class (product category) of every image, 0-based: super_class_id - 1
        self.super_labels = super_ids - 1
        #: names of the super-classes (index = super label), from the image folders
        n_super = int(super_ids.max()) if len(super_ids) else 0
        self.super_classes = [super_name.get(s + 1, str(s + 1)) for s in range(n_super)]

    def find(self, root: Path) -> Path | None:
        return find_dir(sop_candidates(root), SOP_FILES)

    def resources(self) -> list[Resource]:
        return [Resource(tuple(SOP_URLS), "Stanford_Online_Products.zip", SOP_MD5, extract=True)]

    def download_folder(self, root: Path) -> Path:
        return root

    def expected_files(self, root: Path) -> str:
        return (
            "put the extracted Stanford_Online_Products/ folder (Ebay_train.txt, Ebay_test.txt, "
            f"<class>_final/ image folders) under {root}"
        )
