"""Fingerprints of a user's data (``csv:``, ``folder:``, ``features:``): what a benchmark folder
records so that a later command on changed data is refused like any other protocol change."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .base import BaseDataset
from .dataframe import RetrievalDataset, RetrievalTable
from .download import file_digest


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return file_digest(path, "sha256")


def table_fingerprint(table: RetrievalTable) -> str:
    """SHA-256 (hex) of a retrieval table's content (every row's label, path, split, query and
    gallery flags, category and box) and of each image file's size and modification time (the
    pixels are not read: a changed file changes its size or time)."""
    digest = hashlib.sha256()
    columns = {
        "labels": table.labels.tolist(),
        "paths": table.paths,
        "split": table.split.tolist(),
        "is_query": table.is_query.tolist(),
        "is_gallery": table.is_gallery.tolist(),
        "categories": table.categories,
        "boxes": None if table.boxes is None else table.boxes.tolist(),
    }
    digest.update(json.dumps(columns, sort_keys=True).encode())
    for path in table.paths:
        stat = Path(path).stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def data_fingerprint(dataset: BaseDataset) -> str | None:
    """The fingerprint of a user's data set: :func:`table_fingerprint` of a dataframe or image
    folder, :func:`file_sha256` of a features file; ``None`` for the named data sets (their
    identity is their name and files, checked when they are read)."""
    if isinstance(dataset, RetrievalDataset):
        return table_fingerprint(dataset.table)
    path = getattr(dataset, "features_path", None)
    if path is not None:
        return file_sha256(path)
    return None
