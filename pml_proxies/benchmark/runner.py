"""Run every (loss, seed) of a benchmark, resuming finished runs, and write the report.

The flow is one way: config -> run specs (:func:`resolve_specs`) -> plan of the output folder
(:meth:`~pml_proxies.benchmark.store.RunStore.plan`: finished runs reused, the others trained)
-> training (:func:`train_runs`) -> the store (each run's
:class:`~pml_proxies.benchmark.store.RunFolder`) -> the report. :func:`resume_runs` is the plan
and resume step, shared with the tuner's re-runs. The output folder's layout and integrity rules
(one protocol per folder, the lock, the schema checks, damaged runs) are the store's
(:mod:`~pml_proxies.benchmark.store`).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

import torch

from . import distributed as ddp
from .config import BenchmarkConfig, ConfigError
from .data import BenchmarkData, load_config_data
from .losses import build_loss
from .parallel import RunFailure, train_parallel
from .progress import is_terminal, progress_bar
from .spec import RunSpec, build_run_spec
from .store import (  # noqa: F401 - re-exported: the CLIs and the tuner import them from here
    CONFIG_FILE,
    LOCK_FILE,
    PROTOCOL_FILE,
    FolderBusy,
    ProtocolMismatch,
    RunInfo,
    RunStore,
    folder_lock,
    protocol_differences,
    protocol_schema,
    recorded_protocol,
)
from .train import torch_threads, train_and_evaluate


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def run_benchmark(config: BenchmarkConfig, report_only: bool = False) -> dict:
    """Train and evaluate every loss x seed of ``config``, then write the report.

    The runs to train are trained ``config.jobs_for(n)`` at a time (worker processes,
    :mod:`~pml_proxies.benchmark.parallel`; the results do not depend on it). Finished runs
    (``runs/<loss>/seed_<s>/result.json`` with a matching protocol fingerprint) are reused: an interrupted benchmark resumes where it stopped. ``report_only`` trains nothing and
    rebuilds the report and plots from the finished runs (missing ones are left out).

    Returns:
        ``{"runs": DataFrame, "summary": DataFrame, "files": {name: path}, "skipped": n}``
        (``skipped``: finished runs reused).

    Raises:
        ConfigError: no loss, a loss argument its constructor rejects, or ``report_only`` with
            an output folder that does not exist (nothing is created).
        ProtocolMismatch: the output folder holds runs of another protocol, or its protocol
            record is damaged or lacks a setting.
        FolderBusy: another benchmark is running on the output folder.
        RunsFailed: some runs raised (each is noted with its loss and seed when it fails); the
            other runs were trained and the report written first.

    Under ``torchrun`` (:mod:`~pml_proxies.benchmark.distributed`) every process calls it: each
    run is trained by all of them (DDP); rank 0 alone writes the folder and returns the above,
    the other ranks return ``{}``. A run that raises there stops the job.
    """
    config = ddp.setup(config)
    specs = resolve_specs(config)
    if not ddp.is_main():
        return follow(config, specs)
    with ddp.leading() as send:
        return _run_benchmark(config, specs, report_only, send)


def follow(config: BenchmarkConfig, specs: Sequence[RunSpec]) -> dict:
    """A rank other than 0: train the runs rank 0 names (see :func:`~pml_proxies.benchmark.distributed.leading`) in temporary
    folders; ``{}`` (rank 0 reports)."""
    message: list = [None]
    torch.distributed.broadcast_object_list(message, src=0)
    runs = message[0]
    if not runs:  # rank 0 stopped (its error is printed there) or has nothing to train
        return {}
    by_run = {(s.loss, s.seed): s for s in specs}
    with torch_threads(config):
        data = load_config_data(config, progress=False)
        for key in runs:
            with tempfile.TemporaryDirectory(prefix="pml-proxies-rank") as tmp:
                train_and_evaluate(by_run[tuple(key)], data, Path(tmp) / "run")
    return {}


def _run_benchmark(
    config: BenchmarkConfig,
    specs: list[RunSpec],
    report_only: bool,
    send: Callable[[list[tuple[str, int]]], None],
) -> dict:
    store = RunStore(config.output)
    output = store.path
    if report_only and not output.is_dir():
        raise ConfigError(
            "output", f"{output} is not a folder: --report-only reports the finished runs of an "
            "existing output folder"
        )  # fmt: skip
    store.check(config, specs)  # reads only: nothing is written on refusal
    fresh = not output.exists()
    try:
        with torch_threads(config), store.lock():
            store.check(config, specs)  # again, under the lock
            return _run(config, specs, store, report_only, send)
    except BaseException:
        if fresh and not store.has_runs():  # e.g. the data set failed to load
            shutil.rmtree(output, ignore_errors=True)
        raise


def resolve_specs(config: BenchmarkConfig) -> list[RunSpec]:
    """The run specs of ``config`` (losses outer, seeds inner), each loss built once on a toy
    problem so that a bad loss argument fails before anything is written."""
    if not config.losses:
        raise ConfigError("losses", "name at least one loss")
    specs = []
    for loss in config.losses:
        loss_specs = [build_run_spec(config, loss, seed) for seed in config.seeds]
        try:
            build_loss(
                loss, 3, 4, dataset=config.dataset, overrides=dict(loss_specs[0].loss_overrides)
            )
        except (TypeError, ValueError) as e:
            raise ConfigError("loss_params", f"loss {loss!r}: {e}") from None
        specs += loss_specs
    return specs


def check_folder(config: BenchmarkConfig, specs: list[RunSpec], output: Path) -> None:
    """Refuse, before anything is trained or written, an output folder of another protocol
    (whatever losses the command names), one whose protocol record is damaged or lacks a
    setting, or one holding a finished run of one of ``specs`` with another fingerprint (other
    loss arguments): :meth:`~pml_proxies.benchmark.store.RunStore.check`."""
    RunStore(output).check(config, specs)


# ------------------------------------------------------------------ the runs
class RunsFailed(RuntimeError):
    """Some runs raised; the others finished and are in the report. ``failures``: one
    :class:`~pml_proxies.benchmark.parallel.RunFailure` per failed run."""

    def __init__(self, failures: list[RunFailure]) -> None:
        super().__init__(
            f"{len(failures)} run(s) failed (the report holds the others; the same command "
            "trains the failed ones again): " + "; ".join(str(f) for f in failures)
        )
        self.failures = failures


def _run(
    config: BenchmarkConfig,
    specs: list[RunSpec],
    store: RunStore,
    report_only: bool,
    send: Callable[[list[tuple[str, int]]], None],
) -> dict:
    info = RunInfo(threads=torch.get_num_threads())
    # the data sets' own tqdm bars only on a terminal
    data = load_config_data(config, progress=config.progress and is_terminal())
    store.record(config)
    results, failures = resume_runs(
        specs, store, config, lambda: data, info, report_only=report_only, announce=send
    )
    info.total_s = time.time() - info.start
    if not results:
        if failures:
            raise RunsFailed(failures)
        raise ValueError(f"{store.path} holds no finished run of these losses and seeds to report")
    order = sorted(results)
    from .report import write_report  # pandas, matplotlib, scipy: only once there is a report

    files, runs, summary = write_report(
        config, data, [specs[i] for i in order], [results[i] for i in order], store, info
    )
    if failures:
        raise RunsFailed(failures)
    return {"runs": runs, "summary": summary, "files": files, "skipped": info.reused}


def resume_runs(
    specs: list[RunSpec],
    store: RunStore,
    config: BenchmarkConfig,
    load_data: Callable[[], BenchmarkData],
    info: RunInfo,
    *,
    report_only: bool = False,
    announce: Callable[[list[tuple[str, int]]], None] | None = None,
) -> tuple[dict[int, dict], list[RunFailure]]:
    """Reuse the finished runs of ``specs`` in ``store`` and train the others
    (:meth:`~pml_proxies.benchmark.store.RunStore.plan`): the one plan-and-resume step of the
    benchmark and of the tuner's re-runs.

    A damaged or unfinished run is noted with its path and trained again (with ``report_only``:
    left out, nothing is trained). The runs to train are trained ``config.jobs_for(n)`` at a
    time (:func:`train_runs`; ``load_data()`` is called only to train in this process), with a
    progress bar when ``config.progress``; a run that raises is noted and the others go on.
    ``announce(runs)`` is called with the ``(loss, seed)`` of the runs to train before they are
    trained (under torchrun the other ranks train them too). ``info`` counts the runs trained,
    reused and trained again, and the jobs.

    Returns:
        ``(results, failures)``: index in ``specs`` -> result of each finished run (reused or
        trained), and the failures of the runs that raised.

    Raises:
        ProtocolMismatch: a finished run of a spec has another fingerprint (nothing is
            trained).
    """
    plan = store.plan(specs)
    for i, problem in plan.problems.items():
        if report_only:
            _note(f"{problem}: left out of the report")
        else:
            _note(f"{problem}: the run is trained again")
            info.redone.append(store.relative(store.run_of(specs[i]).path))
    results = dict(plan.finished)  # their fingerprints were checked by the plan
    info.reused += len(results)
    todo = [] if report_only else plan.todo
    info.jobs = config.jobs_for(len(todo)) if todo else 1
    if announce is not None:  # under torchrun the other ranks train these runs with this process
        announce([(specs[i].loss, specs[i].seed) for i in todo])
    failures: list[RunFailure] = []
    if not todo:
        return results, failures
    data = load_data() if info.jobs == 1 else None
    outcomes = train_runs(
        [specs[i] for i in todo], data, store.path, config, info.jobs, on_wait=lambda: bar.refresh()
    )
    bar = progress_bar(
        outcomes, desc="benchmark", enabled=config.progress, total=len(todo), each_item=True
    )
    with contextlib.closing(outcomes):  # an interruption stops the workers
        for k, outcome in bar:
            spec = specs[todo[k]]
            if isinstance(outcome, RunFailure):
                _note(f"{outcome} (the other runs go on)")
                failures.append(outcome)
            else:
                info.trained += 1
                results[todo[k]] = outcome
            status = "failed" if isinstance(outcome, RunFailure) else "done"
            bar.set_postfix_str(f"{spec.loss} seed {spec.seed} {status}")
    return results, failures


def train_runs(
    specs: list[RunSpec],
    data: BenchmarkData | None,
    output: Path,
    config: BenchmarkConfig,
    jobs: int,
    on_wait: Callable[[], None] | None = None,
) -> Generator[tuple[int, dict | RunFailure], None, None]:
    """Train ``specs`` into their run folders of the output folder ``output``; yields
    ``(index in specs, result or RunFailure)`` as runs finish: in this process with
    ``jobs == 1`` (on ``data``), else in ``jobs`` worker processes that load the data themselves
    (:func:`~pml_proxies.benchmark.parallel.train_parallel`, the same results). Closing the
    generator stops the workers."""
    store = RunStore(output)
    if jobs > 1:
        yield from train_parallel(config, [(s, store.run_of(s).path) for s in specs], jobs, on_wait)
        return
    if data is None:
        raise ValueError("train_runs needs the data to train in this process (jobs == 1)")
    for i, spec in enumerate(specs):
        try:
            result = train_and_evaluate(spec, data, store.run_of(spec), position=1)
        except Exception as e:  # noqa: BLE001 - reported with its run; the others go on
            if ddp.world_size() > 1:  # the other ranks cannot go on alone: stop the job
                raise
            yield (
                i,
                RunFailure(
                    spec.loss, spec.seed, f"{type(e).__name__}: {e}", traceback.format_exc()
                ),
            )
        else:
            yield i, result
