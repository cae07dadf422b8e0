"""The report's answer to "does this loss beat Proxy-Anchor?": seed-paired differences with a
Student-t interval, the paired difference and equivalence (TOST) t-tests, Holm's adjustment over
the comparisons, the seeds a decision would need and the verdicts, checked against plain
arithmetic and t tables; the report section and CSV, and the margin as a report setting."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from benchmark_helpers import tiny_config

from pml_proxies.benchmark import report
from pml_proxies.benchmark.config import DEFAULT_EQUIVALENCE_MARGIN, NON_PROTOCOL_FIELDS
from pml_proxies.benchmark.runner import run_benchmark
from pml_proxies.benchmark.stats import (
    NOT_TESTED,
    holm,
    paired_difference,
    paired_differences,
    paired_t_tests,
    seeds_needed,
    verdict,
)

# t tables, 10 digits: T_975[df] = t_{0.975, df}, T_95 = t_{0.95, df}, T_80 = t_{0.80, df}
T_975 = {1: 12.70620474, 2: 4.30265273, 3: 3.18244631, 4: 2.77644511, 8: 2.30600414,
         9: 2.26215716}  # fmt: skip
T_95 = {1: 6.31375151, 2: 2.91998558, 3: 2.35336343, 4: 2.13184679}
T_80 = {8: 0.88895134, 9: 0.88340300}


def _reference(values: dict, baseline: dict) -> tuple[float, float, int]:
    diffs = [values[s] - baseline[s] for s in sorted(values) if s in baseline]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, T_975[n - 1] * sd / math.sqrt(n), n


def test_paired_difference_matches_plain_arithmetic_over_the_common_seeds():
    values = {0: 0.50, 1: 0.60, 2: 0.55, 7: 0.9}  # seed 7 has no baseline: left out
    baseline = {0: 0.40, 1: 0.58, 2: 0.50, 3: 0.1}
    got = paired_difference(values, baseline)
    want = _reference({s: values[s] for s in (0, 1, 2)}, baseline)
    assert got[2] == want[2] == 3
    assert got[0] == pytest.approx(want[0], abs=1e-12)
    assert got[1] == pytest.approx(want[1], rel=1e-8)
    assert paired_differences(values, baseline).tolist() == pytest.approx([0.10, 0.02, 0.05])


def test_paired_difference_with_one_common_seed_has_no_interval():
    mean, half, n = paired_difference({0: 0.5, 1: 0.7}, {1: 0.6})
    assert n == 1 and mean == pytest.approx(0.1) and math.isnan(half)
    assert all(math.isnan(p) for p in paired_t_tests([0.1], 0.01))


# ------------------------------------------------------------------ Holm
def test_holm_against_a_hand_worked_example():
    # Wikipedia's Holm-Bonferroni example: p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted:
    # 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max so far 0.06.
    # At alpha 0.05 H1 and H4 are rejected, H2 and H3 are not (0.03 > 0.05 / 2).
    got = holm([0.01, 0.04, 0.03, 0.005])
    assert got.tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert (got <= 0.05).tolist() == [True, False, False, True]


def test_holm_clips_at_one_and_skips_untested_hypotheses():
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # 2 x 0.5 = 1, then max(1, 0.6)
    got = holm([0.01, math.nan, 0.02])  # m = 2: 2 x 0.01, max(0.02, 1 x 0.02)
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)
    assert holm([]).size == 0
    with pytest.raises(ValueError, match="groups"):
        holm([0.1, 0.2], groups=["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([1.5])


def test_holm_with_exclusive_pairs_counts_the_losses_left():
    # losses A and B, each with a difference and an equivalence hypothesis (at most one true).
    # Sorted: 0.01 (A), 0.02 (B), 0.3 (B), 0.9 (A); losses holding a hypothesis from each step
    # on: 2, 2, 2, 1 -> 0.02, 0.04, 0.6, max(0.6, 0.9) = 0.9.
    got = holm([0.01, 0.3, 0.9, 0.02], groups=["A", "B", "A", "B"])
    assert got.tolist() == pytest.approx([0.02, 0.6, 0.9, 0.04], abs=1e-15)
    # plain Holm over the 4 hypotheses multiplies by 4, 3, 2, 1: 0.04, 0.06, 0.6, 0.9
    assert holm([0.01, 0.3, 0.9, 0.02]).tolist() == pytest.approx([0.04, 0.6, 0.9, 0.06])
    # one hypothesis per group is plain Holm
    p = np.random.default_rng(0).random(7)
    assert holm(p, groups=list("abcdefg")).tolist() == holm(p).tolist()


# ------------------------------------------------------------------ the t-tests
def _t2_cdf(t: float) -> float:
    """The t distribution's CDF with 2 degrees of freedom, in closed form."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paired_t_tests_against_plain_arithmetic(dtype):
    diffs = np.array([0.01, 0.03, 0.02], dtype=dtype)  # mean 0.02, sd 0.01, se 0.01 / sqrt(3)
    se = 0.01 / math.sqrt(3)
    p_difference, p_equivalence = paired_t_tests(diffs, 0.01)
    # float32 inputs hold the differences to ~1e-9 of 0.02 (a few ulps); the p-values follow
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert p_difference == pytest.approx(2 * (1 - _t2_cdf(0.02 / se)), abs=tol)
    lower = 1 - _t2_cdf((0.02 + 0.01) / se)  # H0: mean <= -0.01
    upper = _t2_cdf((0.02 - 0.01) / se)  # H0: mean >= 0.01
    assert p_equivalence == pytest.approx(max(lower, upper), abs=tol)


