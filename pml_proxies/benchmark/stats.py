"""Summary statistics of the benchmark: mean and Student-t confidence intervals over seeds, and
the seed-paired tests of the comparison with a baseline (difference and equivalence t-tests,
Holm's adjustment over the comparisons, the seeds a decision would need)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats


def mean_confidence_interval(
    values: ArrayLike, confidence: float = 0.95
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
    diffs = paired_differences(values, baseline)
    mean, half, _, _ = mean_confidence_interval(diffs, confidence)
    return mean, half, int(diffs.size)


def paired_differences(values: Mapping[int, float], baseline: Mapping[int, float]) -> np.ndarray:
    """The per-seed differences ``values[s] - baseline[s]`` (float64) over the seeds both have,
    in seed order; NaN differences are dropped."""
    seeds = sorted(set(values) & set(baseline))
    diffs = np.asarray([float(values[s]) - float(baseline[s]) for s in seeds], dtype=np.float64)
    return diffs[~np.isnan(diffs)]


def paired_t_tests(diffs: ArrayLike, margin: float) -> tuple[float, float]:
    """The two paired t-tests of the per-seed differences ``diffs`` (``n`` of them, mean ``d``,
    sample SD ``s``, standard error ``se = s / sqrt(n)``, ``n - 1`` degrees of freedom):

    * difference, ``H0: mean = 0``, two-sided: ``p = 2 * P(T > |d| / se)``;
    * equivalence within ``±margin`` (TOST, Schuirmann 1987), ``H0: |mean| >= margin``: the
      larger p of the two one-sided tests, ``P(T > (d + margin) / se)`` of ``H0: mean <= -margin``
      and ``P(T < (d - margin) / se)`` of ``H0: mean >= margin``; both reject at ``alpha`` exactly
      when the ``1 - 2 alpha`` t-interval lies inside ``(-margin, margin)``.

    With ``se = 0`` (the same difference on every seed) the tests are decided exactly: ``p = 0``
    for a difference when ``d != 0``, else 1; for equivalence ``p = 0`` when ``|d| < margin``,
    else 1.

    Returns:
        ``(p of the difference, p of the equivalence)``; NaN with fewer than two differences.
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    x = np.asarray(diffs, dtype=np.float64).ravel()
    n = x.size
    if n < 2:
        return math.nan, math.nan
    mean = float(x.mean())
    se = float(x.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return (0.0 if mean != 0 else 1.0), (0.0 if abs(mean) < margin else 1.0)
    t = scipy_stats.t(df=n - 1)
    p_difference = float(2 * t.sf(abs(mean) / se))
    p_equivalence = max(float(t.sf((mean + margin) / se)), float(t.cdf((mean - margin) / se)))
    return p_difference, p_equivalence


def holm(p_values: Sequence[float], groups: Sequence | None = None) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values: reject ``H_i`` at family-wise error rate
    ``alpha`` exactly when ``adjusted[i] <= alpha``, whatever the dependence of the tests.

    With the p-values sorted, ``p_(1) <= ... <= p_(m)``, ``adjusted_(k) = min(1, max_{j <= k}
    c_j p_(j))`` where ``c_j`` counts the hypotheses not yet rejected at step ``j``
    (``m - j + 1``). With ``groups`` (one label per p-value) whose hypotheses are mutually
    exclusive (at most one of a group can be true, e.g. a loss's "no difference" and "not
    equivalent" hypotheses), ``c_j`` counts instead the groups that still hold a hypothesis of
    step ``j`` or later: the logically constrained Holm test of Shaffer (1986), which keeps the
    family-wise error rate at ``alpha`` over all the groups' hypotheses. One hypothesis per group
    is plain Holm. NaN p-values (no test) are left NaN and are not counted.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    labels = np.arange(p.size) if groups is None else np.asarray(list(groups), dtype=object)
    if labels.size != p.size:
        raise ValueError(f"groups has {labels.size} labels for {p.size} p-values")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    out = np.full(p.size, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    remaining, seen = np.empty(order.size), set()
    for k in range(order.size - 1, -1, -1):  # groups holding a hypothesis of step k or later
        seen.add(labels[order[k]])
        remaining[k] = len(seen)
    out[order] = np.minimum(1.0, np.maximum.accumulate(remaining * p[order]))
    return out


def seeds_needed(effect: float, sd: float, alpha: float, power: float = 0.8, sides: int = 2):
    """The number of seeds a paired t-test at level ``alpha`` would need to reject with
    probability ``power`` if the true effect were ``effect`` and the SD of the per-seed
    differences ``sd`` (the observed ones: a rough guide, observed effects are inflated on
    average).

    The t approximation of the power (the noncentral t replaced by a shifted central t): the
    smallest ``n >= 2`` with ``effect * sqrt(n) / sd >= t_{1 - alpha / sides, n - 1} + t_{power,
    n - 1}``; its normal limit is ``n = ((z_{1 - alpha / sides} + z_{power}) sd / effect)^2``.
    For a difference, ``effect = |mean difference|`` and ``sides = 2``; for equivalence within
    ``±margin`` (TOST), ``effect = margin - |mean difference|`` and ``sides = 1`` (the one-sided
    test at the nearer margin decides).

    Returns:
        ``n`` (an ``int``); ``inf`` when ``effect <= 0`` (no number of seeds decides at this
        mean); 2 when ``sd == 0``; NaN when ``sd`` or ``effect`` is NaN.
    """
    if math.isnan(effect) or math.isnan(sd):
        return math.nan
    if effect <= 0:
        return math.inf
    if sd == 0:
        return 2
    quantile = 1 - alpha / sides

    def enough(n: int) -> bool:
        t = scipy_stats.t(df=n - 1)
        return effect * math.sqrt(n) / sd >= t.ppf(quantile) + t.ppf(power)

    z = scipy_stats.norm.ppf(quantile) + scipy_stats.norm.ppf(power)
    low = max(2, math.floor((z * sd / effect) ** 2))  # t quantiles exceed z: never enough below
    if enough(low):
        return low
    high = 2 * low
    while not enough(high):
        low, high = high, 2 * high
    while high - low > 1:  # enough(high), not enough(low); enough() is monotone in n
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


#: a verdict without a test (fewer than two paired seeds)
NOT_TESTED = "not tested (one seed)"


def verdict(mean: float, p_difference: float, p_equivalence: float, margin_text: str,
            alpha: float = 0.05) -> str:  # fmt: skip
    """``"better"`` / ``"worse"`` when the (adjusted) difference p-value is at most ``alpha``,
    else ``"equivalent within ±<margin_text>"`` when the (adjusted) equivalence p-value is, else
    ``"inconclusive"``; :data:`NOT_TESTED` without a test."""
    if math.isnan(p_difference):
        return NOT_TESTED
    if p_difference <= alpha:
        return "better" if mean > 0 else "worse"
    if p_equivalence <= alpha:
        return f"equivalent within ±{margin_text}"
    return "inconclusive"
