"""``get_dataset`` / ``get_transforms``: the data sets of the benchmark by name."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from .base import BaseDataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Compose,
    ConvertChannels,
    Invert,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)

DATASET_NAMES = ("digits", "omniglot", "cub200", "cars196", "sop", "inshop")
#: a user's own images: ``csv:PATH`` (an OML retrieval dataframe), ``folder:PATH`` (an image
#: folder; see :mod:`pml_proxies.datasets.dataframe`), ``features:PATH`` (frozen features in an
#: ``.npz`` file; see :mod:`pml_proxies.datasets.features`)
USER_DATA_PREFIXES = ("csv:", "folder:", "features:")

_CLASSES = {
    "digits": ("digits", "Digits"),
    "omniglot": ("omniglot", "Omniglot"),
    "cub200": ("cub200", "CUB200"),
    "cars196": ("cars196", "Cars196"),
    "sop": ("sop", "StanfordOnlineProducts"),
    "inshop": ("inshop", "InShop"),
}

#: RandomResizedCrop area range / aspect ratios of the train transforms
NATURAL_CROP_SCALE = (0.08, 1.0)  # torchvision default, as the Proxy-Anchor / MPA / VCPA code
OMNIGLOT_CROP_SCALE = (0.8, 1.0)  # mild: strokes must stay inside the crop
OMNIGLOT_CROP_RATIO = (0.9, 1.1)
#: eval resize / crop ratio of the papers (Resize 256, CenterCrop 224)
EVAL_RESIZE_RATIO = 256 / 224


def dataset_class(name: str) -> type[BaseDataset]:
    """The class implementing data set ``name`` (one of ``DATASET_NAMES``, or ``csv:PATH`` /
    ``folder:PATH``: :class:`~pml_proxies.datasets.dataframe.RetrievalDataset`)."""
    if name.startswith("features:"):
        from .features import FeaturesDataset

        return FeaturesDataset
    if name.startswith(USER_DATA_PREFIXES):
        from .dataframe import RetrievalDataset

        return RetrievalDataset
    if name not in _CLASSES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def get_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    transform: Callable | None = None,
    download: bool = False,
    **kwargs,
) -> BaseDataset:
    """Data set ``name`` (one of ``DATASET_NAMES``), split ``"train"`` or ``"test"``
    (class-disjoint). ``root`` defaults to ``$PML_PROXIES_DATA``, else
    ``~/.cache/pml-proxies/data`` (Omniglot without ``root``: then the bundled small set, see
    :class:`~pml_proxies.datasets.omniglot.Omniglot`). ``transform=None`` uses the deterministic evaluation
    transforms ``get_transforms(name, train=False)``; pass ``get_transforms(name, train=True)``
    for training augmentation. ``download=True`` fetches missing files where that is possible.
    Extra keyword arguments go to the data set class (e.g. ``variant`` for Omniglot).

    A user's own images: ``name="csv:PATH"`` reads an OML retrieval dataframe (relative image
    paths start from ``root`` when given, else from the CSV's folder; ``split="test"`` is its
    validation rows), ``name="folder:PATH"`` an image folder (keyword ``test_fraction`` and
    ``seed`` for a folder without ``train/`` and ``test/``); both validated as
    :mod:`pml_proxies.datasets.dataframe` describes, with the natural-image transforms.
    ``name="features:PATH"`` reads frozen features (:mod:`pml_proxies.datasets.features`):
    items are feature vectors, and ``transform`` (default none) applies to them.
    """
    if name.startswith(USER_DATA_PREFIXES):
        return _user_dataset(name, split, root, transform, **kwargs)
    cls: Any = dataset_class(name)  # the file-backed classes take root / download
    if transform is None:
        transform = get_transforms(name, train=False)
    if name == "digits":
        return cls(split=split, transform=transform, **kwargs)
    return cls(split=split, root=root, transform=transform, download=download, **kwargs)


def _user_dataset(name: str, split: str, root, transform, **kwargs) -> BaseDataset:
    from .dataframe import RetrievalDataset, read_dataframe, read_image_folder

    kind, _, path = name.partition(":")
    if not path:
        raise ValueError(f"dataset {name!r}: give a path after {kind + ':'!r}")
    if kind == "features":  # vectors, no image transforms (``transform`` applies to the tensor)
        from .features import FeaturesDataset

        features = FeaturesDataset(path, split, **kwargs)
        features.transform = transform
        return features
    if kind == "csv":
        table = read_dataframe(path, root=root, **kwargs)
    else:
        table = read_image_folder(path, **kwargs)
    transform = get_transforms(name, train=False) if transform is None else transform
    return RetrievalDataset(table, split, transform)


def get_transforms(
    name: str,
    train: bool,
    image_size: int | None = None,
    channels: int | None = None,
    normalize: bool | tuple[Sequence[float], Sequence[float]] | None = None,
    invert: bool | None = None,
    crop_scale: tuple[float, float] | None = None,
) -> Compose:
    """Preprocessing of data set ``name``: a callable PIL image / array -> float tensor (C, H, W).

    * natural images (cub200, cars196, sop, inshop; default 224 px, 3 channels): train =
      RandomResizedCrop(image_size, scale=(0.08, 1)) + horizontal flip; eval =
      Resize(image_size * 256 / 224) (shorter side) + CenterCrop(image_size), as in the papers.
    * omniglot (default 64 px, 1 channel): train = RandomResizedCrop(image_size, scale=(0.8, 1),
      ratio=(0.9, 1.1)), no flip (a mirrored character can be another character); eval = Resize
      to image_size x image_size (the whole character, no crop).
    * digits (default 8 px, 1 channel): no augmentation, train = eval; resized only when
      image_size != 8.

    Args:
        name: data set name.
        train: training (random) or evaluation (deterministic) variant.
        image_size: side of the output images (defaults above).
        channels: 1 (greyscale) or 3 (RGB; greyscale images are repeated, e.g. for pretrained
            trunks). Default: 1 for digits and omniglot, 3 otherwise.
        normalize: ``True`` = ImageNet mean/std (3 channels; their channel averages 0.449/0.226
            for 1 channel), ``False`` = keep [0, 1], or an explicit ``(mean, std)``.
            Default: ``channels == 3``.
        invert: ``1 - x`` after ToTensor so strokes are bright on a dark background (as digits).
            Default: ``True`` for omniglot with 1 channel, else ``False``.
        crop_scale: area range of the train RandomResizedCrop (defaults above).

    Random choices use torch's global RNG: reproducible under ``torch.manual_seed``.
    """
    if name.startswith("features:"):
        raise ValueError("features (features:PATH) are vectors: they take no image transforms")
    cls = dataset_class(name)
    size = int(image_size or cls.default_image_size)
    if size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    channels = cls.default_channels if channels is None else channels
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if invert is None:
        invert = name == "omniglot" and channels == 1
    if normalize is None:
        normalize = channels == 3

    if name == "digits":
        ops: list[Callable] = [ToTensor()]
        if size != cls.default_image_size:
            ops.append(Resize((size, size)))
        ops.append(ConvertChannels(channels))
    elif name == "omniglot":
        ops = [ConvertChannels(channels)]
        if train:
            scale = crop_scale or OMNIGLOT_CROP_SCALE
            ops.append(RandomResizedCrop(size, scale=scale, ratio=OMNIGLOT_CROP_RATIO))
        else:
            ops.append(Resize((size, size)))
        ops.append(ToTensor())
    else:
        ops = [ConvertChannels(channels)]
        if train:
            ops += [
                RandomResizedCrop(size, scale=crop_scale or NATURAL_CROP_SCALE),
                RandomHorizontalFlip(),
            ]
        else:
            ops += [Resize(int(round(size * EVAL_RESIZE_RATIO))), CenterCrop(size)]
        ops.append(ToTensor())
    if invert:
        ops.append(Invert())
    if normalize is True:
        if channels == 3:
            ops.append(Normalize(IMAGENET_MEAN, IMAGENET_STD))
        else:
            ops.append(Normalize((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)))
    elif normalize:
        mean, std = normalize
        ops.append(Normalize(mean, std))
    return Compose(ops)
