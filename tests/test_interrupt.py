"""Ctrl-C is never lost: a SIGINT whose ``KeyboardInterrupt`` a finalizer swallowed ("Exception
ignored in ...") still stops the benchmark and the search at the next safe point. A tuning test
once sent SIGINT, the exception landed in a SQLAlchemy weakref callback, and the search ran to
the end (exit 0 instead of 130)."""

from __future__ import annotations

import os
import signal

import pytest
from benchmark_helpers import tiny_config

from pml_proxies.benchmark import interrupt
from pml_proxies.benchmark import train as train_module
from pml_proxies.benchmark.runner import run_benchmark

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _SwallowsSigint:
    """Receives SIGINT while it is being finalized: Python prints and drops the exception."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the Python-level handler runs here, inside the finalizer
            pass


def swallowed_sigint() -> None:
    _SwallowsSigint()  # created and finalized at once


def test_a_sigint_swallowed_by_a_finalizer_is_raised_at_the_next_check():
    with interrupt.catching_interrupts():
        swallowed_sigint()  # no exception here: it was swallowed
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()


def test_the_previous_handler_is_restored_and_nothing_is_pending_after_the_block():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupt.catching_interrupts():
            assert signal.getsignal(signal.SIGINT) is not before
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):
                pass
    assert signal.getsignal(signal.SIGINT) is before
    interrupt.check()  # nothing pending once the block is left


def test_an_ignored_sigint_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt.catching_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            interrupt.check()
    finally:
        signal.signal(signal.SIGINT, before)


def test_training_stops_after_a_swallowed_sigint_and_writes_no_result(tmp_path, monkeypatch):
    calls = []
    real = train_module.build_loss

    def build_loss_that_swallows(*args, **kwargs):
        loss, miner = real(*args, **kwargs)

        def hook(module, inputs, output):
            calls.append(1)
            if len(calls) == 2:
                swallowed_sigint()

        loss.register_forward_hook(hook)
        return loss, miner

    monkeypatch.setattr(train_module, "build_loss", build_loss_that_swallows)
    config = tiny_config(tmp_path / "out", ["proxy_anchor"], epochs=3, iterations_per_epoch=4)
    with interrupt.catching_interrupts():
        with pytest.raises(KeyboardInterrupt):
            run_benchmark(config)
    assert len(calls) == 2  # stopped at the next iteration, not after 12
    assert list((tmp_path / "out").rglob("result.json")) == []


def test_the_search_stops_after_a_swallowed_sigint(tmp_path):
    optuna = pytest.importorskip("optuna")
    from pml_proxies.benchmark.tune import spaces as sp
    from pml_proxies.benchmark.tune.study import (
        SearchSettings,
        default_storage,
        make_storage,
        run_worker,
    )

    seen = []

    def objective(trial, reporter):
        seen.append(trial.number)
        swallowed_sigint()
        return 0.0

    storage = make_storage(default_storage(tmp_path))
    settings = SearchSettings(n_trials=5, seed=0, startup_trials=1)
    spaces = sp.resolve_spaces(["proxy_anchor"])
    with interrupt.catching_interrupts():
        with pytest.raises(KeyboardInterrupt):
            run_worker(storage, "t", spaces, settings, objective, tmp_path / "t", log=print)
    assert seen == [0]
    study = optuna.load_study(study_name="t/proxy_anchor", storage=storage)
    assert len(study.trials) == 1