def test_tost_rejects_exactly_when_the_90_percent_interval_lies_inside_the_margin():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        n = int(rng.integers(2, 6))
        diffs = rng.normal(rng.normal(0, 0.01), 0.005, size=n)
        margin = 0.01
        mean, se = diffs.mean(), diffs.std(ddof=1) / math.sqrt(n)
        inside = abs(mean) + T_95[n - 1] * se < margin
        _, p = paired_t_tests(diffs, margin)
        if abs(abs(mean) + T_95[n - 1] * se - margin) > 1e-7:  # away from the boundary
            assert (p < 0.05) == inside
            seen.add(inside)
    assert seen == {True, False}  # both outcomes were exercised


def test_paired_t_tests_without_spread_are_decided_exactly():
    assert paired_t_tests([0.02, 0.02, 0.02], 0.01) == (0.0, 1.0)  # different, not within 0.01
    assert paired_t_tests([0.005, 0.005], 0.01) == (0.0, 0.0)  # different, but within 0.01
    assert paired_t_tests([0.0, 0.0], 0.01) == (1.0, 0.0)  # no difference, within the margin
    with pytest.raises(ValueError, match="margin"):
        paired_t_tests([0.1, 0.2], 0.0)


# ------------------------------------------------------------------ seeds needed
def test_seeds_needed_against_t_tables():
    # effect = SD (d = 1), two-sided 0.05, power 0.8. n = 10: sqrt(10) = 3.162 >= t_{.975,9} +
    # t_{.8,9} = 3.146; n = 9: 3.0 < t_{.975,8} + t_{.8,8} = 3.195. (The normal approximation,
    # ((1.96 + 0.842) / 1)^2 = 7.85, is too optimistic at few seeds.)
    assert math.sqrt(10) >= T_975[9] + T_80[9] and 3.0 < T_975[8] + T_80[8]
    assert seeds_needed(0.02, 0.02, 0.05) == 10
    assert seeds_needed(1.0, 1.0, 0.05) == 10  # scale-free
    # one-sided at 0.05 (equivalence): the t quantile t_{.95} instead of t_{.975}
    n = seeds_needed(0.02, 0.02, 0.05, sides=1)
    assert n < 10


@pytest.mark.parametrize("effect,sd", [(0.3, 1.0), (0.05, 0.2), (2.0, 1.0), (0.01, 0.5)])
def test_seeds_needed_is_the_smallest_n_that_suffices(effect, sd):
    from scipy import stats

    def enough(n):
        return effect * math.sqrt(n) / sd >= stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)

    n = seeds_needed(effect, sd, 0.05)
    assert enough(n) and (n == 2 or not enough(n - 1))
    assert n >= ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * sd / effect) ** 2


