"""What one trial computes: the objective interface and the benchmark's objective.

The search machinery (:mod:`.study`) only sees an :data:`Objective`: a callable
``objective(trial: TrialConfig, reporter: Reporter) -> float`` returning the score to maximise.
:class:`BenchmarkObjective` is the real one: it trains the loss with the trial's
hyper-parameters under the untuned benchmark's protocol (one run specification,
:func:`~pml_proxies.benchmark.spec.build_run_spec`) and returns the best validation primary
metric (MAP@R by default) over epochs, on held-out *training* classes only (the test classes are
never evaluated in a trial), optionally as the mean over class-disjoint folds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import BenchmarkConfig
from .errors import UsageError
from .spaces import split_params


@dataclass(frozen=True)
class TrialConfig:
    """One trial as the objective sees it.

    Attributes:
        loss: registry name of the loss.
        params: the sampled hyper-parameters (space entry name -> value).
        number: Optuna's trial number in the loss's study.
        output: a folder of its own for the trial's files.
    """

    loss: str
    params: dict[str, Any] = field(default_factory=dict)
    number: int = 0
    output: Path = Path(".")


class Reporter(Protocol):
    """Receives the intermediate objective value after each validation (for pruning)."""

    def report(self, value: float, step: int) -> None:
        """Record ``value`` at ``step``; raises ``optuna.TrialPruned`` to stop the trial."""


Objective = Callable[[TrialConfig, Reporter], float]


def trial_spec(base: BenchmarkConfig, loss: str, params: dict[str, Any], seed: int):
    """The run specification of ``loss`` with a trial's hyper-parameters: loss kwargs (miner
    kwargs included) as overrides, the absolute proxy lr as ``proxy_lr_mult = proxy_lr / trunk
    lr`` (:func:`~pml_proxies.benchmark.spec.build_run_spec`)."""
    from ..spec import build_run_spec

    loss_kwargs, proxy_lr = split_params(params)
    mult = None if proxy_lr is None else proxy_lr / base.lr_or_default
    return build_run_spec(base, loss, seed, loss_overrides=loss_kwargs, proxy_lr_mult=mult)


def fold_classes(data, folds: int, seed: int) -> list[np.ndarray]:
    """The validation classes of ``folds`` class-disjoint folds of all training-split classes
    (MLRC's k-fold protocol): a seeded permutation of the classes cut into ``folds`` parts; fold
    ``i`` validates on part ``i`` and trains on the others."""
    classes = np.union1d(np.unique(data.train.original_labels), data.val.original_labels)
    if folds > len(classes) // 2:
        raise ValueError(f"folds ({folds}) must be <= half the training classes ({len(classes)})")
    parts = np.array_split(np.random.default_rng(seed).permutation(classes), folds)
    return [np.sort(p) for p in parts]


def load_data(config: BenchmarkConfig, progress: bool = False):
    """The benchmark's data of ``config`` (its three class-disjoint splits)."""
    from ..data import load_config_data

    return load_config_data(config, progress)


class BenchmarkObjective:
    """The tuned benchmark's objective: train, select the epoch on validation classes, return
    the best validation primary metric (mean over folds with ``folds > 1``).

    Args:
        config: the untuned benchmark's protocol (trunk, data, sampler, schedule, ...).
        folds: 1: the benchmark's own validation split (``val_fraction``); K > 1: MLRC's
            class-disjoint K-fold cross-validation over all training classes.
        trial_seed: the seed of every trial's training (one run per trial and fold).
    """

    def __init__(self, config: BenchmarkConfig, folds: int = 1, trial_seed: int = 0) -> None:
        self.config = config
        self.folds = folds
        self.trial_seed = trial_seed
        self._data = None

    def data(self):
        if self._data is None:
            self._data = load_data(self.config)
        return self._data

    def check(self) -> None:
        """Load the data and refuse, before any trial, a search every trial would fail:
        no validation classes (``--val-fraction 0``), more folds than half the training classes.

        Raises:
            UsageError: naming the option.
        """
        data = self.data()
        if self.folds == 1 and len(data.val) == 0:
            raise UsageError("--val-fraction: tuning needs validation classes (> 0, or --folds K)")
        if self.folds > 1:
            try:
                fold_classes(data, self.folds, self.config.split_seed)
            except ValueError as e:
                raise UsageError(f"--folds {self.folds}: {e}") from None

    def __call__(self, trial: TrialConfig, reporter: Reporter) -> float:

        from ..train import torch_threads, train_and_evaluate

        spec = trial_spec(self.config, trial.loss, trial.params, self.trial_seed)
        self.check()
        data = self.data()
        folds: list = (
            fold_classes(data, self.folds, self.config.split_seed) if self.folds > 1 else [None]
        )
        metric = spec.primary_metric
        epochs = self.config.epochs
        scores = []
        with torch_threads(self.config):
            for k, val_classes in enumerate(folds):

                def report(epoch: int, val: dict, k: int = k) -> None:
                    reporter.report(float(val[metric]), k * epochs + epoch)

                result = train_and_evaluate(
                    spec,
                    data,
                    trial.output / f"fold_{k}",
                    val_classes=val_classes,
                    epoch_callback=report,
                    evaluate_test=False,
                )
                scores.append(float(result["best_val_score"]))
        return float(np.mean(scores))
