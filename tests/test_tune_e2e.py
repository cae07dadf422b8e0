"""``tune`` end to end with real training on digits and the default SQLite storage: stopped
with SIGINT after one completed trial and resumed (the completed trial is kept, the study
completes, the report is written)."""

from __future__ import annotations

import signal

import pytest

optuna = pytest.importorskip("optuna")

from tune_helpers import popen, run, trials, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

LOSSES = ["proxy_anchor", "multi_similarity"]
ARGS = ["--dataset", "digits", "--losses", ",".join(LOSSES), "--trials", "3", "--epochs", "2",
        "--iterations-per-epoch", "2", "--seeds", "0", "--no-progress", "--startup-trials", "1",
        "--eval-batch-size", "512"]  # fmt: skip


@pytest.mark.timeout(480)
def test_sigint_after_one_trial_then_resume(tmp_path):
    out = tmp_path / "out"
    args = [*ARGS, "--output", str(out)]
    url = f"sqlite:///{out / 'tune.sqlite3'}"
    S = optuna.trial.TrialState
    proc = popen(args, tmp_path / "first.log")
    try:
        first = wait_for(
            lambda: trials(url, "tune/proxy_anchor", (S.COMPLETE,)), 150, "a trial", proc
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "run the same command again to resume" in (tmp_path / "first.log").read_text()
    kept = {t.number: (t.value, t.params, t.datetime_complete) for t in first}
    assert not (out / "tune_report.md").exists()

    done = run(args, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for loss in LOSSES:
        finished = trials(url, f"tune/{loss}", (S.COMPLETE, S.PRUNED))
        assert len(finished) == 3
        numbers = [t.number for t in trials(url, f"tune/{loss}")]
        assert numbers == list(range(len(numbers)))
    after = {t.number: t for t in trials(url, "tune/proxy_anchor")}
    for number, (value, params, completed) in kept.items():
        t = after[number]
        assert (t.state, t.value, t.params, t.datetime_complete) == (
            S.COMPLETE, value, params, completed,
        )  # fmt: skip
    report = (out / "tune_report.md").read_text()
    assert "| proxy_anchor | done |" in report and "| multi_similarity | done |" in report
    assert "## Test results: tuned" in report
    for loss in LOSSES:
        assert (out / "tuned" / "runs" / loss / "seed_0" / "result.json").is_file()
        assert (out / "plots" / f"{loss}_history.png").is_file()
