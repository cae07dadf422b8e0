"""Trainer hooks of pml-proxies (PML trainer ``end_of_epoch_hook`` / ``end_of_iteration_hook``)."""

from .epoch_hook import SetEpochHook, set_epoch, stateful_losses

__all__ = ["SetEpochHook", "set_epoch", "stateful_losses"]
