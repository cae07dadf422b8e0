"""The one registry of the benchmark's retrieval metrics: name, label, order, direction.

Config, training (model selection), the report and the plots all read metric facts from here.
A metric name is the key ``pml_proxies.AccuracyCalculator`` returns (``precision_at_1``,
``recall_at_4``, ``ndcg_at_10``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One retrieval metric of the benchmark.

    Attributes:
        name: the key in the accuracy calculator's output (e.g. ``"recall_at_4"``).
        label: short label for tables and plots (e.g. ``"R@4"``).
        order: sort key of the tables and plots (P@1, R@k by k, RP, MAP@R, nDCG@k by k).
        higher_is_better: direction of model selection (all retrieval metrics: ``True``).
        calculator_metric: the accuracy calculator's metric that produces it (``"recall_at_k"``).
        k: the ``k`` of ``@k`` metrics, else ``None``.
        same_as: the name of a metric equal to this one by definition (R@1 is P@1), else ``None``.
    """

    name: str
    label: str
    order: tuple[int, int]
    higher_is_better: bool = True
    calculator_metric: str = ""
    k: int | None = None
    same_as: str | None = None


#: metrics computed in every benchmark, whatever the ks: name -> (label, order group)
FIXED_METRICS: dict[str, tuple[str, int]] = {
    "precision_at_1": ("P@1", 0),
    "r_precision": ("RP", 2),
    "mean_average_precision_at_r": ("MAP@R", 3),
}
#: metrics with a k: name prefix -> (label prefix, order group, calculator metric)
K_METRICS: dict[str, tuple[str, int, str]] = {
    "recall_at_": ("R@", 1, "recall_at_k"),
    "ndcg_at_": ("nDCG@", 4, "ndcg_at_k"),
}
_K_NAME = re.compile(r"^(recall_at_|ndcg_at_)(\d+)$")


def metric(name: str) -> Metric:
    """The :class:`Metric` called ``name``; ``ValueError`` for an unknown name."""
    if name in FIXED_METRICS:
        label, group = FIXED_METRICS[name]
        return Metric(name, label, (group, 0), calculator_metric=name)
    match = _K_NAME.match(name)
    if match is None:
        known = ", ".join([*FIXED_METRICS, *(p + "<k>" for p in K_METRICS)])
        raise ValueError(f"unknown metric {name!r}; known metrics: {known}")
    prefix, k = match.group(1), int(match.group(2))
    label, group, calculator_metric = K_METRICS[prefix]
    same_as = "precision_at_1" if prefix == "recall_at_" and k == 1 else None
    return Metric(name, f"{label}{k}", (group, k), True, calculator_metric, k, same_as)


def benchmark_metrics(recall_ks: Sequence[int], ndcg_ks: Sequence[int]) -> tuple[Metric, ...]:
    """Every metric a benchmark with these ks computes, in display order."""
    names = [*FIXED_METRICS]
    names += [f"recall_at_{k}" for k in recall_ks]
    names += [f"ndcg_at_{k}" for k in ndcg_ks]
    return tuple(sorted({metric(n) for n in names}, key=lambda m: m.order))


def metric_label(name: str) -> str:
    """Short label of metric ``name`` (the name itself when it is not a benchmark metric)."""
    try:
        return metric(name).label
    except ValueError:
        return name


def metric_order(names: Iterable[str]) -> list[str]:
    """``names`` in display order; names that are not benchmark metrics come last, sorted."""
    names = set(names)
    known = sorted((metric(n) for n in names if _is_metric(n)), key=lambda m: m.order)
    return [m.name for m in known] + sorted(n for n in names if not _is_metric(n))


def _is_metric(name: str) -> bool:
    return name in FIXED_METRICS or _K_NAME.match(name) is not None
