"""Tests of the benchmark's report.md (sections holding computed values, caveats, relative
paths), Proxy-ISA's statistics in record-keeper, --report-only and non-terminal progress."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_metric_learning
import torch
from benchmark_helpers import tiny_config

import pml_proxies
from pml_proxies.benchmark import BenchmarkConfig, run_benchmark
from pml_proxies.benchmark.cli import main
from pml_proxies.benchmark.data import load_benchmark_data
from pml_proxies.benchmark.report import (
    caveats,
    chance_precision,
    loss_value_ratio,
    report_title,
    validation_gap,
)

REPO = Path(__file__).resolve().parents[1]


def _tiny(output, losses, **kw) -> BenchmarkConfig:
    return tiny_config(output, losses, **{"iterations_per_epoch": 3, **kw})


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_report_sections_hold_computed_values(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PML_PROXIES_COMMAND", raising=False)
    argv = ["--dataset", "digits", "--losses", "proxy_anchor,proxy_isa", "--seeds", "0,1",
            "--epochs", "2", "--iterations-per-epoch", "3", "--embedding-size", "16",
            "--batch-size", "16", "--map-samples", "50", "--log-freq", "1",
            "--output", "out", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.startswith("# Benchmark report (--dataset digits)\n")
    # the command as typed, versions, commit, device, threads, start and total time
    assert "pml-proxies-benchmark " + " ".join(argv) in text
    for version in (
        pml_proxies.__version__,
        torch.__version__,
        pytorch_metric_learning.__version__,
    ):
        assert version in text
    assert f"python {sys.version.split()[0]}" in text
    assert "git commit: " in text and "device: cpu" in text and "torch CPU threads: 1" in text
    assert "started 20" in text and "this invocation took" in text
    assert "2 run(s) trained" not in text and "4 run(s) trained" in text
    # the protocol in sentences with the values used (no "0 epochs", no "dataset default")
    protocol = _section(text, "Protocol")
    data = load_benchmark_data("digits")
    assert f"{len(data.train)} images of {data.train.num_classes} training classes" in protocol
    assert "8 x 8 pixels" in protocol and "2 epochs of 3 iterations" in protocol
    assert "constant learning rate" in protocol and "every 0" not in protocol
    assert "dataset default" not in protocol and "seeds 0, 1" in protocol
    # results, selected epochs, hyper-parameters used
    assert "| proxy_isa | 2 |" in _section(text, "Test results")
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    epochs = _section(text, "Selected epochs")
    best = runs.set_index(["loss", "seed"])["best_epoch"]
    assert (
        f"| proxy_anchor | {best['proxy_anchor', 0]} / 2 | {best['proxy_anchor', 1]} / 2 |"
        in epochs
    )
    params = _section(text, "Loss hyper-parameters used")
    assert "sensitivity=0.9" in params and "margin=0.1, alpha=32" in params
    # caveats computed from this run
    cav = _section(text, "Caveats")
    assert "Only 2 validation classes" in cav
    assert "about 100 times" not in cav  # the ratio is computed (test_caveats_rules)
    assert "Validation MAP@R (mean of the runs' selected epochs" in cav
    assert "single seed" not in cav
    # every file, relative to the output folder; no absolute path anywhere
    files = _section(text, "Files")
    for name in ("config.json", "protocol.json", "runs.csv", "summary.csv", "report.md",
                 "map_data.npz", "result.json", "runs/proxy_isa/seed_1/"):  # fmt: skip
        assert name in files, name
    assert str(tmp_path) not in text and "/tmp" not in text
    # Proxy-ISA's statistics are logged to record-keeper
    with open(tmp_path / "out/runs/proxy_isa/seed_0/logs/metric_loss_ProxyISALoss.csv") as f:
        header = next(csv.reader(f))
    assert {"mean_effective_number", "memory_fill", "mean_negative_weight"} <= set(header)


def test_caveats_rules():
    config = _tiny("unused", ["proxy_anchor", "mpa", "proxy_nca"], epochs=4, seeds=[0, 1])
    data = load_benchmark_data("digits")
    results = [
        {"loss": loss, "seed": s, "best_epoch": e}
        for loss, eps in (("proxy_anchor", (1, 1)), ("mpa", (1, 2)), ("proxy_nca", (3, 4)))
        for s, e in zip((0, 1), eps)
    ]
    m = "mean_average_precision_at_r"
    summary = pd.DataFrame(
        {"loss": ["proxy_anchor", "mpa", "proxy_nca"], "seeds": [2, 2, 2],
         f"{m}_mean": [0.50, 0.48, 0.30], f"{m}_ci95": [0.03, 0.03, 0.01]}
    )  # fmt: skip
    text = " ".join(caveats(config, data, results, summary))
    assert "Only 2 validation classes" in text
    # proxy_anchor: 2/2 first-epoch bests, mpa 1/2 (not most), proxy_nca 0/2: 1 of 3 losses
    assert "first validated one" not in text and "still improving" not in text
    results[3]["best_epoch"] = 1  # now mpa too: 2 of 3 losses
    text = " ".join(caveats(config, data, results, summary))
    assert "first validated one (epoch 1) for most losses (proxy_anchor, mpa)" in text
    assert "proxy_anchor (the highest mean) and of mpa overlap" in text
    assert "proxy_nca overlap" not in text and "Proxy-ISA" not in text
    for r in results:
        r["best_epoch"] = 4 if r["loss"] != "mpa" else 1
    text = " ".join(caveats(config, data, results, summary))
    assert "last one (epoch 4) for most losses (proxy_anchor, proxy_nca)" in text
    one_seed = summary.assign(seeds=1)
    assert "A single seed" in " ".join(caveats(config, data, results, one_seed))


def _history_results(isa_scale: float) -> list[dict]:
    """Runs with per-epoch training losses: Proxy-ISA's are ``isa_scale`` times 2, 1."""
    losses = {"proxy_anchor": (2.0, 1.0), "mpa": (4.0, 3.0), "proxy_nca": (1.0, 0.5),
              "proxy_isa": (2.0 * isa_scale, 1.0 * isa_scale)}  # fmt: skip
    return [
        {"loss": loss, "seed": s, "best_epoch": 2, "best_val_score": None, "test": None,
         "history": [{"epoch": e + 1, "train_loss": v * (1 + s / 10)} for e, v in enumerate(vals)]}
        for loss, vals in losses.items()
        for s in (0, 1)
    ]  # fmt: skip


