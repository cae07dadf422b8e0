"""In-shop Clothes Retrieval (DeepFashion, Liu et al., 2016): list_eval_partition.txt."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import ImageFileDataset, check_split, contiguous_labels, read_table, resolve_root

INSHOP_SPLITS = ("train", "test", "query", "gallery")
INSHOP_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
INSHOP_PARTITION = "list_eval_partition.txt"


def inshop_candidates(root: Path) -> list[Path]:
    return [
        root / "inshop",
        root / "InShop",
        root / "In-shop",
        root / "In-shop Clothes Retrieval Benchmark",
        root / "deepfashion_inshop",
        root,
    ]


def find_inshop(root: Path) -> tuple[Path, Path] | None:
    """(partition file, folder holding ``img/``) or None. The partition file may be in the
    folder or its ``Eval/``; ``img/`` in the folder or its ``Img/`` (the Google Drive layout)."""
    for d in inshop_candidates(root):
        for part in (d / INSHOP_PARTITION, d / "Eval" / INSHOP_PARTITION):
            if not part.is_file():
                continue
            for base in (d, d / "Img", part.parent):
                if (base / "img").is_dir():
                    return part, base
    return None


def read_partition(path: Path) -> list[list[str]]:
    """Rows ``[image_name, item_id, evaluation_status]``, skipping the count and header lines."""
    rows = read_table(path)
    return [r for r in rows if len(r) == 3 and r[0] != "image_name"]


class InShop(ImageFileDataset):
    """In-shop Clothes Retrieval (DeepFashion), 7,982 items (classes), 52,712 images; the
    standard split of ``list_eval_partition.txt``: train = the 3,997 train items (25,882
    images); test = the 3,985 test items, query (14,218) and gallery (12,612) images together
    (26,830 images). ``is_query`` and ``is_gallery`` (bool per image) mark the query and the
    gallery images: the benchmark evaluates the test split's queries against its gallery, the
    In-Shop protocol (no image is both). ``split="query"`` / ``"gallery"`` give each part alone,
    with the class ids of the whole test set (the same item has the same label in both).

    Looked for in ``ROOT/inshop`` (also ``ROOT/InShop``, ``ROOT/In-shop``,
    ``ROOT/In-shop Clothes Retrieval Benchmark``): ``list_eval_partition.txt`` there or in its
    ``Eval/``, the unzipped ``img/`` there or in its ``Img/``. The data set is distributed only
    through Google Drive (no direct download): ``download=True`` raises with instructions.

    Args:
        split: ``"train"``, ``"test"``, ``"query"`` or ``"gallery"``.
        root: data root (default ``$PML_PROXIES_DATA`` or ``~/.cache/pml-proxies/data``).
        transform: callable applied to the RGB PIL image.
        download: not possible; missing files raise FileNotFoundError with instructions.
    """

    name = "inshop"
    title = "In-shop Clothes Retrieval"

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        download: bool = False,
    ):
        check_split(split, INSHOP_SPLITS)
        root, origin = resolve_root(root)
        partition, self.image_root = self.locate(root, origin, download)
        rows = read_partition(partition)
        wanted = {"train": ("train",), "test": ("query", "gallery")}.get(
            split, ("query", "gallery")
        )
        rows = [r for r in rows if r[2] in wanted]
        _, items = contiguous_labels([r[1] for r in rows])
        index = {item: i for i, item in enumerate(items)}
        if split in ("query", "gallery"):
            rows = [r for r in rows if r[2] == split]
        labels = np.asarray([index[r[1]] for r in rows], dtype=np.int64)
        super().__init__(
            split, root, [self.image_root / r[0] for r in rows], labels, items, transform
        )
        #: True for query images, False for gallery (and train) images
        self.is_query = np.asarray([r[2] == "query" for r in rows], dtype=bool)
        #: True for gallery images, False for query (and train) images
        self.is_gallery = np.asarray([r[2] == "gallery" for r in rows], dtype=bool)

    def find(self, root: Path) -> tuple[Path, Path] | None:
        return find_inshop(root)

    def expected_files(self, root: Path) -> str:
        return (
            f"from {INSHOP_PAGE} open the Google Drive folder 'In-shop Clothes Retrieval "
            f"Benchmark', download Img/img.zip and Eval/{INSHOP_PARTITION}, unzip img.zip into "
            f"{root / 'inshop'} (giving {root / 'inshop' / 'img'}/MEN, .../WOMEN) and put "
            f"{INSHOP_PARTITION} into {root / 'inshop'}"
        )

    def missing_hint(self, root: Path, origin: str) -> str:
        return "It is distributed only through Google Drive."
