"""End-to-end smoke run of ``pml-proxies-mlrc`` (powerful-benchmarker 0.9.33 on PML 2.9).

A tiny fake data set (12 classes of 20x20 images made here) and a tiny trunk, on the CPU:
single run with one of our losses -> --evaluate -> --evaluate_ensemble -> resume with more epochs
(the loss's epoch schedule and state must carry over), then a Bayesian-optimisation run with
2 iterations and 1 reproduction that writes the reports, then its resume with a 3rd iteration.

Skipped where powerful-benchmarker is not installed (the core environment); ``.ci/mlrc_test`` runs
it in the MLRC environment with PML_PROXIES_REQUIRE_MLRC=1, where a missing install fails.
"""

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

if os.environ.get("PML_PROXIES_REQUIRE_MLRC"):
    import powerful_benchmarker  # noqa: F401
else:
    pytest.importorskip("powerful_benchmarker")

import yaml  # noqa: E402

from pml_proxies.mlrc import smoke  # noqa: E402
from pml_proxies.mlrc.report import read_reports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600

PROBE_MODULE = '''
"""A Multi Proxy Anchor loss that logs its set_epoch calls and keeps the epoch in a buffer."""
import os

import torch

from pml_proxies.losses import MultiProxyAnchorLoss


class EpochProbeLoss(MultiProxyAnchorLoss):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("current_epoch", torch.zeros((), dtype=torch.long))

    def set_epoch(self, epoch):
        with open(os.environ["PML_PROXIES_EPOCH_LOG"], "a") as f:
            f.write(f"{int(self.current_epoch)}->{epoch}\\n")
        self.current_epoch.fill_(epoch)
'''

