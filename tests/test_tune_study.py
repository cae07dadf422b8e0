"""Search mechanics of ``tune`` on a real SQLite storage with fast fake objectives: the equal
budget, resumption, pruning, failed searches, the report and the missing-extra message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

import tune_fake_objective as fake  # noqa: E402

from pml_proxies.benchmark.tune import report as tr  # noqa: E402
from pml_proxies.benchmark.tune import spaces as sp  # noqa: E402
from pml_proxies.benchmark.tune.study import (  # noqa: E402
    SearchSettings,
    counts,
    default_storage,
    make_storage,
    open_study,
    run_worker,
)

LOSSES = ["proxy_anchor", "multi_similarity"]
S = optuna.trial.TrialState


def _search(tmp_path: Path, objective, n=4, prune=False, losses=LOSSES, **kw):
    storage = make_storage(default_storage(tmp_path))
    spaces = sp.resolve_spaces(losses)
    settings = SearchSettings(n_trials=n, seed=0, prune=prune, startup_trials=1, **kw)
    run_worker(storage, "t", spaces, settings, objective, tmp_path / "trials", log=lambda m: None)
    return storage, spaces, settings


def _studies(storage, losses=LOSSES):
    return tr.load_studies(storage, "t", losses)


def test_equal_budget_every_trial_number_once_and_resume_reruns_nothing(tmp_path):
    storage, spaces, settings = _search(tmp_path, fake.quadratic, n=4)
    before = {}
    for loss, study in _studies(storage).items():
        trials = study.get_trials()
        assert [t.number for t in trials] == [0, 1, 2, 3]
        assert all(t.state == S.COMPLETE for t in trials)
        assert {p for t in trials for p in t.params} == {e.name for e in spaces[loss]}
        before[loss] = [(t.number, t.value, t.datetime_complete) for t in trials]
    run_worker(storage, "t", spaces, settings, fake.quadratic, tmp_path / "x", log=lambda m: 0)
    for loss, study in _studies(storage).items():
        assert [(t.number, t.value, t.datetime_complete) for t in study.get_trials()] == before[
            loss
        ]


def test_pruned_trials_count_toward_the_budget(tmp_path):
    storage, _, _ = _search(tmp_path, fake.worse_each_trial, n=5, prune=True, losses=["mpa"])
    study = _studies(storage, ["mpa"])["mpa"]
    c = counts(study)
    assert c["pruned"] >= 1 and c["done"] == 5 and len(study.trials) == 5
    (row,) = tr.search_summary({"mpa": study}, sp.resolve_spaces(["mpa"]), 5)
    assert row["status"] == "done" and row["pruned"] == c["pruned"]


def test_a_search_whose_every_trial_errors_is_reported_failed_not_dropped(tmp_path):
    storage, spaces, _ = _search(tmp_path, fake.failing, n=3, losses=["proxy_nca"])
    study = _studies(storage, ["proxy_nca"])["proxy_nca"]
    assert [t.state for t in study.trials] == [S.FAIL] * 3
    rows = tr.search_summary({"proxy_nca": study}, spaces, 3)
    assert rows[0]["status"] == "search failed (every trial errored)"
    md = tr.search_markdown(rows, spaces, _settings(3), {}, 1e-3)
    assert "| proxy_nca | search failed (every trial errored) | 0 | 0 | 3 |" in md
    assert "RuntimeError: broken trial 0" in md


def test_a_loss_without_space_gets_no_trials_and_is_reported(tmp_path):
    storage, spaces, _ = _search(tmp_path, fake.quadratic, n=2, losses=["normalized_softmax"])
    assert spaces == {"normalized_softmax": []}
    assert _studies(storage, ["normalized_softmax"]) == {"normalized_softmax": None}
    rows = tr.search_summary({"normalized_softmax": None}, spaces, 2)
    assert rows[0]["status"] == "no space: paper defaults"


def test_a_study_refuses_another_space_budget_or_protocol(tmp_path):
    storage, spaces, settings = _search(tmp_path, fake.quadratic, n=2, losses=["proxy_nca"])
    for changed, named in (
        (SearchSettings(n_trials=3, seed=0, startup_trials=1), "n_trials: 2 -> 3"),
        (SearchSettings(n_trials=2, seed=0, startup_trials=1, prune=True), "prune: False -> True"),
    ):
        with pytest.raises(ValueError, match=f"{named}.*another --study-name"):
            open_study(storage, "t", "proxy_nca", spaces["proxy_nca"], changed)
    narrower = sp.resolve_spaces(
        ["proxy_nca"], sp.parse_space_overrides(["proxy_nca.softmax_scale=1:9"])
    )
    with pytest.raises(ValueError, match="space: softmax_scale=.* -> softmax_scale=1:9:log"):
        open_study(storage, "t", "proxy_nca", narrower["proxy_nca"], settings)


def test_a_protocol_refusal_names_the_settings_not_fingerprints(tmp_path):
    fields = {"epochs": 2, "lr": None, "folds": 1}
    storage, spaces, settings = _search(tmp_path, fake.quadratic, n=2, losses=["proxy_nca"],
                                        protocol="a", protocol_fields=fields)  # fmt: skip
    other = SearchSettings(n_trials=2, seed=0, startup_trials=1, protocol="b",
                           protocol_fields={**fields, "epochs": 3})  # fmt: skip
    with pytest.raises(ValueError) as e:
        open_study(storage, "t", "proxy_nca", spaces["proxy_nca"], other)
    assert "(epochs: 2 -> 3)" in str(e.value) and "fingerprint" not in str(e.value)


def _settings(n):
    return dict(n_trials=n, seed=0, startup_trials=1, prune=False, folds=1, trial_seed=0,
                primary_metric="mean_average_precision_at_r")  # fmt: skip


def test_report_is_a_function_of_the_trials(tmp_path):
    n = tr.MIN_IMPORTANCE_TRIALS  # enough complete trials for the importances
    storage, spaces, _ = _search(tmp_path, fake.quadratic, n=n)
    texts = []
    for _ in range(2):
        studies = _studies(make_storage(default_storage(tmp_path)))
        rows = tr.search_summary(studies, spaces, n)
        plots = tr.write_plots(studies, tmp_path / "plots")
        texts.append(tr.search_markdown(rows, spaces, _settings(n), plots, 1e-3))
    assert texts[0] == texts[1]
    best = {loss: tr.best_trial(s) for loss, s in _studies(storage).items()}
    for loss, trial in best.items():
        assert max(t.value for t in _studies(storage)[loss].trials) == trial.value
        assert (
            f"| {loss} | done | {n} | 0 | 0 | 0 | {trial.value:.4f} | {trial.number} |" in texts[0]
        )
    for loss in LOSSES:
        assert (tmp_path / "plots" / f"{loss}_history.png").stat().st_size > 1000
        assert (tmp_path / "plots" / f"{loss}_importances.png").stat().st_size > 1000


def test_tune_without_optuna_names_the_extra(monkeypatch, capsys):
    from pml_proxies.benchmark.tune import cli

    monkeypatch.setitem(sys.modules, "optuna", None)
    assert cli.main(["--dataset", "digits", "--losses", "proxy_anchor"]) == 2
    assert "pip install 'pml-proxies[tune]'" in capsys.readouterr().err


def test_list_spaces_shows_every_loss(capsys):
    from pml_proxies.benchmark.losses import LOSS_NAMES
    from pml_proxies.benchmark.tune import cli

    assert cli.main(["--list-spaces"]) == 0
    out = capsys.readouterr().out
    for name in LOSS_NAMES:
        assert f"{name}:" in out
    assert "normalized_softmax: no space" in out and "proxy_lr in [1e-06, 1]" in out


def test_worker_argv_drops_the_local_worker_count():
    from pml_proxies.benchmark.tune.cli import _worker_argv

    argv = ["--trials", "3", "--workers", "2", "--worker-index=5", "--storage", "u"]
    typed = "pml-proxies-benchmark tune --trials 3 --workers 2 --worker-index=5 --storage u"
    assert _worker_argv(argv, 1) == [
        "--trials", "3", "--storage", "u", "--worker-only", "--workers", "1", "--worker-index", "1",
        "--started-by", typed,
    ]  # fmt: skip


def test_the_benchmark_command_dispatches_tune(capsys):
    from pml_proxies.benchmark import cli

    assert cli.main(["tune", "--list-spaces"]) == 0
    assert "proxy_anchor: (proxy_anchor.yaml)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trials", "0"], "--trials must be an integer >= 1"),
        (["--epochs", "0"], "argument --epochs"),
        (["--space", "mpa.alpha=2"], "--space expects"),
        (["--grace-period", "5", "--heartbeat", "10"], "--grace-period"),
    ],
)
def test_bad_tune_options_are_usage_errors(argv, message, capsys):
    from pml_proxies.benchmark.tune import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--dataset", "digits", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_postgres_urls_get_the_installed_driver():
    import importlib.util

    from pml_proxies.benchmark.tune.study import postgres_driver_url

    assert postgres_driver_url("sqlite:///x.db") == "sqlite:///x.db"
    assert postgres_driver_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    if importlib.util.find_spec("psycopg2") is not None:
        assert postgres_driver_url("postgresql://u@h:5/db") == "postgresql+psycopg2://u@h:5/db"
