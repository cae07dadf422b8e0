"""Data of the benchmark: the dataset's train/test splits and a class-disjoint validation split
carved from the training classes.

A user's own data (``--dataset csv:PATH``, ``folder:PATH``, ``features:PATH``) is read and
checked once per process by :func:`~pml_proxies.benchmark.userdata.user_data` (the config does
it when it is built, so that a bad input is a usage error before any output folder exists). Its
decoded images (:class:`UserImages`) go through the same batched tensor transforms as the
bundled Omniglot's; features are rows of a float tensor, batched without any transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import Dataset

from ..datasets.base import BaseDataset, contiguous_labels
from ..datasets.transforms import Compose
from .userdata import UserData, user_data

if TYPE_CHECKING:
    from .config import BenchmarkConfig


class LabeledDataset(Protocol):
    """What the splits need of a data set: ``ds[i] -> (image, label)`` and the per-sample
    class ids ``ds.labels`` (e.g. any :class:`pml_proxies.datasets.base.BaseDataset`)."""

    @property
    def labels(self) -> ArrayLike: ...

    def __getitem__(self, index: int) -> Any: ...


def batch_images(base) -> tuple[np.ndarray, Compose] | None:
    """``(base.images, base.transform)`` when ``base`` holds its decoded images in memory as one uint8 array
    ``(N, H, W)`` or ``(N, H, W, C)`` (Omniglot: the whole set, 105 x 105 each) and its transform
    has a batched form (:meth:`~pml_proxies.datasets.transforms.Compose.batch`), else ``None``
    (file-backed sets, float images: one sample at a time through the transform)."""
    images = getattr(base, "images", None)
    transform = getattr(base, "transform", None)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4)):
        return None
    if not (isinstance(transform, Compose) and transform.supports_batch()):
        return None
    return images, transform


class RelabeledSubset(Dataset):
    """Samples ``indices`` of ``base`` with labels mapped to ``0..n-1`` by ``label_map``.

    Where ``base`` holds its images in memory as one uint8 array (:func:`batch_images`), a batch
    (``__getitems__``, what the DataLoader asks for) is transformed at once on tensors, every image
    with the random draws it would get alone; ``subset[i]`` takes the same path, so both give the
    same tensors.

    Attributes:
        labels: numpy int64 labels (contiguous), as PML's samplers want.
        original_labels: the base dataset's labels of these samples.
    """

    def __init__(
        self, base: LabeledDataset, indices: np.ndarray, label_map: dict[int, int]
    ) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        base_labels = np.asarray(base.labels, dtype=np.int64)
        self.original_labels = base_labels[self.indices]
        self.labels = np.array([label_map[int(y)] for y in self.original_labels], dtype=np.int64)
        self.num_classes = len(label_map)
        self._batched = batch_images(base)
        features = getattr(base, "features", None)  # frozen features: rows of one tensor
        self._features = features if isinstance(features, torch.Tensor) else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if self._batched is not None or self._features is not None:
            return self.__getitems__([i])[0]
        image, _ = self.base[int(self.indices[i])]
        return image, int(self.labels[i])

    def __getitems__(self, items: Sequence[int]) -> list:
        """``[self[i] for i in items]``, transformed as one batch where the images allow it."""
        if self._features is not None:
            rows = np.asarray(items, dtype=np.int64)
            vectors = self._features[torch.from_numpy(self.indices[rows])]
            return list(zip(vectors.unbind(0), self.labels[rows].tolist()))
        if self._batched is None:
            return [self[i] for i in items]
        all_images, transform = self._batched
        rows = np.asarray(items, dtype=np.int64)
        images = torch.from_numpy(all_images[self.indices[rows]])
        if images.dim() == 4:  # (B, H, W, C) -> (B, C, H, W)
            images = images.permute(0, 3, 1, 2)
        batch = transform.batch(images)
        return list(zip(batch.unbind(0), self.labels[rows].tolist()))


@dataclass
class BenchmarkData:
    """The three class-disjoint splits. ``train`` uses the training transform, ``val`` and
    ``test`` the evaluation transform. ``*_classes`` are the class names of each split.
    ``train_eval`` holds the same samples and labels as ``train`` with the evaluation transform
    (embedding maps of the training classes)."""

    train: RelabeledSubset
    val: RelabeledSubset
    test: RelabeledSubset
    train_classes: list
    val_classes: list
    test_classes: list
    train_eval: RelabeledSubset | None = None
    feature_dim: int | None = None  # frozen features: the width of their vectors

    def in_channels(self, channels: int) -> int:
        """What the trunk takes: ``channels`` of images, or :attr:`feature_dim` of features."""
        return channels if self.feature_dim is None else self.feature_dim

    def with_validation_classes(self, val_classes: Sequence) -> BenchmarkData:
        """The same data with ``val_classes`` (labels of the training split, as in
        ``train.original_labels`` / ``val.original_labels``) as the validation classes and the
        other training-split classes as the training classes (class-disjoint k-fold)."""
        pool = np.union1d(self.train.original_labels, self.val.original_labels)
        chosen = np.unique(np.asarray(list(val_classes), dtype=np.int64))
        unknown = np.setdiff1d(chosen, pool)
        if unknown.size:
            raise ValueError(
                f"val_classes {unknown.tolist()} are not training-split classes of this data"
            )
        train_classes = np.setdiff1d(pool, chosen)
        if len(train_classes) < 2:
            raise ValueError("val_classes must leave at least 2 training classes")
        train_base, eval_base = self.train.base, self.val.base
        return BenchmarkData(
            train=_subset(train_base, train_classes),
            val=_subset(eval_base, chosen),
            test=self.test,
            train_classes=_class_names(train_base, train_classes),
            val_classes=_class_names(eval_base, chosen),
            test_classes=self.test_classes,
            train_eval=_subset(eval_base, train_classes),
            feature_dim=self.feature_dim,
        )


def split_validation_classes(
    labels: np.ndarray, val_fraction: float, seed: int = 0, min_val_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Split the classes of ``labels`` into (train classes, val classes), class-disjoint.

    ``round(val_fraction * C)`` classes (at least ``min_val_classes``, at least 2 left for
    training) are drawn with a fixed ``seed`` (the same split for every loss and run seed).
    ``val_fraction = 0`` gives no validation classes.
    """
    classes = np.unique(np.asarray(labels))
    if val_fraction <= 0:
        return classes, classes[:0]
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_val = max(min_val_classes, int(round(val_fraction * len(classes))))
    if len(classes) - n_val < 2:
        raise ValueError(
            f"cannot carve {n_val} validation classes out of {len(classes)} training classes "
            "and keep at least 2 for training"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(classes)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _subset(base, classes: np.ndarray) -> RelabeledSubset:
    labels = np.asarray(base.labels, dtype=np.int64)
    indices = np.flatnonzero(np.isin(labels, classes))
    label_map = {int(c): i for i, c in enumerate(np.sort(classes))}
    return RelabeledSubset(base, indices, label_map)


def _class_names(base, classes: np.ndarray) -> list:
    names = getattr(base, "classes", None)
    if names is None:
        return [int(c) for c in classes]
    return [names[int(c)] for c in classes]


def load_benchmark_data(
    dataset: str,
    root: str | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    download: bool = False,
    max_train_classes: int | None = None,
    channels: int | None = None,
    dataset_kwargs: dict | None = None,
    progress: bool = True,
) -> BenchmarkData:
    """Load ``dataset`` with :mod:`pml_proxies.datasets` and build the three splits.

    Args:
        dataset: a name of :data:`pml_proxies.datasets.DATASET_NAMES`.
        root: data folder (``None``: the datasets module's default).
        image_size: image side given to :func:`~pml_proxies.datasets.get_transforms`.
        val_fraction: fraction of the training classes held out for model selection.
        split_seed: seed of the validation class draw.
        download: allow downloading the data set.
        max_train_classes: keep only this many training-split classes (the first ones; quick
            runs), ``None`` for all.
        channels: 1 or 3 channels (``None``: the dataset's default); 3 gives ImageNet-normalised
            RGB, what the pretrained trunks expect.
        dataset_kwargs: extra keyword arguments of the data set class (e.g. Omniglot's
            ``variant``).
        progress: progress bars of the data set class, where it has them.
    """
    import inspect

    from ..datasets import dataset_class, get_dataset, get_transforms

    kw = dict(dataset_kwargs or {})
    if "progress" in inspect.signature(dataset_class(dataset).__init__).parameters:
        kw.setdefault("progress", progress)

    train_tf = get_transforms(dataset, train=True, image_size=image_size, channels=channels)
    eval_tf = get_transforms(dataset, train=False, image_size=image_size, channels=channels)
    train_base = get_dataset(
        dataset, "train", root=root, transform=train_tf, download=download, **kw
    )
    val_base = get_dataset(dataset, "train", root=root, transform=eval_tf, download=download, **kw)
    test_base = get_dataset(dataset, "test", root=root, transform=eval_tf, download=download, **kw)

    return _splits(train_base, val_base, test_base, val_fraction, split_seed, max_train_classes)


def _splits(
    train_base, val_base, test_base, val_fraction: float, split_seed: int,
    max_train_classes: int | None, feature_dim: int | None = None,
) -> BenchmarkData:  # fmt: skip
    """The three splits of the loaded bases (training transform, evaluation transform of the
    training split, test split): validation classes carved from the training classes."""
    all_train = np.unique(np.asarray(train_base.labels))
    if max_train_classes is not None:
        all_train = all_train[: int(max_train_classes)]
    train_labels = np.asarray(train_base.labels)
    train_labels = train_labels[np.isin(train_labels, all_train)]
    tr_classes, val_classes = split_validation_classes(train_labels, val_fraction, split_seed)
    test_classes = np.unique(np.asarray(test_base.labels))
    return BenchmarkData(
        train=_subset(train_base, tr_classes),
        val=_subset(val_base, val_classes),
        test=_subset(test_base, test_classes),
        train_classes=_class_names(train_base, tr_classes),
        val_classes=_class_names(val_base, val_classes),
        test_classes=_class_names(test_base, test_classes),
        train_eval=_subset(val_base, tr_classes),
        feature_dim=feature_dim,
    )


def load_config_data(config, progress: bool = False) -> BenchmarkData:
    """The three class-disjoint splits of a ``BenchmarkConfig`` (the untuned benchmark and the
    tuner both load their data here)."""
    if config.is_user_data:
        return load_user_data(config)
    return load_benchmark_data(
        config.dataset,
        root=config.root,
        image_size=config.image_size,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        download=config.download,
        max_train_classes=config.max_train_classes,
        channels=config.channels,
        dataset_kwargs=config.dataset_kwargs,
        progress=progress,
    )


class UserImages(BaseDataset):
    """One split of a user's decoded images (:class:`UserData`): ``images`` the uint8 array of
    its rows (what :func:`batch_images` batches), ``labels`` contiguous within the split in the
    order of the table's labels, ``classes`` their names (an image folder's class folders,
    else the labels as text)."""

    def __init__(self, data: UserData, split: str, transform: Compose) -> None:
        from ..datasets.dataframe import SPLIT_ROWS

        assert data.table is not None and data.images is not None
        rows = np.flatnonzero(data.table.split == SPLIT_ROWS[split])
        labels, keys = contiguous_labels(data.table.labels[rows].tolist())
        names = data.class_names or {}
        super().__init__(split, labels, [names.get(k, str(k)) for k in keys], transform)
        self.name, self.title = "custom", data.table.source
        self.rows = rows
        self.images = data.images[rows]
        self.is_query = data.table.is_query[rows]
        self.is_gallery = data.table.is_gallery[rows]
        self.categories = (
            None if data.table.categories is None else [data.table.categories[i] for i in rows]
        )

    def load_image(self, index: int):
        from PIL import Image

        return Image.fromarray(self.images[index])


def load_user_data(config: BenchmarkConfig) -> BenchmarkData:
    """The three splits of ``config``'s own data (:func:`user_data`): the table's train rows
    (validation classes carved from them, as for a named set) and its validation rows as the
    test split; images with the transforms of ``config.image_set``."""
    data = user_data(config)
    if data.features_path is not None:
        from ..datasets.features import FeaturesDataset

        train = FeaturesDataset(data.features_path, "train")
        test = FeaturesDataset(data.features_path, "test")
        return _splits(train, train, test, config.val_fraction, config.split_seed,
                       config.max_train_classes, feature_dim=train.feature_dim)  # fmt: skip
    from ..datasets import get_transforms

    size, channels = config.image_size_or_default, config.channels
    train_tf = get_transforms(config.image_set, train=True, image_size=size, channels=channels)
    eval_tf = get_transforms(config.image_set, train=False, image_size=size, channels=channels)
    return _splits(
        UserImages(data, "train", train_tf),
        UserImages(data, "train", eval_tf),
        UserImages(data, "test", eval_tf),
        config.val_fraction,
        config.split_seed,
        config.max_train_classes,
    )


def data_notes(config: BenchmarkConfig) -> list[str]:
    """What a report says first about a user's data: an evaluation that is not class-disjoint,
    images skipped as unreadable (empty for a named data set)."""
    split = config.class_split or {}
    notes = []
    if split.get("shared_classes"):
        notes.append(
            f"**The evaluation is not class-disjoint**: {split['shared_classes']} of the "
            f"{split['test_classes']} test classes also have training images "
            "(--allow-shared-classes)."
        )
    if split.get("skipped_images"):
        notes.append(
            f"{split['skipped_images']} image(s) that could not be decoded were skipped "
            "(--skip-corrupt-images)."
        )
    return notes
