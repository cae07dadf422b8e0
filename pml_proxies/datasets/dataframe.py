"""A user's own images as a retrieval dataframe: open-metric-learning's (OML 4.x) CSV format,
and image folders read into the same table.

The dataframe, one row per image:

========================  =====================================================================
column                    meaning
========================  =====================================================================
``label``                 the image's class, an integer
``path``                  the image file: absolute, or relative to ``root`` when given, else to
                          the CSV's folder
``split``                 ``train`` or ``validation``
``is_query``              empty on train rows; ``True`` / ``False`` on validation rows
``is_gallery``            empty on train rows; ``True`` / ``False`` on validation rows (at least
                          one of the two true)
``category`` (optional)   a group of classes (e.g. a product type), for per-category results
``x_1, x_2, y_1, y_2``    (optional, all four or none) a box to crop before the transforms, in
                          integer pixels, ``0 <= x_1 < x_2 <= width``, ``0 <= y_1 < y_2 <=
                          height``; empty for an image without a box
========================  =====================================================================

Other columns are ignored. :func:`read_dataframe` checks everything OML's
``check_retrieval_dataframe_format`` checks, and more (each problem a :class:`DataframeError`
naming the column, the first offending lines and how many there are): a missing column, a
non-integer label, an unknown split, a query/gallery flag on a train row or a non-boolean one on
a validation row, a validation row that is neither query nor gallery, a query label absent from
the gallery, a missing or unreadable image, a bad box.

An image folder (torchvision's ``ImageFolder`` layout) becomes the same table
(:func:`read_image_folder`): ``PATH/train/<class>/...`` and ``PATH/test/<class>/...``, or
``PATH/<class>/...`` split by classes with a seeded split (a ``test_fraction`` of the classes,
default one half as in the CUB-200 / Cars-196 convention); every test image is both query and
gallery.
"""

from __future__ import annotations

import csv
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..functional.validation import check_bool, check_int, check_real
from .base import BaseDataset, check_split, contiguous_labels

