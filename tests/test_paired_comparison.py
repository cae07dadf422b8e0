"""The report's answer to "does this loss beat Proxy-Anchor?": seed-paired differences with a
Student-t interval, checked against plain arithmetic, and the report section and CSV."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from benchmark_helpers import tiny_config

from pml_proxies.benchmark import report
from pml_proxies.benchmark.runner import run_benchmark
from pml_proxies.benchmark.stats import paired_difference, paired_verdict

T_975 = {1: 12.70620474, 2: 4.30265273, 3: 3.18244631}  # t tables, 10 digits


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


def test_paired_difference_with_one_common_seed_has_no_interval():
    mean, half, n = paired_difference({0: 0.5, 1: 0.7}, {1: 0.6})
    assert n == 1 and mean == pytest.approx(0.1) and math.isnan(half)
    assert paired_verdict(mean, half) == "not tested (one seed)"


@pytest.mark.parametrize(
    ("mean", "half", "verdict"),
    [(0.02, 0.01, "above"), (-0.02, 0.01, "below"), (0.01, 0.02, "no difference shown"),
     (-0.01, 0.02, "no difference shown"), (math.nan, math.nan, "not tested (one seed)")],
)  # fmt: skip
def test_verdicts(mean, half, verdict):
    assert paired_verdict(mean, half) == verdict


def _runs() -> pd.DataFrame:
    rows = []
    for loss, base in (("proxy_anchor", 0.30), ("mpa", 0.35), ("vcpa", 0.10)):
        for seed, noise in ((0, 0.00), (1, 0.02), (2, -0.01)):
            rows.append({"loss": loss, "seed": seed, "best_epoch": 1, "train_time_s": 1.0,
                         "precision_at_1": base + 0.3 + noise * (2 if loss == "mpa" else 1),
                         "mean_average_precision_at_r": base + noise})  # fmt: skip
    return pd.DataFrame(rows)


def test_comparison_table_against_the_baseline():
    runs = _runs()
    metrics = report.comparison_metrics("mean_average_precision_at_r", runs)
    assert metrics == ["mean_average_precision_at_r", "precision_at_1"]
    table = report.comparison_table(runs, ["mpa", "proxy_anchor", "vcpa"], metrics)
    assert list(table["loss"]) == ["mpa", "vcpa"]  # the baseline is not compared with itself
    by = table.set_index("loss")
    # the same noise on every seed: the paired MAP@R difference is exact, its interval zero
    assert by.loc["mpa", "mean_average_precision_at_r_diff"] == pytest.approx(0.05)
    assert by.loc["mpa", "mean_average_precision_at_r_ci95"] == pytest.approx(0.0, abs=1e-12)
    assert by.loc["mpa", "verdict"] == "above" and by.loc["vcpa", "verdict"] == "below"
    p1 = _reference(
        dict(zip(range(3), runs[runs.loss == "mpa"].precision_at_1)),
        dict(zip(range(3), runs[runs.loss == "proxy_anchor"].precision_at_1)),
    )
    assert by.loc["mpa", "precision_at_1_diff"] == pytest.approx(p1[0])
    assert by.loc["mpa", "precision_at_1_ci95"] == pytest.approx(p1[1], rel=1e-8)
    md = report.comparison_markdown(table, metrics)
    assert "| mpa | 3 | +5.0 ± 0.0 |" in md and "| vcpa | 3 | -20.0 ± 0.0 |" in md


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
    assert row["verdict"] == paired_verdict(want[0], want[1])


def test_a_difference_that_rounds_to_zero_is_not_printed_negative():
    table = pd.DataFrame([{"loss": "mpa", "paired_seeds": 1, "precision_at_1_diff": -1e-4,
                           "precision_at_1_ci95": math.nan, "verdict": "not tested (one seed)"}])  # fmt: skip
    assert "| mpa | 1 | +0.0 | not tested (one seed) |" in report.comparison_markdown(
        table, ["precision_at_1"]
    )
