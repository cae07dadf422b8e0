"""Run every script of examples/ in its quick mode (a subprocess, cwd a temporary folder) and
check that it finished and wrote what it claims."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
PROXY_ISA_STATS = (
    "mean_effective_number",
    "memory_fill",
    "outlier_fraction",
    "mean_positive_weight",
    "mean_negative_weight",
    "mean_learned_similarity",
)


def run_example(script: str, cwd: Path, *args: str) -> str:
    """``python examples/<script> --quick --device cpu --output-dir cwd/out ARGS`` in ``cwd``;
    returns its stdout (fails with the output tail when the script fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, str(EXAMPLES / script), "--quick", "--device", "cpu"]
    command += ["--output-dir", str(cwd / "out"), *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def assert_only_output_dir(cwd: Path) -> None:
    """The scripts write under --output-dir only (nothing else in the working directory)."""
    assert sorted(os.listdir(cwd)) == ["out"]


def test_every_example_documented_and_listed():
    assert SCRIPTS == [
        "cub200_recipe.py",
        "mpa_family_with_tester.py",
        "proxy_isa_pml_trainer.py",
        "vcpa_plain_pytorch.py",
    ]
    readme = (EXAMPLES / "README.md").read_text()
    for script in SCRIPTS:
        source = (EXAMPLES / script).read_text()
        docstring = ast.get_docstring(ast.parse(source))
        assert docstring and f"examples/{script}" in docstring, script
        for flag in ("--quick", "--device", "--output-dir"):
            assert f'"{flag}"' in source, (script, flag)
        assert f"examples/{script}" in readme, script


@pytest.mark.slow
def test_proxy_isa_trainer_logs_statistics_and_resumes(tmp_path):
    first = run_example("proxy_isa_pml_trainer.py", tmp_path, "--epochs", "2")
    assert "training epochs 1..2" in first
    second = run_example("proxy_isa_pml_trainer.py", tmp_path)  # default quick: 4 epochs
    assert "training epochs 3..4" in second  # resumed from the HookContainer checkpoint
    assert "Proxy-ISA statistics per epoch" in second
    assert_only_output_dir(tmp_path)

    logs, models = tmp_path / "out" / "logs", tmp_path / "out" / "models"
    stats = pd.read_csv(logs / "metric_loss_ProxyISALoss.csv")
    assert set(PROXY_ISA_STATS) <= set(stats.columns)
    assert stats["~iteration~"].tolist() == list(range(20))  # 4 epochs x 5, none repeated
    epoch = stats["~iteration~"] // 5 + 1
    # the epoch schedule went through the hooks and survived the resume: the memory fills from
    # epoch 3 on, the filter (positive weights != 1) acts from epoch 4 on only
    assert (stats["memory_fill"][epoch <= 2] == 0).all()
    assert (stats["memory_fill"][epoch == 4] > 0).all()
    assert (stats["mean_positive_weight"][epoch <= 3] == 1).all()
    accuracy = pd.read_csv(next(logs.glob("accuracies_*TEST*.csv")))
    assert accuracy["epoch"].tolist() == [1, 2, 3, 4]
    assert accuracy["precision_at_1_level0"].between(0, 1).all()
    saved = {p.name for p in models.iterdir()}
    assert any(name.startswith("metric_loss") for name in saved), saved
    assert any(name.startswith("trunk") for name in saved), saved


@pytest.mark.slow
def test_vcpa_plain_pytorch(tmp_path):
    from pml_proxies.losses import VCPALoss

    out = run_example("vcpa_plain_pytorch.py", tmp_path)
    assert "Proxy uncertainty" in out
    assert_only_output_dir(tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = results["metrics"]
    expected = {f"recall_at_{k}" for k in (1, 2, 4, 8)} | {"ndcg_at_10"}
    assert set(metrics) == expected | {"mean_average_precision_at_r"}
    assert all(0 <= v <= 1 for v in metrics.values())
    recalls = [metrics[f"recall_at_{k}"] for k in (1, 2, 4, 8)]
    assert recalls == sorted(recalls)
    uncertainty = results["proxy_uncertainty"]
    assert len(uncertainty) == 5 and all(u > 0 for u in uncertainty)
    checkpoint = torch.load(tmp_path / "out" / "vcpa.pt", weights_only=True)
    loss = VCPALoss(5, 64)
    loss.load_state_dict(checkpoint["loss"])  # strict: the saved state is a VCPALoss state
    assert not torch.equal(loss.proxy_mean, torch.zeros(5, 64))  # trained, not initial


@pytest.mark.slow
def test_mpa_family_with_tester(tmp_path):
    out = run_example("mpa_family_with_tester.py", tmp_path)
    assert_only_output_dir(tmp_path)
    table = pd.read_csv(tmp_path / "out" / "results.csv", index_col="loss")
    assert table.index.tolist() == ["MPA", "DW-MPA", "AP-MPA"]
    assert table.columns.tolist() == ["R@1", "R@2", "R@4", "R@8", "nDCG@10", "MAP@R"]
    assert ((table >= 0) & (table <= 100)).all().all()
    recalls = table[["R@1", "R@2", "R@4", "R@8"]].to_numpy()
    assert (recalls[:, 1:] >= recalls[:, :-1]).all()
    assert "nDCG@10" in out and "AP-MPA" in out


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["proxy_anchor", "vcpa"])
def test_cub200_recipe_quick(tmp_path, loss):
    # proxy_anchor: warm-up epoch and proxy optimizer; vcpa: no proxy parameters at all
    out = run_example("cub200_recipe.py", tmp_path, "--loss", loss)
    assert_only_output_dir(tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["loss"] == loss
    assert results["recipe"]["warmup_epochs"] == 1 and results["recipe"]["pooling"] == "avgmax"
    assert results["best"]["epoch"] in (1, 2)
    assert 0 <= results["best"]["recall_at_1"] <= 1
    checkpoint = torch.load(tmp_path / "out" / f"cub200_{loss}_best.pt", weights_only=True)
    assert checkpoint["model"]["embedder.weight"].shape[0] == 512
    assert "epoch 2:" in out and "best epoch" in out


@pytest.mark.slow
def test_example_with_omniglot(tmp_path, shared_dir):
    root = shared_dir / "data" / "omniglot"
    if not (root / "images_background_small1.zip").is_file():
        pytest.skip("the Omniglot zips are not in ../shared/data/omniglot")
    run_example(
        "vcpa_plain_pytorch.py", tmp_path, "--dataset", "omniglot", "--data-root", str(root)
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["proxy_uncertainty"]) == 128  # training classes of the small variant
