"""Hooks of pml-proxies: trainer hooks (PML trainer ``end_of_epoch_hook`` /
``end_of_iteration_hook``) and the optimizer post-step hook that keeps VCPA's ``proxy_std`` at
or above ``sigma_min`` (:mod:`.std_projection`)."""

from .epoch_hook import SetEpochHook, set_epoch, stateful_losses
from .std_projection import track_for_projection

__all__ = ["SetEpochHook", "set_epoch", "stateful_losses", "track_for_projection"]
