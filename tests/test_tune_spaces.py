"""Search spaces of ``pml-proxies-benchmark tune``: the registry's spaces and the mapping table
against the MLRC YAMLs, ``--space`` overrides, and how trial parameters reach the benchmark's
losses and optimizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

yaml = pytest.importorskip("yaml")

from pml_proxies.benchmark.config import BenchmarkConfig  # noqa: E402
from pml_proxies.benchmark.losses import LOSSES, build_loss  # noqa: E402
from pml_proxies.benchmark.tune import spaces as sp  # noqa: E402
from pml_proxies.benchmark.tune.trial import fold_classes, trial_spec  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "powerful_benchmarker_configs"
MARKERS = ("~BAYESIAN~", "~LOG_BAYESIAN~", "~INT_BAYESIAN~")


def _yaml_ranges(node, prefix=""):
    """Independent walk: every ranged key of a YAML mapping, dotted."""
    out = {}
    for key, value in node.items():
        hit = [m for m in MARKERS if str(key).endswith(m)]
        if hit:
            out[prefix + str(key)[: -len(hit[0])]] = (hit[0], value)
        elif isinstance(value, dict):
            out.update(_yaml_ranges(value, f"{prefix}{key}."))
    return out


def test_every_registry_loss_is_mapped_or_reported_as_no_space():
    assert set(sp.LOSS_CONFIGS) == set(LOSSES)
    for name, cfg in sp.LOSS_CONFIGS.items():
        if cfg is None:
            assert sp.loss_space(name, CONFIGS) == []
            assert f"{name}: no space" in sp.format_spaces({name: []})
        else:
            assert (CONFIGS / "config_loss_and_miners" / cfg.yaml).is_file(), cfg.yaml


@pytest.mark.parametrize("name", [n for n, c in sp.LOSS_CONFIGS.items() if c is not None])
def test_every_yaml_range_becomes_a_space_entry(name):
    cfg = sp.LOSS_CONFIGS[name]
    doc = yaml.safe_load((CONFIGS / "config_loss_and_miners" / cfg.yaml).read_text())
    expected = _yaml_ranges(doc["loss_funcs~OVERRIDE~"]["metric_loss"][cfg.loss_class])
    for miner in (doc.get("mining_funcs~OVERRIDE~") or {}).values():
        for kwargs in miner.values():
            expected.update({"miner." + k: v for k, v in _yaml_ranges(kwargs).items()})
    entries = {
        e.source.split(":", 1)[1]: e for e in sp.loss_space(name, CONFIGS) if ":" in e.source
    }
    assert set(entries) == set(expected)
    rename = dict(cfg.rename)
    kinds = {"~BAYESIAN~": "float", "~LOG_BAYESIAN~": "log", "~INT_BAYESIAN~": "int"}
    for path, (marker, bounds) in expected.items():
        e = entries[path]
        assert e.name == rename.get(path, path)
        assert (e.low, e.high) == (float(bounds[0]), float(bounds[1]))
        assert e.kind == kinds[marker]


@pytest.mark.parametrize("name", [n for n, c in sp.LOSS_CONFIGS.items() if c is not None])
def test_space_names_are_constructor_arguments_of_the_registry(name):
    """Building the loss with every entry at its low bound must succeed (names are kwargs the
    registry accepts; miner kwargs reach the miner)."""
    params = {}
    for e in sp.loss_space(name, CONFIGS):
        low = e.low if e.kind != "log" else e.low * 1.5
        params[e.name] = int(e.low) if e.kind == "int" else low
    overrides, proxy_lr = sp.split_params(params)
    loss, miner = build_loss(name, 5, 8, overrides=overrides)
    assert loss is not None and (proxy_lr is None) == (sp.PROXY_LR not in params)
    for key, value in overrides.get("miner_kwargs", {}).items():
        assert getattr(miner, key) == pytest.approx(value)


@pytest.mark.parametrize("name", list(LOSSES))
def test_registry_space_is_the_mlrc_yaml_space(name, monkeypatch):
    """The tuner's default spaces (the registry's) hold exactly the ranges of the MLRC YAMLs, in
    the same order (the order of the trial's suggestions)."""
    monkeypatch.delenv(sp.CONFIGS_ENV, raising=False)
    registry_space = sp.loss_space(name)
    assert {e.source for e in registry_space} <= {sp.REGISTRY_SOURCE}
    yaml_space = sp.loss_space(name, CONFIGS)
    assert [(e.name, e.low, e.high, e.kind) for e in registry_space] == [
        (e.name, e.low, e.high, e.kind) for e in yaml_space
    ]
    assert bool(registry_space) == (name != "normalized_softmax")


def test_configs_folder_from_the_environment_replaces_the_registry_spaces(tmp_path, monkeypatch):
    (tmp_path / "config_loss_and_miners").mkdir()
    (tmp_path / "config_loss_and_miners" / "proxy_nca.yaml").write_text(
        "loss_funcs~OVERRIDE~:\n  metric_loss:\n    ProxyNCALoss:\n"
        "      softmax_scale~BAYESIAN~: [2, 3]\n"
    )
    monkeypatch.setenv(sp.CONFIGS_ENV, str(tmp_path))
    (e,) = sp.loss_space("proxy_nca")
    assert (e.name, e.kind, e.low, e.high) == ("softmax_scale", "float", 2, 3)
    assert e.source == "proxy_nca.yaml:softmax_scale"
    monkeypatch.delenv(sp.CONFIGS_ENV)
    assert [e.source for e in sp.loss_space("proxy_nca")] == [sp.REGISTRY_SOURCE] * 2


def test_proxy_lr_entry_follows_the_yaml_comment():
    """proxy_lr is searched exactly for the losses whose YAML says to use proxy_lr_bayes_opt;
    those are losses with trainable parameters; VCPA (Newton-step proxies) has none."""
    opt = yaml.safe_load((CONFIGS / sp.PROXY_LR_YAML).read_text())
    lr_range = opt["optimizers"]["metric_loss_optimizer"]["RMSprop"]["lr~LOG_BAYESIAN~"]
    for name, cfg in sp.LOSS_CONFIGS.items():
        if cfg is None:
            continue
        text = (CONFIGS / "config_loss_and_miners" / cfg.yaml).read_text()
        entries = {e.name: e for e in sp.loss_space(name, CONFIGS)}
        assert (sp.PROXY_LR in entries) == (
            "--config_optimizers [default, proxy_lr_bayes_opt]" in text
        )
        if sp.PROXY_LR in entries:
            assert LOSSES[name].proxy_based
            e = entries[sp.PROXY_LR]
            assert (e.low, e.high, e.kind) == (lr_range[0], lr_range[1], "log")
    assert sp.PROXY_LR not in {e.name for e in sp.loss_space("vcpa", CONFIGS)}
    assert sp.PROXY_LR not in {e.name for e in sp.loss_space("multi_similarity", CONFIGS)}


def test_space_overrides_replace_keep_scale_or_add():
    over = sp.parse_space_overrides(
        [
            "proxy_anchor.alpha=4:64",
            "proxy_anchor.margin=0.05:0.2:log",
            "mpa.centers_per_class=1:4:int",
        ]
    )
    spaces = sp.resolve_spaces(["proxy_anchor", "mpa"], over, CONFIGS)
    pa = {e.name: e for e in spaces["proxy_anchor"]}
    assert (pa["alpha"].low, pa["alpha"].high, pa["alpha"].kind) == (4, 64, "log")  # YAML scale
    assert pa["margin"].kind == "log" and pa["margin"].source.startswith("--space")
    mpa = {e.name: e for e in spaces["mpa"]}
    assert (mpa["centers_per_class"].kind, mpa["centers_per_class"].high) == ("int", 4)
    assert len(spaces["proxy_anchor"]) == len(sp.loss_space("proxy_anchor", CONFIGS))


@pytest.mark.parametrize(
    "item, message",
    [
        ("proxy_anchor.alpha", "LOSS.ARG=low:high"),
        ("nope.alpha=1:2", "unknown loss"),
        ("proxy_anchor.alpha=a:2", "must be numbers"),
        ("proxy_anchor.alpha=3:2", "low"),
        ("proxy_anchor.margin=0:1:log", "log range"),
        ("proxy_anchor.alpha=1:2:cubic", "kind"),
        ("proxy_anchor.alpha=1.5:4:int", "int range"),
    ],
)
def test_bad_space_overrides_name_the_problem(item, message):
    with pytest.raises(ValueError, match=message):
        sp.parse_space_overrides([item])


def test_override_checks_against_the_tuned_losses():
    with pytest.raises(ValueError, match="not among the tuned losses"):
        sp.resolve_spaces(["mpa"], sp.parse_space_overrides(["vcpa.alpha=1:2"]), CONFIGS)
    with pytest.raises(ValueError, match="no trainable parameters"):
        over = sp.parse_space_overrides(["multi_similarity.proxy_lr=1e-4:1e-2"])
        sp.resolve_spaces(["multi_similarity"], over, CONFIGS)


def test_configs_dir_is_found_beside_the_package_or_named(tmp_path, monkeypatch):
    monkeypatch.delenv(sp.CONFIGS_ENV, raising=False)
    assert sp.configs_dir() == CONFIGS
    with pytest.raises(FileNotFoundError, match="--configs"):
        sp.configs_dir(tmp_path)
    monkeypatch.setenv(sp.CONFIGS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=sp.CONFIGS_ENV):
        sp.configs_dir()


def test_int_ranges_are_read(tmp_path):
    (tmp_path / "config_loss_and_miners").mkdir()
    (tmp_path / "config_loss_and_miners" / "proxy_nca.yaml").write_text(
        "loss_funcs~OVERRIDE~:\n  metric_loss:\n    ProxyNCALoss:\n"
        "      softmax_scale~INT_BAYESIAN~: [1, 9]\n"
    )
    (e,) = sp.loss_space("proxy_nca", tmp_path)
    assert (e.name, e.kind, e.low, e.high) == ("softmax_scale", "int", 1, 9)


def test_trial_parameters_reach_loss_miner_and_proxy_lr():
    base = BenchmarkConfig(dataset="digits", losses=["multi_similarity"], lr=1e-3)
    params = {"alpha": 3.0, "miner.epsilon": 0.4}
    spec = trial_spec(base, "multi_similarity", params, 0)
    assert dict(spec.loss_overrides) == {"alpha": 3.0, "miner_kwargs": {"epsilon": 0.4}}
    assert spec.proxy_lr_mult == base.proxy_lr_mult
    loss, miner = build_loss("multi_similarity", 3, 4, overrides=dict(spec.loss_overrides))
    assert (loss.alpha, miner.epsilon) == (3.0, 0.4)
    spec = trial_spec(base, "proxy_anchor", {"proxy_lr": 0.05, "margin": 0.2}, 1)
    assert spec.proxy_lr_mult == pytest.approx(50.0)
    assert dict(spec.loss_overrides) == {"margin": 0.2} and spec.seed == 1
    assert spec.fingerprint != trial_spec(base, "proxy_anchor", {"margin": 0.3}, 1).fingerprint


def test_fold_classes_are_disjoint_and_cover_the_training_classes():
    from pml_proxies.benchmark.data import load_benchmark_data

    data = load_benchmark_data("digits", val_fraction=0.3, progress=False)
    folds = fold_classes(data, 2, seed=0)
    all_classes = set(np.unique(data.train.original_labels)) | set(data.val.original_labels)
    held = [set(f.tolist()) for f in folds]
    assert set().union(*held) == all_classes
    assert sum(len(h) for h in held) == len(all_classes)
    for f, h in zip(folds, held):
        fold = data.with_validation_classes(f)
        assert set(np.unique(fold.val.original_labels)) == h
        assert set(np.unique(fold.train.original_labels)) == all_classes - h
    assert [f.tolist() for f in fold_classes(data, 2, seed=0)] == [f.tolist() for f in folds]
    with pytest.raises(ValueError, match="folds"):
        fold_classes(data, 3, seed=0)
