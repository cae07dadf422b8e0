"""Omniglot (Lake et al., Science 2015) read straight from the authors' zip files."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .base import BaseDataset, check_split, contiguous_labels, default_root
from .download import download_url

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}"
OMNIGLOT_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
    "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd",
}
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

# decoded images shared by all Omniglot objects of this process, keyed by the zips' identity
_CACHE: dict[tuple, tuple[np.ndarray, list[str]]] = {}


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
    zips: list[Path], keep: Callable[[str], bool] = lambda alphabet: True, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Decode every ``<set>/<Alphabet>/<character>/<file>.png`` of ``zips`` whose alphabet passes
    ``keep``, without extracting anything. Members repeated across zips (same alphabet, character
    and file name: Greek and Latin are in both small sets) are read once.

    Returns uint8 images (N, H, W) (255 = white background) and class names
    ``"<Alphabet>/<character>"``, in sorted (alphabet, character, file) order.
    """
    entries: dict[tuple[str, str, str], tuple[int, str]] = {}
    for zi, path in enumerate(zips):
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
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
    images = None
    handles = [zipfile.ZipFile(p) for p in zips]
    try:
        for i, key in enumerate(tqdm(keys, desc="decode Omniglot", disable=not progress)):
            zi, name = entries[key]
            with Image.open(io.BytesIO(handles[zi].read(name))) as im:
                arr = np.asarray(im.convert("L"))
            if images is None:
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
    * ``"auto"`` (default): ``"full"`` when both full zips are present, else ``"small"`` when
      both small zips are, else (with ``download=True``) downloads the full zips.

    Zips are looked for in ``ROOT/omniglot``, ``ROOT/Omniglot`` and ``ROOT``. Images are
    105x105 greyscale PIL images, black strokes on white; class names are
    ``"<Alphabet>/<character>"``, ids in sorted name order.

    Args:
        split: ``"train"`` or ``"test"``.
        root: data root (default ``$PML_PROXIES_DATA`` or ``~/.cache/pml-proxies/data``).
        transform: callable applied to the PIL image.
        download: download the missing zips of the variant (from the authors' GitHub) into
            ``ROOT/omniglot``.
        variant: ``"auto"``, ``"full"`` or ``"small"``.
        progress: show tqdm bars while downloading and decoding.
    """

    name = "omniglot"
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
        if variant not in ("auto", "full", "small"):
            raise ValueError(f"variant must be 'auto', 'full' or 'small', got {variant!r}")
        self.root = default_root(root)
        self.variant, directory = self._locate(variant, download, progress)
        self.directory = directory
        zips = [directory / z for z in OMNIGLOT_VARIANT_ZIPS[self.variant]]
        if self.variant == "full":
            zips = [zips[0] if split == "train" else zips[1]]
            alphabets = None
        else:
            alphabets = set(OMNIGLOT_SMALL_ALPHABETS[split])
        cache_key = (self.variant, split, *(_zip_key(z) for z in zips))
        if cache_key not in _CACHE:
            keep = (lambda a: True) if alphabets is None else (lambda a: a in alphabets)
            _CACHE[cache_key] = read_omniglot_zips(zips, keep, progress)
        self.images, class_of_image = _CACHE[cache_key]
        labels, classes = contiguous_labels(class_of_image)
        super().__init__(split, labels, classes, transform)

    def _locate(self, variant: str, download: bool, progress: bool) -> tuple[str, Path]:
        tried = ("full", "small") if variant == "auto" else (variant,)
        for v in tried:
            d = find_omniglot_dir(self.root, v)
            if d is not None:
                return v, d
        if download:
            v = "full" if variant == "auto" else variant
            target = self.root / "omniglot"
            for z in OMNIGLOT_VARIANT_ZIPS[v]:
                download_url(
                    OMNIGLOT_URL.format(z), target / z, md5=OMNIGLOT_MD5[z], progress=progress
                )
            return v, target
        wanted = " or ".join(" + ".join(OMNIGLOT_VARIANT_ZIPS[v]) for v in tried)
        raise FileNotFoundError(
            f"Omniglot not found: put {wanted} (the authors' zip files, not extracted) under "
            f"{self.root / 'omniglot'}, or pass download=True"
        )

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])
