"""Tuned fair comparison (``pml-proxies-benchmark tune``): MLRC's protocol in the main job.

An equal Optuna TPE budget per loss over the search spaces of the MLRC configs
(:mod:`.spaces`), trials that train under the untuned benchmark's protocol and are scored on
held-out training classes (:mod:`.trial`), studies in an RDB storage shared by any number of
workers (:mod:`.study`), and the re-run of each loss's best trial with several seeds plus the
report (:mod:`.runner`, :mod:`.report`). Optuna is the optional extra ``[tune]``.
"""

from .spaces import LOSS_CONFIGS, SpaceEntry, loss_space, resolve_spaces
from .trial import Objective, Reporter, TrialConfig

__all__ = [
    "LOSS_CONFIGS",
    "Objective",
    "Reporter",
    "SpaceEntry",
    "TrialConfig",
    "loss_space",
    "resolve_spaces",
]
