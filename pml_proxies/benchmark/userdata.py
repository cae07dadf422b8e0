"""A user's own data (``--dataset csv:PATH``, ``folder:PATH``, ``features:PATH``), read and
checked once per process (:func:`user_data`): the dataframe, image folder or features file
validated, every image decoded (:func:`decode_images`), the train and test classes disjoint
unless allowed, and the input's fingerprint and class split, which become part of the protocol.

The configuration calls it when it is built, so that a bad input is a usage error before any
output folder exists; :mod:`~pml_proxies.benchmark.data` builds the splits from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..datasets.dataframe import RetrievalTable


class UserDataSettings(Protocol):
    """The settings :func:`user_data` reads (those of a
    :class:`~pml_proxies.benchmark.config.BenchmarkConfig`)."""

    @property
    def dataset(self) -> str: ...
    @property
    def root(self) -> str | None: ...
    @property
    def test_fraction(self) -> float: ...
    @property
    def split_seed(self) -> int: ...
    @property
    def skip_corrupt_images(self) -> bool: ...
    @property
    def allow_shared_classes(self) -> bool: ...
    @property
    def image_size_or_default(self) -> int: ...


#: decoded images kept at their own size (when they all share one) up to this many bytes; past
#: it, or when their sizes differ, each is resized once (:func:`decode_images`)
IMAGE_CACHE_BYTES = 1 << 30
#: the side of a resized image, in units of the image side (the evaluation resize of the
#: natural-image transforms: 256 / 224)
RESIZE_RATIO = 256 / 224
#: unreadable files named in an error message
SHOWN_FILES = 3


@dataclass(frozen=True)
class UserData:
    """A user's data, read and checked (:func:`user_data`).

    Attributes:
        fingerprint: :func:`pml_proxies.datasets.fingerprint.data_fingerprint` of the input.
        class_split: what the protocol records of the split: class and image counts of the
            train and test rows, shared classes, skipped images, a hash of the split.
        table: the rows of an image input (unreadable images skipped), else ``None``.
        features_path: the features file, else ``None``.
        skipped: the image files skipped as unreadable (``--skip-corrupt-images``).
        images: the decoded images of ``table`` (uint8 ``(N, S, S)`` or ``(N, S, S, 3)``).
        class_names: the class name of each label of ``table`` (an image folder's folders).
    """

    fingerprint: str
    class_split: dict
    table: RetrievalTable | None = None
    features_path: Path | None = None
    skipped: tuple[str, ...] = ()
    images: np.ndarray | None = None
    class_names: dict | None = None


_USER_DATA: dict[tuple, UserData] = {}


def _user_data_key(config: UserDataSettings) -> tuple:
    """What :func:`user_data` is read again for: the settings, and the size and time of the
    dataframe, features file or folder named (a changed file in the same process)."""
    path = Path(config.dataset.partition(":")[2]).expanduser()
    try:
        stat = path.stat()
        changed: tuple = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        changed = ()
    return (
        config.dataset, config.root, config.test_fraction, config.split_seed,
        config.skip_corrupt_images, config.allow_shared_classes, config.image_size_or_default,
        changed,
    )  # fmt: skip


def user_data(config: UserDataSettings) -> UserData:
    """Read and check ``config``'s own data (``csv:``, ``folder:``, ``features:``) once per
    process: the table or the features file validated, every image decoded (a file that cannot
    be: refused, or skipped with ``skip_corrupt_images``), train and test classes disjoint
    unless ``allow_shared_classes``, and the fingerprint and class split computed.

    Raises:
        ConfigError: naming ``dataset`` (the reader's message: a missing file, a malformed
            dataframe or features file, an unreadable image), ``skip_corrupt_images`` or
            ``allow_shared_classes``.
    """
    key = _user_data_key(config)
    if key not in _USER_DATA:
        _USER_DATA[key] = _read_user_data(config)
    return _USER_DATA[key]


def read_user_data() -> dict[tuple, UserData]:
    """The user data this process has read and decoded (:func:`user_data`), keyed by the
    settings and the input's size and modification time: what :func:`adopt_user_data` takes in
    another process on this machine (the benchmark's ``--jobs`` workers), which then reads and
    decodes none of it again."""
    return dict(_USER_DATA)


def adopt_user_data(entries: dict) -> int:
    """Use ``entries`` (:func:`read_user_data` of another process on this machine) as this
    process's user data; returns how many were taken. An input changed since (another size or
    modification time) has another key, so it is read again; an entry that is not a
    :class:`UserData` is ignored."""
    taken = 0
    for key, value in entries.items():
        if isinstance(key, tuple) and isinstance(value, UserData):
            _USER_DATA.setdefault(key, value)
            taken += 1
    return taken


def _read_user_data(config: UserDataSettings) -> UserData:
    from ..datasets.dataframe import DataframeError
    from .options import ConfigError

    kind, _, path = config.dataset.partition(":")
    try:
        if kind == "features":
            from ..datasets.features import read_features, split_rows
            from ..datasets.fingerprint import file_sha256

            arrays = read_features(path)  # read once here (the data sets read it when loaded)
            for split in ("train", "test"):
                split_rows(arrays, split, path)
            train = arrays["split"] == "train"
            _check_shared(config, arrays["labels"], train)
            record = _class_split(arrays["labels"], train)
            features_path = Path(path).expanduser()
            return UserData(file_sha256(features_path), record, features_path=features_path)
        table = _read_table(config, kind, path)
        fingerprint = _table_fingerprint(table)
        images, bad = decode_images(table, _decoded_side(config))
    except (DataframeError, FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("dataset", str(e)) from None
    skipped = tuple(table.paths[i] for i in bad)
    if skipped and not config.skip_corrupt_images:
        more = f" and {len(skipped) - SHOWN_FILES} more" if len(skipped) > SHOWN_FILES else ""
        raise ConfigError(
            "dataset", f"{len(skipped)} image(s) cannot be decoded: "
            f"{', '.join(skipped[:SHOWN_FILES])}{more}; remove them, or skip them with "
            "--skip-corrupt-images (the report counts them)",
        )  # fmt: skip
    if skipped:
        keep = np.setdiff1d(np.arange(len(table.paths)), bad)
        table, images = _table_rows(table, keep), images[keep]
        for split, name in (("train", "train"), ("validation", "test")):
            if not (table.split == split).any():
                raise ConfigError("skip_corrupt_images", f"no readable image is left in the "
                                  f"{name} rows of {table.source}")  # fmt: skip
    _check_shared(config, table.labels, table.split == "train")
    record = _class_split(table.labels, table.split == "train", skipped=len(skipped))
    names = _folder_class_names(table) if kind == "folder" else None
    return UserData(fingerprint, record, table=table, skipped=skipped, images=images,
                    class_names=names)  # fmt: skip


def _read_table(config: UserDataSettings, kind: str, path: str) -> RetrievalTable:
    from ..datasets.dataframe import read_dataframe, read_image_folder

    if kind == "csv":  # a header that PIL cannot read is checked with the pixels (decode_images)
        return read_dataframe(path, root=config.root, check_images=not config.skip_corrupt_images)
    return read_image_folder(path, test_fraction=config.test_fraction, seed=config.split_seed)


def _table_fingerprint(table: RetrievalTable) -> str:
    from ..datasets.dataframe import RetrievalDataset
    from ..datasets.fingerprint import data_fingerprint

    fingerprint = data_fingerprint(RetrievalDataset(table, "train"))
    assert fingerprint is not None  # a table always has one
    return fingerprint


def _check_shared(config: UserDataSettings, labels: np.ndarray, train: np.ndarray) -> None:
    from .options import ConfigError

    shared = np.intersect1d(labels[train], labels[~train])
    if shared.size and not config.allow_shared_classes:
        raise ConfigError(
            "dataset", f"{shared.size} of the {np.unique(labels[~train]).size} classes of the "
            f"validation rows also have train rows (e.g. label {int(shared[0])}): the benchmark "
            "tests on classes never seen in training. Split the data by class (every label in "
            "one split only), or accept a split by image with --allow-shared-classes (the "
            "report then says that the evaluation is not class-disjoint)",
        )  # fmt: skip


def _class_split(labels: np.ndarray, train: np.ndarray, skipped: int = 0) -> dict:
    """The class split as the protocol records it: counts and a hash of the classes of each
    side."""
    train_classes, test_classes = np.unique(labels[train]), np.unique(labels[~train])
    blob = json.dumps([train_classes.tolist(), test_classes.tolist()]).encode()
    return {
        "train_classes": int(train_classes.size),
        "train_images": int(train.sum()),
        "test_classes": int(test_classes.size),
        "test_images": int((~train).sum()),
        "shared_classes": int(np.intersect1d(train_classes, test_classes).size),
        "skipped_images": int(skipped),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


def _table_rows(table: RetrievalTable, keep: np.ndarray) -> RetrievalTable:
    """``table`` with rows ``keep`` only."""
    return replace(
        table,
        labels=table.labels[keep],
        paths=[table.paths[i] for i in keep],
        split=table.split[keep],
        is_query=table.is_query[keep],
        is_gallery=table.is_gallery[keep],
        categories=None if table.categories is None else [table.categories[i] for i in keep],
        boxes=None if table.boxes is None else table.boxes[keep],
        lines=table.lines[keep],
    )


def _folder_class_names(table: RetrievalTable) -> dict:
    """label -> class folder name of an image folder's table (``PATH[/train|/test]/<class>/``)."""
    root = Path(table.source)
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    names = {}
    for label, path in zip(table.labels.tolist(), table.paths):
        parts = Path(path).relative_to(root).parts
        names[label] = parts[1] if split_layout else parts[0]
    return names


def _decoded_side(config: UserDataSettings) -> int:
    """The side of a resized image: the evaluation resize of the natural-image transforms."""
    return int(round(config.image_size_or_default * RESIZE_RATIO))


def decode_images(table: RetrievalTable, side: int) -> tuple[np.ndarray, list[int]]:
    """Every image of ``table`` decoded once (EXIF rotation, box crop, 8-bit RGB:
    :func:`~pml_proxies.datasets.dataframe.load_image_file`) into one uint8 array: at their own
    size when they all share one and fit in :data:`IMAGE_CACHE_BYTES`, else each resized so
    that its shorter side is ``side`` and centre-cropped to ``side x side``; ``(N, H, W)`` when
    every image is grey (equal channels), else ``(N, H, W, 3)``.

    Returns:
        ``(images, bad)``: the array (a zero image in the place of each unreadable one) and
        the rows of the images that could not be decoded.
    """
    from ..datasets.dataframe import load_image_file

    images: list[np.ndarray] = []
    bad: list[int] = []
    size: tuple[int, ...] | None = None
    resized = False
    for i, path in enumerate(table.paths):
        box = None
        if table.boxes is not None and table.boxes[i, 0] >= 0:
            box = table.boxes[i]
        try:
            image = load_image_file(path, box)
        except OSError:
            bad.append(i)
            images.append(np.zeros((0, 0), np.uint8))
            continue
        array = _compact(np.asarray(image))
        size = array.shape[:2] if size is None else size
        too_big = (len(table.paths) * array.shape[0] * array.shape[1] * 3) > IMAGE_CACHE_BYTES
        if not resized and (array.shape[:2] != size or too_big):
            resized = True
            images = [_square(a, side) if a.size else a for a in images]
        images.append(_square(array, side) if resized else array)
    good = [a for a in images if a.size]
    if not good:
        return np.zeros((len(images), side, side), np.uint8), bad
    colour = any(a.ndim == 3 for a in good)
    shape = good[0].shape[:2] + ((3,) if colour else ())
    out = np.zeros((len(images), *shape), dtype=np.uint8)
    for i, a in enumerate(images):
        if a.size:
            out[i] = a[..., None] if colour and a.ndim == 2 else a
    return out, bad


def _compact(rgb: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` image as ``(H, W)`` when its three channels are equal (grey)."""
    grey = rgb[..., 0]
    if np.array_equal(grey, rgb[..., 1]) and np.array_equal(grey, rgb[..., 2]):
        return np.ascontiguousarray(grey)
    return rgb


def _square(array: np.ndarray, side: int) -> np.ndarray:
    """The shorter side resized to ``side`` (PIL bilinear, antialiased), then the centre
    ``side x side`` square."""
    from PIL import Image

    h, w = array.shape[:2]
    scale = side / min(h, w)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    image = np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR))
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return np.ascontiguousarray(image[top : top + side, left : left + side])