def test_seeds_needed_edge_cases():
    assert seeds_needed(0.0, 0.1, 0.05) == math.inf  # no effect: no number of seeds decides
    assert seeds_needed(-0.1, 0.1, 0.05) == math.inf
    assert seeds_needed(0.1, 0.0, 0.05) == 2
    assert math.isnan(seeds_needed(0.1, math.nan, 0.05))


# ------------------------------------------------------------------ verdicts
@pytest.mark.parametrize(
    ("mean", "p_difference", "p_equivalence", "want"),
    [(0.02, 0.01, 1.0, "better"), (-0.02, 0.05, 1.0, "worse"), (0.02, 0.01, 0.01, "better"),
     (0.001, 0.3, 0.04, "equivalent within ±1"), (0.001, 0.3, 0.06, "inconclusive"),
     (0.02, 0.051, 0.2, "inconclusive"), (0.01, math.nan, math.nan, NOT_TESTED)],
)  # fmt: skip
def test_verdicts(mean, p_difference, p_equivalence, want):
    assert verdict(mean, p_difference, p_equivalence, "1") == want


# ------------------------------------------------------------------ the comparison table
def _runs() -> pd.DataFrame:
    rows = []
    for loss, base in (("proxy_anchor", 0.30), ("mpa", 0.35), ("vcpa", 0.10), ("mpa_dw", 0.30)):
        for seed, noise in ((0, 0.00), (1, 0.02), (2, -0.01)):
            close = (0.001, -0.002, 0.0005)[seed] if loss == "mpa_dw" else 0.0
            rows.append({"loss": loss, "seed": seed, "best_epoch": 1, "train_time_s": 1.0,
                         "precision_at_1": base + 0.3 + noise * (2 if loss == "mpa" else 1),
                         "mean_average_precision_at_r": base + noise + close})  # fmt: skip
    return pd.DataFrame(rows)


def test_comparison_table_against_the_baseline():
    runs = _runs()
    metrics = report.comparison_metrics("mean_average_precision_at_r", runs)
    assert metrics == ["mean_average_precision_at_r", "precision_at_1"]
    table = report.comparison_table(runs, ["mpa", "proxy_anchor", "vcpa", "mpa_dw"], metrics)
    assert list(table["loss"]) == ["mpa", "vcpa", "mpa_dw"]  # not compared with itself
    by = table.set_index("loss")
    m = "mean_average_precision_at_r"
    # the same noise on every seed: the paired MAP@R difference is exact, its interval zero
    assert by.loc["mpa", f"{m}_diff"] == pytest.approx(0.05)
    assert by.loc["mpa", f"{m}_ci95"] == pytest.approx(0.0, abs=1e-12)
    assert by.loc["mpa", "verdict"] == "better" and by.loc["vcpa", "verdict"] == "worse"
    p1 = _reference(
        dict(zip(range(3), runs[runs.loss == "mpa"].precision_at_1)),
        dict(zip(range(3), runs[runs.loss == "proxy_anchor"].precision_at_1)),
    )
    assert by.loc["mpa", "precision_at_1_diff"] == pytest.approx(p1[0])
    assert by.loc["mpa", "precision_at_1_ci95"] == pytest.approx(p1[1], rel=1e-8)
    # mpa_dw: differences 0.001, -0.002, 0.0005 (x100: 0.1, -0.2, 0.05 points)
    diffs = [0.001, -0.002, 0.0005]
    p_diff, p_eq = paired_t_tests(diffs, DEFAULT_EQUIVALENCE_MARGIN / 100)
    assert by.loc["mpa_dw", "p_difference"] == pytest.approx(p_diff)
    assert by.loc["mpa_dw", "p_equivalence"] == pytest.approx(p_eq)
    # one Holm family of the 6 tests, grouped by loss
    raw = [*table["p_difference"], *table["p_equivalence"]]
    adjusted = holm(raw, [*table["loss"]] * 2)
    assert table["p_difference_holm"].tolist() == pytest.approx(adjusted[:3].tolist())
    assert table["p_equivalence_holm"].tolist() == pytest.approx(adjusted[3:].tolist())
    assert by.loc["mpa_dw", "p_equivalence_holm"] <= 0.05
    assert by.loc["mpa_dw", "verdict"] == "equivalent within ±1"
    sd = float(np.std(diffs, ddof=1))
    mean = sum(diffs) / 3
    assert by.loc["mpa_dw", "seeds_for_difference"] == seeds_needed(abs(mean), sd, 0.05 / 3)
    assert by.loc["mpa_dw", "seeds_for_equivalence"] == seeds_needed(
        0.01 - abs(mean), sd, 0.05 / 3, sides=1
    )
    assert (table["equivalence_margin"] == 1.0).all()
    md = report.comparison_markdown(table, metrics)
    assert "| mpa | 3 | +5.0 ± 0.0 | <0.001 | 1.000 |" in md and "| better |" in md
    assert "| vcpa | 3 | -20.0 ± 0.0 |" in md and "| worse |" in md
    assert "Holm-adjusted over the 6 tests of the 3 loss(es)" in md
    assert "bit-reproducible on one machine only" in md
    assert "With 3 seeds (the default is 10), a verdict whose adjusted p-value" in md
    ten = table.assign(paired_seeds=10)
    assert "the default is" not in report.comparison_markdown(ten, metrics)