REQUIRED_COLUMNS = ("label", "path", "split", "is_query", "is_gallery")
BOX_COLUMNS = ("x_1", "x_2", "y_1", "y_2")
DATAFRAME_SPLITS = ("train", "validation")
#: the dataframe's split of each dataset split (``get_dataset(..., split="test")`` = validation)
SPLIT_ROWS = {"train": "train", "test": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_TRUE, _FALSE = ("true", "1", "1.0", "yes"), ("false", "0", "0.0", "no")
#: offending lines shown in an error message
SHOWN_LINES = 5


class DataframeError(ValueError):
    """A retrieval dataframe that does not follow the format: ``column`` and the CSV ``lines``
    (1-based, the header is line 1) of every offending row."""

    def __init__(self, source: str, column: str, problem: str, lines: Sequence[int] = ()):
        self.source, self.column, self.lines = source, column, list(lines)
        shown = ", ".join(map(str, self.lines[:SHOWN_LINES]))
        more = f", ... ({len(self.lines)} rows in all)" if len(self.lines) > SHOWN_LINES else ""
        where = f" (line {shown}{more})" if self.lines else ""
        super().__init__(f"{source}: column {column!r}: {problem}{where}")


@dataclass(frozen=True)
class RetrievalTable:
    """A validated retrieval dataframe: one entry per row, in the file's order.

    ``labels`` are the file's integers; ``paths`` absolute; ``split`` ``train`` / ``validation``;
    ``is_query`` / ``is_gallery`` false on train rows; ``categories`` ``None`` without a
    ``category`` column; ``boxes`` an N x 4 int64 array ``(x_1, x_2, y_1, y_2)`` with -1 for
    rows without a box, or ``None`` without box columns; ``lines`` each row's CSV line.
    """

    source: str
    labels: np.ndarray
    paths: list[str]
    split: np.ndarray
    is_query: np.ndarray
    is_gallery: np.ndarray
    categories: list[str] | None
    boxes: np.ndarray | None
    lines: np.ndarray

    def rows(self, split: str) -> np.ndarray:
        """Indices of the rows of dataset split ``split`` (``train`` / ``test``)."""
        return np.flatnonzero(self.split == SPLIT_ROWS[check_split(split)])

    def shared_labels(self) -> np.ndarray:
        """Labels that occur in both the train and the validation rows (sorted): a split by
        image rather than by class, which a class-disjoint evaluation cannot use."""
        train = self.labels[self.split == "train"]
        return np.intersect1d(train, self.labels[self.split == "validation"])


# ------------------------------------------------------------------ reading a dataframe
def read_dataframe(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    check_images: bool = True,
) -> RetrievalTable:
    """Read and validate an OML retrieval dataframe (module docstring) from a CSV file.

    Args:
        path: the CSV file (comma-separated, a header line).
        root: the folder relative ``path`` entries start from; default: the CSV's folder.
        check_images: also open every image's header (cheap: no pixels are decoded) and check
            that it is a readable image and that its box lies inside it.

    Raises:
        FileNotFoundError: the CSV does not exist.
        DataframeError: the first problem found (module docstring), naming the column and lines.
    """
    check_bool("check_images", check_images)
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"dataframe {csv_path} does not exist")
    source = str(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataframeError(
                source,
                missing[0],
                f"missing; the header has {header} and needs {list(REQUIRED_COLUMNS)}",
            )
        records = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not records:
        raise DataframeError(source, "label", "the dataframe has no rows")
    lines = np.arange(2, len(records) + 2)
    column = lambda name: [r.get(name, "") for r in records]  # noqa: E731

    labels = _integers(source, "label", column("label"), lines)
    split = np.array(column("split"), dtype=object)
    _refuse(source, "split", ~np.isin(split, DATAFRAME_SPLITS), lines,
            f"must be one of {list(DATAFRAME_SPLITS)}")  # fmt: skip
    train = split == "train"
    flags = {}
    for name in ("is_query", "is_gallery"):
        raw = np.array([v.lower() for v in column(name)], dtype=object)
        _refuse(source, name, train & (raw != ""), lines, "must be empty on train rows")
        valid = np.isin(raw, _TRUE + _FALSE)
        _refuse(source, name, ~train & ~valid, lines,
                "must be True or False on validation rows")  # fmt: skip
        flags[name] = ~train & np.isin(raw, _TRUE)
    is_query, is_gallery = flags["is_query"], flags["is_gallery"]
    _refuse(source, "is_query", ~train & ~is_query & ~is_gallery, lines,
            "a validation row is neither query nor gallery (is_query and is_gallery both False)")  # fmt: skip
    lone = is_query & ~np.isin(labels, labels[is_gallery])
    _refuse(source, "label", lone, lines, "a query's label has no gallery row")

    base = Path(root).expanduser() if root is not None else csv_path.parent
    raw_paths = column("path")
    _refuse(source, "path", np.array([p == "" for p in raw_paths]), lines, "is empty")
    paths = [str(Path(p) if os.path.isabs(p) else base / p) for p in raw_paths]
    _refuse(source, "path", np.array([not os.path.isfile(p) for p in paths]), lines,
            f"no such file (relative paths start from {base})")  # fmt: skip

    boxes = _boxes(source, header, records, lines)
    categories = column("category") if "category" in header else None
    if categories is not None:
        _refuse(source, "category", np.array([c == "" for c in categories]), lines, "is empty")
    if check_images:
        _check_images(source, paths, boxes, lines)
    return RetrievalTable(
        source, labels, paths, split.astype(str), is_query, is_gallery, categories, boxes, lines
    )


def _refuse(source: str, column: str, bad: np.ndarray, lines: np.ndarray, problem: str) -> None:
    if bad.any():
        raise DataframeError(source, column, problem, lines[bad].tolist())


def _integers(source: str, column: str, values: list[str], lines: np.ndarray) -> np.ndarray:
    """The column as int64; an empty or non-integer entry (``3.5``, ``cat``) is refused, an
    integral float spelling (``3.0``) is accepted."""
    out = np.zeros(len(values), dtype=np.int64)
    bad = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        try:
            number = float(v)
            bad[i] = not number.is_integer()
            out[i] = int(number) if not bad[i] else 0
        except (ValueError, OverflowError):
            bad[i] = True
    _refuse(source, column, bad, lines, "must be an integer")
    return out


def _boxes(source: str, header: list[str], records: list[dict], lines: np.ndarray):
    present = [c for c in BOX_COLUMNS if c in header]
    if not present:
        return None
    if len(present) < 4:
        missing = [c for c in BOX_COLUMNS if c not in header][0]
        raise DataframeError(source, missing, f"missing: a box needs all of {list(BOX_COLUMNS)}")
    raw = np.array([[r[c] for c in BOX_COLUMNS] for r in records], dtype=object)
    empty = raw == ""
    _refuse(source, BOX_COLUMNS[0], empty.any(1) & ~empty.all(1), lines,
            f"a box needs all four of {list(BOX_COLUMNS)} or none")  # fmt: skip
    boxes = np.full((len(records), 4), -1, dtype=np.int64)
    has = ~empty.all(1)
    for j, name in enumerate(BOX_COLUMNS):
        boxes[has, j] = _integers(source, name, list(raw[has, j]), lines[has])
    x1, x2, y1, y2 = boxes.T
    _refuse(source, "x_1", has & ((x1 < 0) | (y1 < 0)), lines, "box corners must be >= 0")
    _refuse(source, "x_2", has & (x1 >= x2), lines, "a box needs x_1 < x_2")
    _refuse(source, "y_2", has & (y1 >= y2), lines, "a box needs y_1 < y_2")
    return boxes


def _check_images(source: str, paths: list[str], boxes, lines: np.ndarray) -> None:
    unreadable, outside = np.zeros(len(paths), bool), np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        try:
            with _open(p) as im:
                width, height = _oriented_size(im)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
            unreadable[i] = True
            continue
        if boxes is not None and boxes[i, 0] >= 0:
            outside[i] = boxes[i, 1] > width or boxes[i, 3] > height
    _refuse(source, "path", unreadable, lines, "not a readable image")
    _refuse(source, "x_2", outside, lines, "the box reaches outside the image")


# ------------------------------------------------------------------ reading an image folder
def read_image_folder(
    path: str | os.PathLike, test_fraction: float = 0.5, seed: int = 0
) -> RetrievalTable:
    """An image folder as a retrieval table (module docstring): ``PATH/train/<class>/...`` +
    ``PATH/test/<class>/...``, else ``PATH/<class>/...`` with ``round(test_fraction * C)``
    classes (at least one, at most C - 1) drawn with ``random.Random(seed)`` for the test split.
    Files are sorted by name; files whose suffix is not an image's (``IMAGE_SUFFIXES``) are
    skipped; class names are the folders' names, labels their index in sorted order.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: no class folder, an empty class folder, fewer than 2 classes to split, or a
            bad ``test_fraction``.
    """
    test_fraction = check_real(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    seed = check_int("seed", seed)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        parts = {s: _class_files(folder / s) for s in ("train", "test")}
        split_of = {("train", c): "train" for c in parts["train"]}
        split_of.update({("test", c): "validation" for c in parts["test"]})
        entries = [(s, c, f) for s in ("train", "test") for c, fs in parts[s].items() for f in fs]
    else:
        classes = _class_files(folder)
        if len(classes) < 2:
            raise ValueError(f"{folder}: a class split needs at least 2 class folders")
        names = sorted(classes)
        n_test = min(max(round(test_fraction * len(names)), 1), len(names) - 1)
        test = set(random.Random(seed).sample(names, n_test))
        split_of = {("", c): "validation" if c in test else "train" for c in names}
        entries = [("", c, f) for c in names for f in classes[c]]
    class_names = sorted({c for _, c, _ in entries})
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([index[c] for _, c, _ in entries], dtype=np.int64)
    split = np.array([split_of[(s, c)] for s, c, _ in entries])
    test_rows = split == "validation"
    return RetrievalTable(
        str(folder), labels, [str(f) for _, _, f in entries], split, test_rows.copy(),
        test_rows.copy(), None, None, np.zeros(len(entries), dtype=np.int64),
    )  # fmt: skip


def _class_files(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {d} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        classes[d.name] = files
    if not classes:
        raise ValueError(f"{folder} holds no class folder (expected {folder}/<class>/<image>)")
    return classes


# ------------------------------------------------------------------ loading an image
def _open(path: str) -> Image.Image:
    """PIL's lazy open, allowing very large images (a user's own files, not untrusted input:
    PIL's decompression-bomb limit would refuse e.g. a 200-megapixel scan)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """``(width, height)`` after EXIF rotation (orientations 5-8 swap the sides)."""
    orientation = im.getexif().get(0x0112, 1)
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size


def load_image_file(path: str, box: Sequence[int] | None = None) -> Image.Image:
    """An image file as an 8-bit RGB PIL image: EXIF rotation applied; greyscale, palette,
    CMYK and 16-bit files converted; transparency composed over white; then cropped to
    ``box = (x_1, x_2, y_1, y_2)`` when given.

    Raises:
        OSError: the file is missing or not a readable image (the message names the file).
    """
    try:
        with _open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    if box is not None:
        x1, x2, y1, y2 = (int(v) for v in box)
        rgb = rgb.crop((x1, y1, x2, y2))
    return rgb


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16 / 32-bit greyscale: scale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# ------------------------------------------------------------------ the data set
class RetrievalDataset(BaseDataset):
    """One split of a :class:`RetrievalTable` (a dataframe or an image folder) as a
    :class:`~pml_proxies.datasets.base.BaseDataset`: ``split="train"`` the train rows,
    ``split="test"`` the validation rows.

    ``labels`` are contiguous ids within the split (``classes[c]`` the file's label, or the
    folder's class name); ``is_query`` / ``is_gallery`` and ``categories`` (``None`` without a
    ``category`` column) are per image; ``rows`` the table rows of the split's images.

    Args:
        table: the validated table (:func:`read_dataframe` / :func:`read_image_folder`).
        split: ``"train"`` or ``"test"``.
        transform: applied to the RGB PIL image (after the box crop).
        class_names: the names of the table's labels (an image folder's class folders);
            default: the labels as text.
    """

    default_image_size = 224
    default_channels = 3

    def __init__(
        self,
        table: RetrievalTable,
        split: str,
        transform: Callable | None = None,
        class_names: Sequence[str] | None = None,
    ):
        split = check_split(split)
        self.name, self.title, self.table = "custom", table.source, table
        self.rows = table.rows(split)
        if len(self.rows) == 0:
            raise ValueError(f"{table.source}: no {SPLIT_ROWS[split]} rows for split {split!r}")
        labels, keys = contiguous_labels(table.labels[self.rows].tolist())
        names = [str(class_names[k]) if class_names else str(k) for k in keys]
        super().__init__(split, labels, names, transform)
        self.paths = [table.paths[i] for i in self.rows]
        self.is_query = table.is_query[self.rows]
        self.is_gallery = table.is_gallery[self.rows]
        self.categories = (
            [table.categories[i] for i in self.rows] if table.categories is not None else None
        )

    def load_image(self, index: int) -> Image.Image:
        box = None
        if self.table.boxes is not None and self.table.boxes[self.rows[index], 0] >= 0:
            box = self.table.boxes[self.rows[index]]
        return load_image_file(self.paths[index], box)
