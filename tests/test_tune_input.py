"""Bad input to ``tune`` (issue 22): every option that would make every trial fail, a storage
that cannot hold the search, a command that does not match the stored studies, a second command
on one folder. Each is refused up front with one line and the right exit code (2: usage, 1:
runtime, 3: busy folder), creates nothing, and never hangs; the report reads the stored
settings. In-process runs with a fast fake objective (no training) unless the check needs the
data."""

from __future__ import annotations

import datetime
import math
import sqlite3
import subprocess
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

import tune_fake_objective as fake  # noqa: E402
from tune_helpers import REPO, run  # noqa: E402

from pml_proxies.benchmark.tune import cli  # noqa: E402
from pml_proxies.benchmark.tune import report as tr  # noqa: E402
from pml_proxies.benchmark.tune import spaces as sp  # noqa: E402
from pml_proxies.benchmark.tune.study import (  # noqa: E402
    ERROR_ATTR,
    SearchSettings,
    counts,
    default_storage,
    make_storage,
    run_worker,
)

S = optuna.trial.TrialState
FAKE = ["--dataset", "digits", "--losses", "proxy_nca", "--no-progress", "--startup-trials", "1",
        "--objective", "tune_fake_objective:quadratic", "--no-reproduce"]  # fmt: skip


def _usage_error(argv: list[str], capsys) -> str:
    """The message of a usage error (exit 2 from the parser) of ``tune argv``."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _tune(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``tune argv`` run in this process."""
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ the search space
@pytest.mark.timeout(120, method="thread")  # before the fix: an endless loop (ends the run)
@pytest.mark.parametrize("bounds", ["-inf:inf", "0:1e400", "nan:1"])
def test_non_finite_bounds_are_usage_errors(bounds, tmp_path, capsys):
    out = tmp_path / "out"
    item = f"proxy_anchor.margin={bounds}"
    err = _usage_error(
        ["--dataset", "digits", "--losses", "proxy_anchor", "--space", item, "--output", str(out)],
        capsys,
    )
    assert f"--space {item}" in err and "finite" in err
    assert not out.exists()


@pytest.mark.timeout(120, method="thread")  # before the fix: an endless loop (ends the run)
def test_an_error_while_sampling_counts_toward_the_error_budget(tmp_path):
    storage = make_storage(default_storage(tmp_path))
    # a space no check has seen (built directly): Optuna refuses it when the trial samples it
    space = {"proxy_nca": [sp.SpaceEntry("softmax_scale", -math.inf, math.inf)]}
    settings = SearchSettings(n_trials=2, startup_trials=1)
    run_worker(storage, "t", space, settings, fake.quadratic, tmp_path, log=lambda m: None)
    study = optuna.load_study(study_name="t/proxy_nca", storage=storage)
    assert [t.state for t in study.trials] == [S.FAIL, S.FAIL]
    assert all(ERROR_ATTR in t.user_attrs for t in study.trials)
    assert counts(study)["errors"] == 2


def test_an_argument_the_loss_does_not_have_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    err = _usage_error(
        [*FAKE, "--space", "proxy_nca.no_such_arg=0:1", "--output", str(out)], capsys
    )
    assert "--space proxy_nca.no_such_arg=0:1" in err and "no argument 'no_such_arg'" in err
    assert not out.exists()


def test_val_fraction_zero_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    err = _usage_error(["--dataset", "digits", "--losses", "proxy_nca", "--val-fraction", "0",
                        "--output", str(out)], capsys)  # fmt: skip
    assert "argument --val-fraction" in err and "--folds" in err
    assert not out.exists()


@pytest.mark.timeout(300)
def test_more_folds_than_half_the_classes_is_refused_before_any_trial(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _tune(["--dataset", "digits", "--losses", "proxy_nca", "--folds", "1000",
                       "--trials", "1", "--no-progress", "--output", str(out)], capsys)  # fmt: skip
    assert code == 2 and "--folds 1000" in err and "half the training classes" in err
    assert not out.exists()  # nothing of the refused command is left


# ------------------------------------------------------------------ the storage
@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url, tmp_path, capsys):
    err = _usage_error([*FAKE, "--storage", url, "--output", str(tmp_path / "o")], capsys)
    assert "in-memory SQLite" in err and "--storage" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("url, message", [
    ("not a url", "is not a database URL"),
    ("nosuchdb://u@h/db", "is not a database URL"),
    ("sqlite:///{tmp}/missing/t.sqlite3", "does not exist"),
])  # fmt: skip
def test_bad_storage_urls_are_usage_errors(url, message, tmp_path, capsys):
    url = url.format(tmp=tmp_path)
    err = _usage_error([*FAKE, "--storage", url, "--output", str(tmp_path / "o")], capsys)
    assert f"--storage {url!r}" in err and message in err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "o").exists()


