"""scikit-learn's bundled 8x8 handwritten digits as a tiny class-disjoint DML set."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import BaseDataset, check_split

#: digit classes of each split (class-disjoint, as the other benchmark sets)
DIGITS_SPLIT_CLASSES = {"train": (0, 1, 2, 3, 4), "test": (5, 6, 7, 8, 9)}


class Digits(BaseDataset):
    """``sklearn.datasets.load_digits`` (1,797 images, 8x8, values 0..16): digits 0-4 train
    (901 images), 5-9 test (896 images). ``load_image`` gives an (8, 8) float32 array in [0, 1]
    (value / 16), so the default transform yields a (1, 8, 8) tensor in [0, 1]. Needs no files.

    Args:
        split: ``"train"`` or ``"test"``.
        transform: callable applied to the (8, 8) array.
    """

    name = "digits"
    default_image_size = 8
    default_channels = 1

    def __init__(self, split: str = "train", transform: Callable | None = None):
        from sklearn.datasets import load_digits

        check_split(split)
        data = load_digits()
        keep = np.isin(data.target, DIGITS_SPLIT_CLASSES[split])
        digits = list(DIGITS_SPLIT_CLASSES[split])
        self.images = (data.images[keep] / 16.0).astype(np.float32)
        labels = np.searchsorted(digits, data.target[keep]).astype(np.int64)
        super().__init__(split, labels, [str(d) for d in digits], transform)

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index]
