"""Reducers of pml-proxies (PML ``BaseReducer`` subclasses)."""

from .sync_free_divisor_reducer import SyncFreeDivisorReducer

__all__ = ["SyncFreeDivisorReducer"]