def _newer_schema(path: Path) -> None:
    make_storage(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE version_info SET schema_version = 99, library_version = '99.0.0'")
        db.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "file is not a database"),
    ("newer", "no longer compatible with the table schema"),
    ("unreachable", "127.0.0.1"),
])  # fmt: skip
def test_a_storage_that_cannot_be_opened_is_one_line_and_exit_1(kind, message, tmp_path, capsys):
    db = tmp_path / "t.sqlite3"
    if kind == "corrupt":
        db.write_text("not a database " * 100)
        url = f"sqlite:///{db}"
    elif kind == "newer":
        _newer_schema(db)
        url = f"sqlite:///{db}"
    else:
        pytest.importorskip("psycopg2")
        url = "postgresql://user:secret@127.0.0.1:1/db"  # nothing listens on port 1
    code, err = _tune([*FAKE, "--storage", url, "--output", str(tmp_path / "o")], capsys)
    assert code == 1 and message in err
    assert len(err.strip().splitlines()) == 1 and "secret" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_storage_error_prints_no_traceback(tmp_path):
    db = tmp_path / "t.sqlite3"
    db.write_text("not a database " * 100)
    done = run([*FAKE, "--storage", f"sqlite:///{db}", "--output", str(tmp_path / "o")])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "file is not a database" in done.stderr


# ------------------------------------------------------------------ the stored studies
def _searched(tmp_path: Path, capsys, *extra: str) -> list[str]:
    """A finished fake search (2 trials, 2 epochs) in ``tmp_path/out``; returns its argv."""
    argv = [*FAKE, "--trials", "2", "--epochs", "2", "--output", str(tmp_path / "out"), *extra]
    code, err = _tune(argv, capsys)
    assert code == 0, err
    return argv


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [["--report-only"], ["--workers", "2"]])
def test_another_protocol_than_the_studies_is_refused_naming_the_fields(mode, tmp_path, capsys):
    argv = _searched(tmp_path, capsys)
    report = (tmp_path / "out" / "tune_report.md").read_text()
    code, err = _tune([*argv, "--epochs", "3", "--lr", "0.002", *mode], capsys)
    assert code == 2, err
    assert "epochs: 2 -> 3" in err and "lr: None -> 0.002" in err
    assert "fingerprint" not in err
    assert (tmp_path / "out" / "tune_report.md").read_text() == report  # nothing rewritten
    assert not (tmp_path / "out" / "logs").exists()  # no worker started


def test_tune_refuses_distributed_training_instead_of_ignoring_it(tmp_path, capsys, monkeypatch):
    """``--nproc-per-node`` was accepted and ignored (each trial trained in one process), and
    under torchrun every rank searched as the same worker: both are usage errors now."""
    out = tmp_path / "out"
    err = _usage_error([*FAKE, "--nproc-per-node", "2", "--output", str(out)], capsys)
    assert "argument --nproc-per-node: tune trains each trial in one process" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _usage_error([*FAKE, "--output", str(out)], capsys)
    assert "tune does not run under torchrun" in err
    assert not out.exists()


@pytest.mark.timeout(300)
def test_a_failed_search_worker_fails_the_command_after_the_report(tmp_path, capsys, monkeypatch):
    """A local worker that exits with an error (killed, out of memory, a crash) leaves its
    trials undone: the parent still writes the report of what was finished, then exits 1 (it
    exited 0 before)."""
    argv = _searched(tmp_path, capsys)
    monkeypatch.setattr(cli, "_spawn_workers", lambda argv, k, logs: [0, 1][:k])
    code, err = _tune([*argv, "--workers", "2"], capsys)
    assert code == 1, err
    assert "search workers [1] exited with errors" in err and "run the same command again" in err
    assert (tmp_path / "out" / "tune_report.md").is_file()


def test_the_report_prints_the_stored_budget_and_sampler_seed(tmp_path, capsys):
    argv = _searched(tmp_path, capsys, "--sampler-seed", "5")
    code, err = _tune([*argv, "--report-only", "--trials", "3", "--sampler-seed", "0"], capsys)
    assert code == 0, err
    report = (tmp_path / "out" / "tune_report.md").read_text()
    assert "* budget: 2 trials per loss" in report and "TPE, seed 5 " in report
    assert "| proxy_nca | done | 2 |" in report


