"""Omniglot (Lake et al., Science 2015) read straight from the authors' zip files."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.resources
import io
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..functional.validation import check_bool, check_choice
from .base import BaseDataset, Resource, check_split, contiguous_labels, resolve_root
from .download import ARCHIVE_READ_ERRORS, CorruptArchiveError

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}"
OMNIGLOT_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
    "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd",
}
OMNIGLOT_VARIANTS = ("auto", "full", "small")
#: zip files of each variant: the standard background/evaluation split and the two small sets
OMNIGLOT_VARIANT_ZIPS = {
    "full": ("images_background.zip", "images_evaluation.zip"),
    "small": ("images_background_small1.zip", "images_background_small2.zip"),
}
#: alphabet-disjoint split of the union of the two small background sets (8 alphabets)
OMNIGLOT_SMALL_ALPHABETS = {
    "train": ("Balinese", "Early_Aramaic", "Korean", "Sanskrit"),  # 128 classes, 2,560 images
    "test": ("Greek", "Japanese_(katakana)", "Latin", "Tagalog"),  # 114 classes, 2,280 images
}
#: package folder of the bundled small zips (with their licence and attribution)
BUNDLED_DATA = "data"

# reading one PNG of a zip: the zip's errors and PIL's decoding errors (OSErrors)
_MEMBER_READ_ERRORS: tuple[type[Exception], ...] = (*ARCHIVE_READ_ERRORS, OSError)

# decoded images shared by all Omniglot objects of this process, keyed by the zips' identity
_CACHE: dict[tuple, tuple[np.ndarray, list[str]]] = {}
# keeps the bundled zips on disk while the process runs when the package itself is zipped
_RESOURCE_FILES = contextlib.ExitStack()
atexit.register(_RESOURCE_FILES.close)


@functools.cache
def bundled_omniglot_zips() -> tuple[Path, ...]:
    """Paths of the two small background zips shipped with the package (package data in
    ``pml_proxies/datasets/data/``; copied to a temporary file only if the package is zipped)."""
    data = importlib.resources.files(__package__).joinpath(BUNDLED_DATA)
    return tuple(
        _RESOURCE_FILES.enter_context(importlib.resources.as_file(data.joinpath(z)))
        for z in OMNIGLOT_VARIANT_ZIPS["small"]
    )


def decoded_images() -> dict[tuple, tuple[np.ndarray, list[str]]]:
    """The Omniglot splits this process has decoded, keyed by variant, split and each zip's path,
    size and modification time: what :func:`adopt_decoded_images` takes in another process on
    this machine (the benchmark's ``--jobs`` workers), which then decodes none of them again."""
    return dict(_CACHE)


def adopt_decoded_images(entries: dict) -> int:
    """Use ``entries`` (:func:`decoded_images` of another process on this machine) as this
    process's decoded images; returns how many were taken. A split whose zips changed since
    (another size or modification time) has another key, so it is decoded again; an entry that
    is not a ``(uint8 images (N, H, W), N class names)`` pair is ignored."""
    taken = 0
    for key, value in entries.items():
        if not (isinstance(key, tuple) and isinstance(value, tuple) and len(value) == 2):
            continue
        images, names = value
        if (
            isinstance(images, np.ndarray)
            and images.dtype == np.uint8
            and images.ndim == 3
            and isinstance(names, list)
            and len(names) == len(images)
            and all(isinstance(n, str) for n in names)
        ):
            _CACHE.setdefault(key, (images, names))
            taken += 1
    return taken


def _zip_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _candidate_dirs(root: Path) -> list[Path]:
    return [root / "omniglot", root / "Omniglot", root]


def find_omniglot_dir(root: Path, variant: str) -> Path | None:
    """First of ROOT/omniglot, ROOT/Omniglot, ROOT holding both zips of ``variant``."""
    for d in _candidate_dirs(root):
        if all((d / z).is_file() for z in OMNIGLOT_VARIANT_ZIPS[variant]):
            return d
    return None


def read_omniglot_zips(
    zips: Sequence[Path], keep: Callable[[str], bool] = lambda alphabet: True, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Decode every ``<set>/<Alphabet>/<character>/<file>.png`` of ``zips`` whose alphabet passes
    ``keep``, without extracting anything. Members repeated across zips (same alphabet, character
    and file name: Greek and Latin are in both small sets) are read once.

    Returns uint8 images (N, H, W) (255 = white background) and class names
    ``"<Alphabet>/<character>"``, in sorted (alphabet, character, file) order. A zip that cannot
    be read (not a zip, truncated, CRC error, undecodable PNG) raises CorruptArchiveError naming
    it.
    """
    entries: dict[tuple[str, str, str], tuple[int, str]] = {}
    handles: list[zipfile.ZipFile] = []
    try:
        for zi, path in enumerate(zips):
            try:
                handles.append(zipfile.ZipFile(path))
            except ARCHIVE_READ_ERRORS as e:
                raise CorruptArchiveError(path, f"not a readable Omniglot zip ({e})") from e
            for name in handles[zi].namelist():
                parts = name.split("/")
                if len(parts) != 4 or not parts[3].lower().endswith(".png"):
                    continue
                key = (parts[1], parts[2], parts[3])
                if keep(parts[1]) and key not in entries:
                    entries[key] = (zi, name)
        if not entries:
            raise ValueError(
                f"no Omniglot PNG files (of the split's alphabets) found in {[str(z) for z in zips]}"
            )
        keys = sorted(entries)
        images = np.empty((0, 0, 0), dtype=np.uint8)
        for i, key in enumerate(tqdm(keys, desc="decode Omniglot", disable=not progress)):
            zi, name = entries[key]
            try:
                with Image.open(io.BytesIO(handles[zi].read(name))) as im:
                    arr = np.asarray(im.convert("L"))
            except _MEMBER_READ_ERRORS as e:
                raise CorruptArchiveError(zips[zi], f"damaged member {name} ({e})") from e
            if i == 0:
                images = np.empty((len(keys), *arr.shape), dtype=np.uint8)
            if arr.shape != images.shape[1:]:
                raise ValueError(f"{name} has shape {arr.shape}, expected {images.shape[1:]}")
            images[i] = arr
    finally:
        for h in handles:
            h.close()
    return images, [f"{a}/{c}" for a, c, _ in keys]


class Omniglot(BaseDataset):
    """Omniglot handwritten characters as a class- and alphabet-disjoint DML set, read from the
    authors' zip files (no extraction; PNGs decoded once with PIL and cached in memory).

    Which zips are read (``variant``):

    * ``"full"``: ``images_background.zip`` = train (30 alphabets, 964 classes, 19,280 images),
      ``images_evaluation.zip`` = test (20 alphabets, 659 classes, 13,180 images): the standard
      background/evaluation split.
    * ``"small"``: ``images_background_small1.zip`` + ``images_background_small2.zip``
      (union of 8 alphabets, Greek and Latin de-duplicated): train = Balinese, Early_Aramaic,
      Korean, Sanskrit (128 classes, 2,560 images); test = Greek, Japanese_(katakana), Latin,
      Tagalog (114 classes, 2,280 images).
    * ``"auto"`` (default): ``"full"`` when both full zips are present, else ``"small"``.

    Where the zips come from, first match wins:

    1. ``root`` given: ``ROOT/omniglot``, ``ROOT/Omniglot`` or ``ROOT``; with ``download=True``
       the missing zips are downloaded into ``ROOT/omniglot``; else FileNotFoundError (an
       explicit root never falls back to the bundled files).
    2. no ``root``: the same folders under ``$PML_PROXIES_DATA`` or else
       ``~/.cache/pml-proxies/data`` (with ``download=True``: downloaded there).
    3. no ``root``, ``download=False``, nothing found, ``variant`` ``"auto"`` or ``"small"``: the
       small zips bundled with the package (offline, no download).

    ``files`` holds the zips this split was read from, ``source`` where they were found
    (``"argument"``, ``"environment"``, ``"cache"`` or ``"bundled"``), ``variant`` the variant
    used. Images are 105x105 greyscale PIL images, black strokes on white; class names are
    ``"<Alphabet>/<character>"``, ids in sorted name order.

    Args:
        split: ``"train"`` or ``"test"``.
        root: data root (default ``$PML_PROXIES_DATA`` or ``~/.cache/pml-proxies/data``, then the
            bundled small set).
        transform: callable applied to the PIL image.
        download: download the missing zips of the variant (from the authors' GitHub; the full
            zips for ``"auto"``) into ``ROOT/omniglot``.
        variant: ``"auto"``, ``"full"`` or ``"small"``.
        progress: show tqdm bars while downloading and decoding.
    """

    name = "omniglot"
    title = "Omniglot"
    default_image_size = 64
    default_channels = 1

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        download: bool = False,
        variant: str = "auto",
        progress: bool = True,
    ):
        check_split(split)
        check_choice("variant", variant, OMNIGLOT_VARIANTS)
        check_bool("download", download)
        check_bool("progress", progress)
        self._variants = ("full", "small") if variant == "auto" else (variant,)
        self.root, origin = resolve_root(root)
        try:
            self.variant, self.directory = self.locate(self.root, origin, download, progress)
            self.source = origin
            all_zips = [self.directory / z for z in OMNIGLOT_VARIANT_ZIPS[self.variant]]
        except FileNotFoundError:
            if origin == "argument" or download or "small" not in self._variants:
                raise
            self.variant, self.source = "small", "bundled"
            all_zips = list(bundled_omniglot_zips())
            self.directory = all_zips[0].parent
        if self.variant == "full":
            zips = [all_zips[0] if split == "train" else all_zips[1]]
            alphabets = None
        else:
            zips = all_zips
            alphabets = set(OMNIGLOT_SMALL_ALPHABETS[split])
        #: the zip files this split was read from
        self.files = tuple(zips)
        cache_key = (self.variant, split, *(_zip_key(z) for z in zips))
        if cache_key not in _CACHE:
            keep = (lambda a: True) if alphabets is None else (lambda a: a in alphabets)
            _CACHE[cache_key] = read_omniglot_zips(zips, keep, progress)
        self.images, class_of_image = _CACHE[cache_key]
        labels, classes = contiguous_labels(class_of_image)
        super().__init__(split, labels, classes, transform)

    def find(self, root: Path) -> tuple[str, Path] | None:
        """``(variant, folder)`` of the first variant (full before small) present."""
        for v in self._variants:
            d = find_omniglot_dir(root, v)
            if d is not None:
                return v, d
        return None

    def resources(self) -> list[Resource]:
        v = "full" if "full" in self._variants else "small"
        return [
            Resource((OMNIGLOT_URL.format(z),), z, OMNIGLOT_MD5[z])
            for z in OMNIGLOT_VARIANT_ZIPS[v]
        ]

    def download_folder(self, root: Path) -> Path:
        return root / "omniglot"

    def expected_files(self, root: Path) -> str:
        wanted = " or ".join(" + ".join(OMNIGLOT_VARIANT_ZIPS[v]) for v in self._variants)
        return f"put {wanted} (the authors' zip files, not extracted) under {root / 'omniglot'}"

    def missing_hint(self, root: Path, origin: str) -> str:
        if "small" not in self._variants:
            return (
                "The small set bundled with the package needs no files: variant='small' in "
                "Python, --dataset-arg variant=small on the CLI (or the default variant 'auto' "
                "without root= / --root)."
            )
        return "Without root= / --root, the small set bundled with the package is used."

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])
