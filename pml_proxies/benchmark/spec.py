"""The resolved specification of one benchmark run (one loss, one seed).

A :class:`RunSpec` is built once per (loss, seed) from a :class:`BenchmarkConfig` by
:func:`build_run_spec`. Every fact a run depends on is resolved there (the loss keyword arguments
the loss actually gets, the protocol fingerprint, the input channels, the metric names, the trunk
recipe, the proxy learning-rate multiplier) and everything downstream (training, selection,
evaluation, persistence, report) reads it instead of recomputing it. A tuning trial is a spec
with overrides of the loss arguments and of the proxy learning-rate multiplier.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .config import BenchmarkConfig, protocol_fingerprint
from .losses import LOSSES, convert_loss_params, effective_kwargs, loss_kwargs
from .metrics import benchmark_metrics


@dataclass(frozen=True)
class TrunkRecipe:
    """How the trunk is built and trained: ``name``, ImageNet weights (``pretrained``), the
    trunk / embedder learning rate ``lr``, ``warmup_epochs`` with a frozen trunk, frozen
    BatchNorm (``freeze_bn``)."""

    name: str
    pretrained: bool
    lr: float
    warmup_epochs: int
    freeze_bn: bool


@dataclass(frozen=True)
class RunSpec:
    """Everything one run (``loss``, ``seed``) depends on, resolved once.

    Attributes:
        loss: registry name of the loss.
        seed: the run's seed (network initialisation, batches, augmentation).
        config: the benchmark's config with this run's overrides applied (its
            ``proxy_lr_mult`` and ``loss_params[loss]`` are the run's).
        loss_overrides: the converted overrides of the loss arguments (beyond the registry's
            paper and data-set defaults).
        loss_kwargs: the keyword arguments given to the loss (registry defaults, data-set
            defaults, overrides).
        effective_loss_kwargs: every constructor argument the loss uses, its class's defaults
            included (what reports show).
        fingerprint: protocol fingerprint of the run (a finished run is reused only when it
            matches).
        channels: input channels of the trunk (1 or 3).
        image_size: image side in pixels.
        metric_names: the retrieval metrics computed, in display order (:mod:`.metrics`).
        primary_metric: the validation metric of model selection.
        trunk: the :class:`TrunkRecipe`.
        proxy_lr_mult: learning-rate multiplier of the loss parameters.
        source: where the loss's defaults come from.
    """

    loss: str
    seed: int
    config: BenchmarkConfig
    loss_overrides: Mapping[str, Any]
    loss_kwargs: Mapping[str, Any]
    effective_loss_kwargs: Mapping[str, Any]
    fingerprint: str
    channels: int
    image_size: int
    metric_names: tuple[str, ...]
    primary_metric: str
    trunk: TrunkRecipe
    proxy_lr_mult: float
    source: str


def build_run_spec(
    config: BenchmarkConfig,
    loss: str,
    seed: int,
    *,
    loss_overrides: Mapping[str, Any] | None = None,
    proxy_lr_mult: float | None = None,
) -> RunSpec:
    """The :class:`RunSpec` of ``loss`` with ``seed`` under ``config``.

    Args:
        config: the benchmark's configuration.
        loss: a registry name (:data:`~pml_proxies.benchmark.losses.LOSS_NAMES`).
        seed: the run's seed.
        loss_overrides: per-run overrides of the loss arguments, applied over
            ``config.loss_params[loss]`` (a tuning trial's values).
        proxy_lr_mult: per-run learning-rate multiplier of the loss parameters (``None``: the
            config's).

    Raises:
        ValueError: an unknown loss, or an override the loss's constructor does not accept (the
            message names the loss, the argument and the accepted type).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    raw = dict(config.loss_params.get(loss, {}))
    raw.update(loss_overrides or {})
    overrides = convert_loss_params(loss, raw)
    params = {k: v for k, v in config.loss_params.items() if k != loss}
    if overrides:
        params[loss] = overrides
    changes: dict[str, Any] = {"loss_params": params}
    if proxy_lr_mult is not None:
        changes["proxy_lr_mult"] = proxy_lr_mult
    run_config = dataclasses.replace(config, **changes)
    return RunSpec(
        loss=loss,
        seed=int(seed),
        config=run_config,
        loss_overrides=MappingProxyType(overrides),
        loss_kwargs=MappingProxyType(loss_kwargs(loss, config.dataset, overrides)),
        effective_loss_kwargs=MappingProxyType(effective_kwargs(loss, config.dataset, overrides)),
        fingerprint=protocol_fingerprint(run_config.protocol(), loss, overrides),
        channels=run_config.channels,
        image_size=run_config.image_size_or_default,
        metric_names=tuple(
            m.name for m in benchmark_metrics(run_config.recall_ks, run_config.ndcg_ks)
        ),
        primary_metric=run_config.primary_metric,
        trunk=TrunkRecipe(
            name=run_config.trunk,
            pretrained=bool(run_config.pretrained),
            lr=float(run_config.lr_or_default),
            warmup_epochs=int(run_config.warmup_epochs_or_default),
            freeze_bn=bool(run_config.freeze_bn_or_default),
        ),
        proxy_lr_mult=float(run_config.proxy_lr_mult),
        source=LOSSES[loss].source,
    )


def build_run_specs(config: BenchmarkConfig) -> list[RunSpec]:
    """The specs of every (loss, seed) of ``config``, losses outer, seeds inner."""
    return [build_run_spec(config, loss, seed) for loss in config.losses for seed in config.seeds]
