"""Summary statistics of the benchmark: mean and Student-t confidence intervals over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_confidence_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float, float]:
    """Mean and two-sided Student-t confidence interval of ``values`` (one value per seed).

    ``half_width = t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation (``ddof = 1``). NaN values are dropped. With a single value the interval is
    undefined: the half width is NaN.

    Returns:
        ``(mean, half_width, low, high)``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * sem
    return mean, half, mean - half, mean + half


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> tuple[float, float, int]:
    """Mean and Student-t confidence half width of the per-seed differences ``values[s] -
    baseline[s]`` over the seeds ``s`` both have (a seed fixes the initial network and the
    batches, so the difference removes what the seeds share); NaN values are dropped.

    Returns:
        ``(mean difference, half width, number of paired seeds)``; the half width is NaN with
        fewer than two paired seeds.
    """
    seeds = sorted(set(values) & set(baseline))
    diffs = [float(values[s]) - float(baseline[s]) for s in seeds]
    mean, half, _, _ = mean_confidence_interval(diffs, confidence)
    return mean, half, int(np.count_nonzero(~np.isnan(np.asarray(diffs, dtype=np.float64))))


def paired_verdict(mean: float, half: float) -> str:
    """``"above"`` / ``"below"`` when the interval ``mean ± half`` excludes 0, ``"no difference
    shown"`` when it holds 0, ``"not tested (one seed)"`` without an interval."""
    if math.isnan(mean) or math.isnan(half):
        return "not tested (one seed)"
    if mean - half > 0:
        return "above"
    if mean + half < 0:
        return "below"
    return "no difference shown"