def test_the_margin_decides_equivalence():
    runs = _runs()
    metrics = ["mean_average_precision_at_r"]
    order = ["proxy_anchor", "mpa_dw"]
    tight = report.comparison_table(runs, order, metrics, margin=0.2)  # 0.2 MAP@R points
    assert tight["verdict"].tolist() == ["inconclusive"]
    assert tight["equivalence_margin"].tolist() == [0.2]
    md = report.comparison_markdown(tight, metrics)
    n_diff, n_eq = tight["seeds_for_difference"][0], tight["seeds_for_equivalence"][0]
    assert f"inconclusive (difference: ~{n_diff} seeds; equivalence: ~{n_eq} seeds)" in md
    assert "Holm p (equivalence ±0.2)" in md
    wide = report.comparison_table(runs, order, metrics, margin=5.0)
    assert wide["verdict"].tolist() == ["equivalent within ±5"]
    never = report.comparison_table(runs, ["proxy_anchor", "vcpa"], metrics, margin=0.1)
    assert never["seeds_for_equivalence"].tolist() == [math.inf]


def test_an_inconclusive_loss_whose_mean_exceeds_the_margin_says_so():
    runs = _runs()
    noisy = runs.loss == "mpa"
    runs.loc[noisy, "mean_average_precision_at_r"] += [0.0, 0.06, -0.05]
    table = report.comparison_table(runs, ["proxy_anchor", "mpa"], ["mean_average_precision_at_r"])
    assert table["verdict"].tolist() == ["inconclusive"]
    md = report.comparison_markdown(table, ["mean_average_precision_at_r"])
    assert "equivalence: never (mean beyond ±1))" in md


def test_no_comparison_without_the_baseline():
    runs = _runs()
    runs = runs[runs.loss != "proxy_anchor"]
    assert report.comparison_table(runs, ["mpa", "vcpa"], ["precision_at_1"]).empty


@pytest.mark.parametrize("with_baseline", [True, False])
def test_the_report_compares_every_loss_with_proxy_anchor(tmp_path, with_baseline):
    losses = ["mpa", "proxy_anchor"] if with_baseline else ["mpa", "proxy_nca"]
    out = run_benchmark(tiny_config(tmp_path / "out", losses, seeds=[0, 1]))
    text = out["files"]["report_md"].read_text()
    csv = tmp_path / "out" / "comparison.csv"
    if not with_baseline:
        assert "seed-paired" not in text and not csv.exists()
        return
    assert "## Against proxy_anchor (seed-paired differences)" in text
    assert "`comparison.csv`" in text  # listed among the files
    table = pd.read_csv(csv)
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    m = "mean_average_precision_at_r"
    mpa = dict(zip(runs[runs.loss == "mpa"].seed, runs[runs.loss == "mpa"][m]))
    pa = dict(zip(runs[runs.loss == "proxy_anchor"].seed, runs[runs.loss == "proxy_anchor"][m]))
    want = _reference(mpa, pa)
    (row,) = table.to_dict("records")
    assert row["loss"] == "mpa" and row["paired_seeds"] == 2
    assert row[f"{m}_diff"] == pytest.approx(want[0], abs=1e-12)
    assert row[f"{m}_ci95"] == pytest.approx(want[1], rel=1e-8, abs=1e-12)
    p_diff, p_eq = paired_t_tests([mpa[s] - pa[s] for s in (0, 1)], 0.01)
    # one loss compared: Holm changes nothing
    assert row["p_difference"] == pytest.approx(p_diff) == pytest.approx(row["p_difference_holm"])
    assert row["verdict"] == verdict(want[0], p_diff, p_eq, "1")


