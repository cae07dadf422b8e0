"""What one trial computes: the objective interface and the benchmark's objective.

The search machinery (:mod:`.study`) only sees an :data:`Objective`: a callable
``objective(trial: TrialConfig, reporter: Reporter) -> float`` returning the score to maximise.
:class:`BenchmarkObjective` is the real one: it trains the loss with the trial's
hyper-parameters under the untuned benchmark's protocol and returns the best validation
primary metric (MAP@R by default) over epochs, on held-out *training* classes only (the test
classes are never loaded into a trial), optionally as the mean over class-disjoint folds.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import BenchmarkConfig
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


def trial_benchmark_config(
    base: BenchmarkConfig, loss: str, params: dict[str, Any], seeds: list[int], output: str
) -> BenchmarkConfig:
    """``base`` with the trial's hyper-parameters: loss kwargs (miner kwargs included) and the
    proxy learning rate, the latter as ``proxy_lr_mult = proxy_lr / trunk lr``."""
    loss_kwargs, proxy_lr = split_params(params)
    mult = base.proxy_lr_mult if proxy_lr is None else proxy_lr / base.lr_or_default
    config = dataclasses.replace(
        base,
        losses=[loss],
        loss_params={loss: loss_kwargs},
        proxy_lr_mult=mult,
        seeds=list(seeds),
        output=output,
    )
    config.validate()
    return config


def class_folds(data, folds: int, seed: int) -> list:
    """``folds`` class-disjoint splits of all training classes (MLRC's k-fold protocol): fold
    ``i`` validates on the ``i``-th part of a seeded permutation of the classes and trains on the
    rest. The test classes are replaced by the validation ones (a trial never sees them)."""
    from ..data import BenchmarkData, _class_names, _subset

    train_base, val_base = data.train.base, data.val.base
    classes = np.union1d(np.unique(data.train.original_labels), data.val.original_labels)
    if folds > len(classes) // 2:
        raise ValueError(f"folds ({folds}) must be <= half the training classes ({len(classes)})")
    parts = np.array_split(np.random.default_rng(seed).permutation(classes), folds)
    out = []
    for part in parts:
        val_classes = np.sort(part)
        train_classes = np.setdiff1d(classes, val_classes)
        val = _subset(val_base, val_classes)
        out.append(
            BenchmarkData(
                train=_subset(train_base, train_classes),
                val=val,
                test=val,
                train_classes=_class_names(train_base, train_classes),
                val_classes=_class_names(val_base, val_classes),
                test_classes=_class_names(val_base, val_classes),
            )
        )
    return out


@contextlib.contextmanager
def validation_hook(val_dataset, callback: Callable[[int, dict], None]) -> Iterator[None]:
    """Call ``callback(evaluation_index, val_metrics)`` after each per-epoch validation of
    ``train_one`` on ``val_dataset`` (an interim hook on the training module's ``evaluate``,
    until the benchmark's run API offers an ``epoch_callback``)."""
    from .. import train as train_module

    original = train_module.evaluate
    count = [0]

    def hooked(model, dataset, calculator, config, return_embeddings=False):
        out = original(model, dataset, calculator, config, return_embeddings=return_embeddings)
        if dataset is val_dataset and not return_embeddings:
            count[0] += 1
            callback(count[0], out)
        return out

    train_module.evaluate = hooked
    try:
        yield
    finally:
        train_module.evaluate = original


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
        self._splits: list | None = None

    def splits(self) -> list:
        if self._splits is None:
            from ..data import BenchmarkData, load_benchmark_data

            c = self.config
            data = load_benchmark_data(
                c.dataset,
                root=c.root,
                image_size=c.image_size,
                val_fraction=c.val_fraction,
                split_seed=c.split_seed,
                download=c.download,
                max_train_classes=c.max_train_classes,
                channels=c.channels,
                dataset_kwargs=c.dataset_kwargs,
                progress=False,
            )
            if self.folds > 1:
                self._splits = class_folds(data, self.folds, c.split_seed)
            else:
                if len(data.val) == 0:
                    raise ValueError("tuning needs validation classes: --val-fraction > 0")
                fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
                fields.update(test=data.val, test_classes=data.val_classes)
                self._splits = [BenchmarkData(**fields)]
        return self._splits

    def __call__(self, trial: TrialConfig, reporter: Reporter) -> float:
        import torch

        from ..train import train_one

        config = trial_benchmark_config(
            self.config, trial.loss, trial.params, [self.trial_seed], str(trial.output)
        )
        config = dataclasses.replace(config, progress=False)
        splits = self.splits()
        metric = config.primary_metric
        threads = torch.get_num_threads()
        if config.threads_or_default is not None:
            torch.set_num_threads(config.threads_or_default)
        scores = []
        try:
            for k, data in enumerate(splits):
                per_fold = max(1, config.epochs // config.eval_every + 1)

                def report(i: int, val: dict, k: int = k) -> None:
                    reporter.report(float(val[metric]), k * per_fold + i)

                with validation_hook(data.val, report):
                    result = train_one(
                        config, data, trial.loss, self.trial_seed, trial.output / f"fold_{k}"
                    )
                scores.append(float(result["best_val_score"]))
        finally:
            torch.set_num_threads(threads)
        return float(np.mean(scores))
