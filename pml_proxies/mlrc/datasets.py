"""Data sets for powerful-benchmarker besides its CUB200 / Cars196 / StanfordOnlineProducts."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import Dataset


class ImageFolderDataset(Dataset):
    """Any ``<root>/<folder>/<class>/<image>`` tree as a powerful-benchmarker data set.

    powerful-benchmarker's own data set classes check the exact image and class counts of CUB-200,
    Cars-196 and SOP; this one accepts any class folder tree (a subset, a new data set, the tiny
    fake one of the smoke test). Items are ``{"data": image, "label": int}`` as the built-in ones.

    Args:
        root: the ``--dataset_root`` (filled in by powerful-benchmarker).
        folder: sub-folder of ``root`` that holds one folder per class.
        transform: image transform (filled in by powerful-benchmarker).
        download: ignored (nothing is downloaded); accepted because the split-manager factory
            passes it.
    """

    def __init__(
        self,
        root: str,
        folder: str = "images",
        transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        from torchvision import datasets

        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            raise ValueError(f"ImageFolderDataset: {path!r} is not a folder")
        self.dataset = datasets.ImageFolder(path)
        self.labels = np.array([label for _, label in self.dataset.imgs])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img, label = self.dataset[idx]
        if self.transform is not None:
            img = self.transform(img)
        return {"data": img, "label": label}