def test_the_margin_is_a_report_setting_report_only_may_change(tmp_path):
    assert "equivalence_margin" in NON_PROTOCOL_FIELDS
    out = tmp_path / "out"
    config = tiny_config(out, ["mpa", "proxy_anchor"], seeds=[0, 1])
    assert "equivalence_margin" not in config.protocol()
    run_benchmark(config)
    protocol = (out / "protocol.json").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    wide = tiny_config(out, ["mpa", "proxy_anchor"], seeds=[0, 1], equivalence_margin=90.0)
    assert wide.fingerprint("mpa") == config.fingerprint("mpa")
    run_benchmark(wide, report_only=True)
    assert (out / "protocol.json").read_text() == protocol
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")} == stamps
    assert pd.read_csv(out / "comparison.csv")["equivalence_margin"].tolist() == [90.0]
    assert json.loads((out / "config.json").read_text())["equivalence_margin"] == 90.0
    assert "Holm p (equivalence ±90)" in (out / "report.md").read_text()


def test_the_margin_option_is_checked_and_reaches_the_config(tmp_path, capsys):
    from pml_proxies.benchmark.cli import build_parser, config_from_args, main
    from pml_proxies.benchmark.tune.cli import build_parser as tune_parser

    args = build_parser().parse_args(["--equivalence-margin", "0.5"])
    assert config_from_args(args, []).equivalence_margin == 0.5
    assert tune_parser().parse_args(["--equivalence-margin", "2"]).equivalence_margin == 2.0
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(SystemExit) as info:
            main(["--equivalence-margin", bad, "--output", str(tmp_path / "never")])
        assert info.value.code == 2 and "--equivalence-margin" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_difference_that_rounds_to_zero_is_not_printed_negative():
    table = pd.DataFrame([{"loss": "mpa", "paired_seeds": 1, "precision_at_1_diff": -1e-4,
                           "precision_at_1_ci95": math.nan, "p_difference": math.nan,
                           "p_difference_holm": math.nan, "p_equivalence": math.nan,
                           "p_equivalence_holm": math.nan, "seeds_for_difference": math.nan,
                           "seeds_for_equivalence": math.nan, "equivalence_margin": 1.0,
                           "verdict": NOT_TESTED}])  # fmt: skip
    md = report.comparison_markdown(table, ["precision_at_1"])
    assert "| mpa | 1 | +0.0 | - | - | not tested (one seed) |" in md
    assert "No test: a difference needs two paired seeds or more." in md


def test_ten_seeds_by_default_and_three_seed_folders_are_extended(tmp_path):
    from pml_proxies.benchmark.cli import build_parser, config_from_args

    default = config_from_args(build_parser().parse_args([]), [])
    assert default.seeds == list(range(10))
    assert "(default: 0,1,2,3,4,5,6,7,8,9)" in " ".join(build_parser().format_help().split())
    assert config_from_args(build_parser().parse_args(["--seeds", "0,1,2"]), []).seeds == [0, 1, 2]
    # seeds are not part of the protocol: a folder made with 3 seeds is extended by the default,
    # its runs reused, not refused
    out = tmp_path / "old"
    run_benchmark(tiny_config(out, ["proxy_anchor"], seeds=[0, 1, 2]))
    protocol = (out / "protocol.json").read_text()
    res = run_benchmark(tiny_config(out, ["proxy_anchor"], seeds=default.seeds))
    assert res["skipped"] == 3 and sorted(res["runs"]["seed"]) == list(range(10))
    assert (out / "protocol.json").read_text() == protocol