def test_proxy_isa_loss_ratio_is_computed_from_the_runs():
    # per epoch, seed means (x1.05): epoch 1 Proxy-ISA 2 s against median(2, 4, 1) = 2 -> s;
    # epoch 2: s against median(1, 3, 0.5) = 1 -> s. The largest is epoch 1's (the first of ties)
    ratio, epoch = loss_value_ratio(_history_results(30.0), "proxy_isa")
    assert ratio == pytest.approx(30.0) and epoch == 1
    results = _history_results(7.3)
    results[0]["history"][1]["train_loss"] = float("nan")  # unrecorded values are skipped
    assert loss_value_ratio(results, "proxy_isa")[0] == pytest.approx(7.3)
    assert loss_value_ratio([r for r in results if r["loss"] == "proxy_isa"], "proxy_isa") is None
    assert loss_value_ratio([{**r, "history": []} for r in results], "proxy_isa") is None
    config = _tiny("unused", ["proxy_anchor", "mpa", "proxy_nca", "proxy_isa"], seeds=[0, 1])
    data = load_benchmark_data("digits")
    summary = pd.DataFrame({"loss": [], "seeds": []})
    big = " ".join(caveats(config, data, _history_results(30.0), summary))
    assert "Proxy-ISA's training loss is 30 times the median of the other losses' in epoch 1" in big
    small = " ".join(caveats(config, data, _history_results(7.3), summary))
    assert "Proxy-ISA" not in small  # below 10x: no sentence


def test_validation_gap_is_explained_by_the_class_counts():
    import numpy as np

    config = _tiny("unused", ["proxy_anchor"], seeds=[0, 1])
    data = load_benchmark_data("digits")
    m = config.primary_metric
    results = [{"loss": "proxy_anchor", "seed": s, "best_epoch": 2, "best_val_score": v,
                "test": {m: t}} for s, v, t in ((0, 0.70, 0.30), (1, 0.80, 0.36))]  # fmt: skip
    text = validation_gap(config, data, results)
    assert text is not None
    assert "Validation MAP@R (mean of the runs' selected epochs, 75.0)" in text
    assert "test MAP@R (33.0)" in text
    counts = f"{data.val.num_classes} classes ({len(data.val)} images) against "
    assert counts + f"{data.test.num_classes} ({len(data.test)} images)" in text
    for split in (data.val, data.test):  # sum_c n_c (n_c - 1) / (N (N - 1)), by hand
        n_c = np.bincount(split.labels)
        n = len(split)
        assert chance_precision(split.labels) == pytest.approx(
            sum(c * (c - 1) for c in n_c.tolist()) / (n * (n - 1)), rel=1e-12
        )
        assert f"{100 * chance_precision(split.labels):.2f}%" in text
    for r in results:
        r["best_val_score"] = 0.2  # validation below test: nothing to explain
    assert validation_gap(config, data, results) is None
    assert validation_gap(config, data, [{**r, "test": None} for r in results]) is None


