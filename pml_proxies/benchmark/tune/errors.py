"""Errors of ``tune`` that the command line turns into one line (no traceback)."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad option found once the data or the storage is read (exit code 2): e.g. ``--folds``
    above half the training classes, ``--report-only`` without a search to report."""


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened (exit code 1): server unreachable, a file that is
    not an Optuna database, a schema written by a newer Optuna, a missing database driver."""