def test_report_only_on_a_missing_folder_refuses_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "missing"
    err = _usage_error([*FAKE, "--report-only", "--output", str(out)], capsys)
    assert f"{out} does not exist" in err
    assert not out.exists()


def test_report_only_without_a_study_refuses_and_creates_nothing(tmp_path, capsys):
    _searched(tmp_path, capsys)  # a storage holding the studies of prefix "tune"
    url = default_storage(tmp_path / "out")
    out = tmp_path / "new"
    code, err = _tune([*FAKE, "--report-only", "--storage", url, "--study-name", "other",
                       "--output", str(out)], capsys)  # fmt: skip
    assert code == 2 and "no study other/proxy_nca" in err
    assert not out.exists()


def test_report_only_on_a_folder_without_a_storage_creates_no_storage(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, err = _tune([*FAKE, "--report-only", "--output", str(out)], capsys)
    assert code == 2 and "no search to report" in err
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ one command per folder
def test_a_second_command_on_a_locked_folder_is_refused(tmp_path, capsys):
    from pml_proxies.benchmark.runner import folder_lock

    out = tmp_path / "out"
    with folder_lock(out):  # the first command (the benchmark's own lock)
        code, err = _tune([*FAKE, "--trials", "2", "--output", str(out)], capsys)
    assert code == 3 and str(out) in err and "lock" in err
    assert not (out / "tune.sqlite3").exists()


# ------------------------------------------------------------------ the report
def _trial(number, state, start, seconds, **user_attrs):
    distribution = optuna.distributions.FloatDistribution(0.0, 1.0)
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=0.5 if state == S.COMPLETE else None,
        datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=seconds),
        params={"x": 0.5}, distributions={"x": distribution}, user_attrs=user_attrs,
        system_attrs={}, intermediate_values={}, trial_id=number,
    )  # fmt: skip


def test_a_stale_trials_dead_time_is_not_trial_time(tmp_path):
    storage = make_storage(default_storage(tmp_path))
    study = optuna.create_study(storage=storage, study_name="t/proxy_nca", direction="maximize")
    start = datetime.datetime(2026, 1, 1)
    study.add_trial(_trial(0, S.FAIL, start, 1000))  # killed, failed when found stale
    study.add_trial(_trial(1, S.COMPLETE, start, 10))  # its retry
    study.add_trial(_trial(2, S.FAIL, start, 5, **{ERROR_ATTR: "RuntimeError: x"}))  # raised
    spaces = {"proxy_nca": [sp.SpaceEntry("x", 0.0, 1.0)]}
    (row,) = tr.search_summary({"proxy_nca": study}, spaces, 1)
    assert row["trial_time_s"] == 15.0  # the retry's own time and the errored trial's
    assert row["wall_s"] == 1000.0  # wall time spans every trial


def test_importances_need_enough_complete_trials_and_the_report_says_so(tmp_path):
    storage = make_storage(default_storage(tmp_path))
    spaces = sp.resolve_spaces(["proxy_nca"])
    settings = SearchSettings(n_trials=3, startup_trials=1)
    run_worker(storage, "t", spaces, settings, fake.quadratic, tmp_path, log=lambda m: None)
    studies = tr.load_studies(storage, "t", ["proxy_nca"])
    plots = tr.write_plots(studies, tmp_path / "plots")
    assert set(plots["proxy_nca"]) == {"history"}
    rows = tr.search_summary(studies, spaces, 3)
    md = tr.search_markdown(
        rows, spaces, dict(n_trials=3, seed=0, startup_trials=1, prune=False, folds=1,
                           trial_seed=0, primary_metric="mean_average_precision_at_r"),
        plots, 1e-3,
    )  # fmt: skip
    assert f"from {tr.MIN_IMPORTANCE_TRIALS} complete trials on" in md and "proxy_nca (3)" in md


# ------------------------------------------------------------------ help and git
def test_help_gives_the_output_folder_tune_writes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {cli.DEFAULT_OUTPUT})" in help_text and "benchmark_results" not in help_text
    assert cli.build_parser().parse_args([]).output == cli.DEFAULT_OUTPUT


def test_the_default_output_folder_is_git_ignored():
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"{cli.DEFAULT_OUTPUT}/tune_report.md"], cwd=REPO
    )
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0
