"""Frozen features as a data set: an ``.npz`` file of one feature vector per image, with the
per-row fields of a retrieval dataframe (:mod:`pml_proxies.datasets.dataframe`).

Arrays of the file (N rows):

==================  ==============================================================================
``features``        N x F floats (finite), the images' features (e.g. a pretrained trunk's)
``labels``          N integers
``split``           N strings, ``train`` or ``validation``
``is_query``        (optional) N booleans, false on train rows; default: every validation row
``is_gallery``      (optional) N booleans, false on train rows; default: every validation row
``category``        (optional) N strings
==================  ==============================================================================

Other arrays (e.g. a fingerprint of the trunk that made the features) are ignored here.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .base import BaseDataset, check_split, contiguous_labels
from .dataframe import DATAFRAME_SPLITS, SPLIT_ROWS, DataframeError

FEATURE_ARRAYS = ("features", "labels", "split")


def read_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a features file (module docstring), validated; ``is_query`` /
    ``is_gallery`` filled in where absent.

    Raises:
        FileNotFoundError: no such file.
        DataframeError: a missing or malformed array (named, with the first offending rows,
            numbered from 0).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"features file {file} does not exist")
    source = str(file)
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataframeError(source, "features", f"not a readable .npz file ({e})") from e
    for name in FEATURE_ARRAYS:
        if name not in arrays:
            raise DataframeError(source, name, f"missing; the file has {sorted(arrays)}")
    features = arrays["features"]
    if features.ndim != 2 or features.shape[0] == 0 or features.dtype.kind != "f":
        raise DataframeError(source, "features", f"must be an N x F float array, got "
                             f"{features.dtype} {features.shape}")  # fmt: skip
    n = features.shape[0]
    rows = np.arange(n)
    _rows(source, "features", ~np.isfinite(features).all(1), rows, "not finite")
    for name in ("labels", "split", "is_query", "is_gallery", "category"):
        if name in arrays and arrays[name].shape != (n,):
            raise DataframeError(source, name, f"must have shape ({n},), got {arrays[name].shape}")
    if arrays["labels"].dtype.kind not in "iu":
        raise DataframeError(source, "labels", f"must be integers, got {arrays['labels'].dtype}")
    split = arrays["split"].astype(str)
    _rows(source, "split", ~np.isin(split, DATAFRAME_SPLITS), rows,
          f"must be one of {list(DATAFRAME_SPLITS)}")  # fmt: skip
    train = split == "train"
    for name in ("is_query", "is_gallery"):
        flags = arrays.get(name, ~train)
        if flags.dtype != bool:
            raise DataframeError(source, name, f"must be booleans, got {flags.dtype}")
        _rows(source, name, train & flags, rows, "must be False on train rows")
        arrays[name] = flags
    is_query, is_gallery = arrays["is_query"], arrays["is_gallery"]
    _rows(source, "is_query", ~train & ~is_query & ~is_gallery, rows,
          "a validation row is neither query nor gallery")  # fmt: skip
    labels = arrays["labels"].astype(np.int64)
    _rows(source, "labels", is_query & ~np.isin(labels, labels[is_gallery]), rows,
          "a query's label has no gallery row")  # fmt: skip
    arrays.update(labels=labels, split=split)
    return arrays


def split_rows(arrays: dict, split: str, path: str | os.PathLike) -> np.ndarray:
    """The rows of ``split`` (``"train"`` or ``"test"``: the validation rows) of a features file
    read by :func:`read_features`; ``ValueError`` when it has none."""
    rows = np.flatnonzero(arrays["split"] == SPLIT_ROWS[split])
    if len(rows) == 0:
        raise ValueError(f"{path}: no {SPLIT_ROWS[split]} rows for split {split!r}")
    return rows


def _rows(source: str, column: str, bad: np.ndarray, rows: np.ndarray, problem: str) -> None:
    if bad.any():
        raise DataframeError(
            source, column, f"{problem} (rows numbered from 0)", rows[bad].tolist()
        )


class FeaturesDataset(BaseDataset):
    """One split of a features file (module docstring): ``ds[i]`` is ``(feature vector as a
    float32 tensor, label)``; ``split="test"`` is the validation rows. ``is_query``,
    ``is_gallery``, ``categories`` (or ``None``) per row, ``rows`` the file's rows of the split.

    Args:
        path: the ``.npz`` file.
        split: ``"train"`` or ``"test"``.
    """

    name = "features"

    def __init__(self, path: str | os.PathLike, split: str):
        split = check_split(split)
        arrays = read_features(path)
        self.title = str(path)
        self.features_path = Path(path).expanduser()
        self.rows = split_rows(arrays, split, path)
        labels, keys = contiguous_labels(arrays["labels"][self.rows].tolist())
        super().__init__(split, labels, [str(k) for k in keys], transform=None)
        self.features = torch.as_tensor(arrays["features"][self.rows], dtype=torch.float32)
        self.is_query = arrays["is_query"][self.rows]
        self.is_gallery = arrays["is_gallery"][self.rows]
        category = arrays.get("category")
        self.categories = category[self.rows].astype(str).tolist() if category is not None else None

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def load_image(self, index: int) -> torch.Tensor:
        return self.features[index]