PROBE_CONFIG = """\
loss_funcs~OVERRIDE~:
  metric_loss:
    EpochProbeLoss:
      embedding_size: 128
      centers_per_class: 2
      weight_regularizer:
        IntraClassCenterRegularizer: {}
mining_funcs~OVERRIDE~: {}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlrc")
    smoke.make_fake_dataset(base / "data")
    configs = smoke.write_smoke_configs(base / "configs")
    (configs / "config_loss_and_miners").mkdir(exist_ok=True)
    (configs / "config_loss_and_miners" / "probe.yaml").write_text(PROBE_CONFIG)
    (base / "probe").mkdir()
    (base / "probe" / "epoch_probe.py").write_text(textwrap.dedent(PROBE_MODULE))
    return base


def launch(workspace, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(workspace / "probe"), str(ROOT)])
    env["PML_PROXIES_EPOCH_LOG"] = str(workspace / "epochs.log")
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "2"
    cmd = [
        sys.executable, "-m", "pml_proxies.mlrc.launcher",
        "--dataset_root", str(workspace / "data"),
        "--root_experiment_folder", str(workspace / "experiments"),
        "--config_folder", str(workspace / "configs"),
        "--register", "loss:epoch_probe",
        *args,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=workspace, capture_output=True, text=True,
                            timeout=TIMEOUT)  # fmt: skip
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
        pytest.fail(f"pml-proxies-mlrc {' '.join(args)} failed:\n{tail}")
    return result


def rows(db_path, table_prefix, suffix="_TEST_vs_self"):
    with sqlite3.connect(db_path) as db:
        tables = [
            t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if t.startswith(table_prefix) and t.endswith(suffix)
        ]  # fmt: skip
        assert len(tables) == 1, (table_prefix, tables)
        cursor = db.execute(f"SELECT * FROM {tables[0]}")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]


def epoch_log(workspace):
    return (workspace / "epochs.log").read_text().split()


SINGLE = [
    "--experiment_name", "single",
    "--config_dataset", "[default, smoke]",
    "--config_general", "[default, smoke]",
    "--config_models", "[default, smoke]",
    "--config_transforms", "[smoke]",
    "--config_eval", "[default, smoke]",
    "--config_loss_and_miners", "[default, probe]",
    "--config_optimizers", "[default, proxy_lr_fixed]",
]  # fmt: skip


def test_single_run_evaluate_ensemble_and_resume(workspace):
    launch(workspace, *SINGLE)
    exp = workspace / "experiments" / "single"
    folds = sorted(p for p in exp.iterdir() if p.name.startswith("Test50_50_Partitions2_"))
    assert len(folds) == 2
    for fold in folds:
        saved = {p.name for p in (fold / "saved_models").iterdir()}
        # the loss (its proxies and state) and its optimizer are checkpointed with the models
        assert {"trunk_2.pth", "embedder_2.pth", "metric_loss_2.pth"} <= saved
        assert "metric_loss_optimizer_2.pth" in saved
    # the epoch schedule: set_epoch(1), set_epoch(2) in each of the 2 folds, from a fresh loss
    assert epoch_log(workspace) == ["0->1", "1->2"] * 2
    saved_config = yaml.safe_load((exp / "configs" / "config_loss_and_miners.yaml").read_text())
    assert "EpochProbeLoss" in saved_config["loss_funcs"]["metric_loss"]

    launch(workspace, "--experiment_name", "single", "--evaluate", "--splits_to_eval", "[test]")
    meta_db = exp / "meta_logs" / "saved_csvs" / "logs.db"
    separated = rows(meta_db, "MeanAggregator_accuracies_normalized_GlobalEmbeddingSpaceTester")
    test_rows = [r for r in separated if r["trained_status"] == "trained"]
    assert test_rows and 0 <= test_rows[-1]["mean_average_precision_at_r_level0"] <= 1

    launch(workspace, "--experiment_name", "single", "--evaluate_ensemble",
           "--splits_to_eval", "[test]")  # fmt: skip
    concatenated = rows(meta_db, "ConcatenateEmbeddings_accuracies_normalized")
    trained = [r for r in concatenated if r["trained_status"] == "trained"]
    # accuracies and trained_status on the same row (shim 8), the epoch column keeps the name
    assert len(trained) == 1 and trained[0]["epoch"] == "trained"
    assert 0 <= trained[0]["precision_at_1_level0"] <= 1

    launch(workspace, "--experiment_name", "single", "--resume_training", "latest",
           "--merge_argparse_when_resuming", "--num_epochs_train", "3", "--patience", "5")  # fmt: skip
    for fold in folds:
        assert (fold / "saved_models" / "metric_loss_3.pth").is_file()
    # resumed at epoch 3 with the loss state of epoch 2 restored from its checkpoint
    assert epoch_log(workspace)[4:] == ["2->3"] * 2


BAYES = [
    "--experiment_name", "bayes",
    "--config_dataset", "[default, smoke]",
    "--config_general", "[default, smoke]",
    "--config_models", "[default, smoke]",
    "--config_transforms", "[smoke]",
    "--config_eval", "[default, smoke]",
    "--config_loss_and_miners", "[default, mpa]",
    "--config_optimizers", "[default, proxy_lr_bayes_opt]",
    "--reproductions", "1",
]  # fmt: skip


def test_bayes_opt_run_reports_and_resume(workspace):
    exp = workspace / "experiments" / "bayes"
    launch(workspace, *BAYES, "--bayes_opt_iters", "2")
    reports = sorted(p.name for p in exp.glob("report_*.yaml"))
    assert [r.split("_")[1] for r in reports] == ["ConcatenateEmbeddings", "MeanAggregator"]
    for name in reports:
        report = yaml.safe_load((exp / name).read_text())
        assert set(report["trained"]) == {
            "precision_at_1_level0",
            "r_precision_level0",
            "mean_average_precision_at_r_level0",
        }  # no "~iteration~" (shim 9)
    best = yaml.safe_load((exp / "best_parameters.yaml").read_text())
    params = best["best_parameters"]
    lr = params["optimizers/metric_loss_optimizer/RMSprop/lr"]
    assert 1e-6 <= lr <= 1
    assert 1 <= params["loss_funcs/metric_loss/MultiProxyAnchorLoss/alpha"] <= 128
    assert best["best_sub_experiment_name"] in {"bayes0", "bayes1"}
    assert (exp / f"{best['best_sub_experiment_name']}_reproduction0").is_dir()

    table = read_reports([exp])
    assert list(table.index) == ["bayes"]
    assert [c[0] for c in table.columns] == ["separated"] * 3 + ["concatenated"] * 3
    assert ((table >= 0) & (table <= 100)).all().all()

    first_models = {p: p.stat().st_mtime_ns for p in (exp / "bayes0").rglob("*.pth")}
    launch(workspace, *BAYES, "--bayes_opt_iters", "3")
    assert (exp / "bayes2").is_dir()
    # completed trials are not trained again
    assert {p: p.stat().st_mtime_ns for p in (exp / "bayes0").rglob("*.pth")} == first_models
    assert len(list((exp / "bayes_opt_ax_logs").glob("log*.json"))) >= 3


def test_proxy_isa_state_survives_resume(workspace):
    """Proxy-ISA under powerful-benchmarker: its epoch schedule and its per-class state are in the
    checkpointed loss state_dict and continue after --resume_training."""
    import torch

    if not hasattr(__import__("pml_proxies.losses").losses, "ProxyISALoss"):
        pytest.skip("ProxyISALoss is not in pml_proxies.losses yet")
    args = [
        "--experiment_name", "proxy_isa",
        *SINGLE[2:12],
        "--config_loss_and_miners", "[default, proxy_isa_fixed]",
        "--config_optimizers", "[default, proxy_lr_fixed]",
    ]  # fmt: skip
    launch(workspace, *args)
    models = workspace / "experiments" / "proxy_isa" / "Test50_50_Partitions2_0" / "saved_models"
    after_2 = torch.load(models / "metric_loss_2.pth", map_location="cpu")
    assert int(after_2["epoch"]) == 2 and not bool(after_2["memory_enabled"])
    # 2 epochs x 2 iterations x 8 samples counted (no outliers before the filter starts)
    assert int(after_2["sample_counts"].sum()) == 32

    launch(workspace, "--experiment_name", "proxy_isa", "--resume_training", "latest",
           "--merge_argparse_when_resuming", "--num_epochs_train", "3", "--patience", "5")  # fmt: skip
    after_3 = torch.load(models / "metric_loss_3.pth", map_location="cpu")
    assert int(after_3["epoch"]) == 3 and bool(after_3["memory_enabled"])  # memory from epoch 3
    # counts continue from the checkpoint (a fresh loss would have 16)
    assert int(after_3["sample_counts"].sum()) == 48
    assert int((after_3["memory_labels"] >= 0).sum()) == 16  # the memory filled during epoch 3
