"""The options of ``pml-proxies-benchmark tune`` beside the benchmark's config: :class:`TuneArgs`.

Its command line is derived from these fields as every command's is
(:func:`~pml_proxies.benchmark.options.add_options`); :meth:`TuneArgs.tune_options` gives the
search's settings (:class:`~pml_proxies.benchmark.tune.runner.TuneOptions`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import CommonOptions
from ..options import ConfigError, check_fields, option

if TYPE_CHECKING:
    from .runner import TuneOptions

SEARCH = "search (tune)"


def _at_least(low: int):
    def check(name: str, value) -> None:
        from ...functional.validation import check_int

        check_int(name, value, low=low)

    return check


def _optional_at_least(low: int):
    check = _at_least(low)
    return lambda name, value: None if value is None else check(name, value)


def _storage_check(name: str, url) -> None:
    """An Optuna storage URL that can hold a search (its messages name ``--storage``)."""
    if url is not None:
        from .study import check_storage_url

        check_storage_url(url)


def default_startup_trials(trials: int) -> int:
    """Random trials before TPE when ``--startup-trials`` is not given."""
    return min(10, max(1, trials // 4))


@dataclass(frozen=True)
class TuneArgs(CommonOptions):
    """The search's options as typed (the config's are
    :class:`~pml_proxies.benchmark.config.BenchmarkConfig`'s). Checked on construction
    (:class:`~pml_proxies.benchmark.options.ConfigError` naming the field)."""

    list_losses: bool = option(
        False, "list each loss's search space, then exit", flag=("--list-losses", "--list-spaces")
    )
    trials: int = option(20, "trials per loss (equal budget)", SEARCH, type=int,
                         check=_at_least(1))  # fmt: skip
    prune: bool = option(False, "Optuna MedianPruner on validation", SEARCH)
    folds: int = option(1, "K > 1: class-disjoint K-fold CV over the training classes", SEARCH,
                        type=int, check=_at_least(1))  # fmt: skip
    sampler_seed: int = option(0, "TPE seed", SEARCH, type=int)
    trial_seed: int = option(0, "training seed of every trial", SEARCH, type=int)
    startup_trials: int | None = option(
        None, "random trials before TPE", SEARCH, type=int,
        default_text="max(1, trials // 4), at most 10", check=_optional_at_least(0),
    )  # fmt: skip
    space: list[str] = option(
        [], "override (or add) a search range (repeatable)", SEARCH, action="append",
        metavar="LOSS.ARG=LOW:HIGH[:log|int]", default_text="the loss's space (--list-spaces)",
    )  # fmt: skip
    configs: str | None = option(
        None, "powerful_benchmarker_configs folder", SEARCH,
        default_text="$PML_PROXIES_MLRC_CONFIGS, else the one beside the package",
    )  # fmt: skip
    storage: str | None = option(
        None, "Optuna RDB URL, e.g. postgresql://user@host:port/db", SEARCH,
        default_text="sqlite file OUTPUT/tune.sqlite3", check=_storage_check,
    )  # fmt: skip
    study_name: str = option("tune", "prefix of the studies (one per loss)", SEARCH)
    # --workers: the benchmark's DataLoader workers are --loader-workers here
    search_workers: int = option(1, "local worker processes", SEARCH, flag="--workers", type=int,
                                 metavar="WORKERS", check=_at_least(1))  # fmt: skip
    worker_only: bool = option(
        False, "search only (join a study from another machine): no re-runs, no report", SEARCH
    )
    worker_index: int = option(0, "sampler offset of this worker", SEARCH, type=int,
                               check=_at_least(0))  # fmt: skip
    # set by `--workers K` for its local workers: the command recorded in the studies is the
    # one the user typed, not the worker's
    started_by: str | None = option(None, argparse.SUPPRESS, SEARCH)
    report_only: bool = option(
        False, "no search: re-run the best trials (unless --no-reproduce) and report", SEARCH
    )
    no_reproduce: bool = option(False, "skip the --seeds re-runs", SEARCH)
    with_defaults: bool = option(
        False, "also run the untuned benchmark (paper defaults) into OUTPUT/defaults", SEARCH
    )
    heartbeat: int = option(10, "trial heartbeat interval (s)", SEARCH, type=int,
                            check=_at_least(1))  # fmt: skip
    grace_period: int = option(  # at least --heartbeat + 1 (__post_init__)
        60, "a RUNNING trial without heartbeat this long is failed and retried", SEARCH, type=int
    )
    max_retry: int = option(3, "retries of a stale trial", SEARCH, type=int)
    objective: str | None = option(
        None, "custom objective(trial_config, reporter) -> float", SEARCH, metavar="MODULE:NAME",
        default_text="training",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self)
        try:
            _at_least(self.heartbeat + 1)("grace_period", self.grace_period)
        except (TypeError, ValueError) as e:
            raise ConfigError("grace_period", str(e).removeprefix("grace_period ")) from None
        if self.worker_only and self.report_only:
            raise ConfigError("worker_only", "and --report-only exclude each other")

    def tune_options(self) -> TuneOptions:
        """The search's settings."""
        from .runner import TuneOptions

        startup = self.startup_trials
        return TuneOptions(
            n_trials=self.trials,
            prune=self.prune,
            folds=self.folds,
            sampler_seed=self.sampler_seed,
            trial_seed=self.trial_seed,
            startup_trials=default_startup_trials(self.trials) if startup is None else startup,
            storage=self.storage,
            study_name=self.study_name,
            worker_index=self.worker_index,
            heartbeat=self.heartbeat,
            grace_period=self.grace_period,
            max_retry=self.max_retry,
            reproduce=not self.no_reproduce,
            with_defaults=self.with_defaults,
        )