def test_title_names_the_data_set_as_given():
    config = _tiny("unused", ["proxy_anchor"], root="my data/birds", dataset_kwargs={"v": 1})
    assert report_title(config) == (
        "Benchmark report (--dataset digits --dataset-arg v=1 --root 'my data/birds')"
    )
    assert report_title(_tiny("unused", ["mpa"]), "Tuned benchmark report") == (
        "Tuned benchmark report (--dataset digits)"
    )


def test_the_command_is_recorded_as_typed(monkeypatch):
    from pml_proxies.benchmark.cli import build_parser, config_from_args
    from pml_proxies.benchmark.config import typed_command
    from pml_proxies.benchmark.tune.cli import _command

    argv = ["--losses", "mpa", "--output", "a b"]
    args = build_parser().parse_args(argv)
    monkeypatch.delenv("PML_PROXIES_COMMAND", raising=False)
    assert (
        config_from_args(args, argv).command == "pml-proxies-benchmark --losses mpa --output 'a b'"
    )
    assert _command(["--trials", "2"]) == "pml-proxies-benchmark tune --trials 2"
    monkeypatch.setenv("PML_PROXIES_COMMAND", "bash .ci/main")  # what .ci/main sets
    assert config_from_args(args, argv).command == "bash .ci/main --losses mpa --output 'a b'"
    assert _command(["--trials", "2"]) == "bash .ci/main tune --trials 2"
    assert typed_command([]) == "bash .ci/main"
    main_script = (REPO / ".ci" / "main").read_text()
    assert 'export PML_PROXIES_COMMAND="bash $(printf %q "$0")"' in main_script


def test_ci_main_records_its_own_invocation(tmp_path):
    """The line of .ci/main that sets the variable, run by bash as .ci/main runs it."""
    line = next(
        x for x in (REPO / ".ci" / "main").read_text().splitlines() if "PML_PROXIES_COMMAND" in x
    )
    script = tmp_path / "my dir" / "main"
    script.parent.mkdir()
    script.write_text(f"{line}\nprintf '%s' \"$PML_PROXIES_COMMAND\"\n")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    assert out.stdout == f"bash {str(script).replace(' ', chr(92) + ' ')}"


def test_report_only_rebuilds_without_training(tmp_path, capsys):
    out = tmp_path / "out"
    run_benchmark(_tiny(out, ["proxy_anchor", "normalized_softmax"]))
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_0/result.json")}
    (out / "report.md").unlink()
    (out / "runs" / "normalized_softmax" / "seed_0" / "result.json").unlink()
    res = run_benchmark(_tiny(out, ["proxy_anchor", "normalized_softmax"]), report_only=True)
    assert (out / "report.md").is_file() and list(res["runs"]["loss"]) == ["proxy_anchor"]
    text = (out / "report.md").read_text()
    assert "Only 1 of the 2 runs are finished (missing: normalized_softmax seed 0)" in text
    assert "left out of the report" in capsys.readouterr().err
    for p, t in stamps.items():
        if p.exists():
            assert p.stat().st_mtime_ns == t
    assert not (out / "runs" / "normalized_softmax" / "seed_0" / "result.json").exists()


@pytest.mark.slow
def test_cli_non_terminal_output_has_no_escape_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        [sys.executable, "-m", "pml_proxies.benchmark", "--quick", "--dataset", "digits",
         "--losses", "proxy_anchor", "--output", str(tmp_path / "q")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    assert "\x1b" not in both and "\r" not in both
    assert "benchmark: 1/1" in proc.stderr  # one plain progress line per period and at the end
    assert (tmp_path / "q" / "report.md").is_file()


def test_device_line_names_torchs_cpu_kernels():
    """The kernel choice changes a run's rounding (runs are bit-reproducible on one machine and
    one kernel choice only), so the report records it."""
    code = "from pml_proxies.benchmark.report import device_description; print(device_description('cpu'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch kernels: DEFAULT" in out.stdout
