"""Parallel benchmark runs (``--jobs N``): N worker processes each train one (loss, seed) run at a
time.

* Workers are *spawned* (a fresh interpreter: no forked torch state, the same on every OS). Each
  loads the data itself (what the parent has decoded, the Omniglot images or a user's data,
  comes with the worker's arguments rather than being decoded again:
  :func:`~pml_proxies.datasets.omniglot.decoded_images`,
  :func:`~pml_proxies.benchmark.userdata.read_user_data`), sets torch's CPU threads as a
  sequential run does (:attr:`~pml_proxies.benchmark.config.BenchmarkConfig.threads_or_default`)
  and trains a run with the same :func:`~pml_proxies.benchmark.train.train_and_evaluate` and the
  same spec as the sequential loop, so a run's result does not depend on ``jobs``. A worker
  checks that it imported the parent's ``pml_proxies`` (the parent's ``sys.path`` is passed on
  by spawn).
* A run that raises is reported with its loss and seed; the other runs go on
  (:class:`RunFailure`). A worker that dies (killed, out of memory) fails its run the same way.
* Ctrl-C (or any error) in the parent stops every worker (terminate, then kill) before the
  exception goes on: no orphan process trains on. Workers ignore SIGINT themselves (the parent
  decides), turn the parent's SIGTERM into a clean exit (their semaphores released) and exit
  when their parent is gone. A run stopped midway has no ``result.json``
  (written atomically at the very end), so the next invocation trains it again.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import BenchmarkConfig
from .interrupt import catching_interrupts
from .interrupt import check as check_interrupt

if TYPE_CHECKING:
    from .spec import RunSpec

#: seconds the parent waits for a terminated worker before killing it
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RunFailure:
    """A run that raised (or whose worker died): ``error`` is one line, ``details`` the
    traceback where there is one."""

    loss: str
    seed: int
    error: str
    details: str = ""

    def __str__(self) -> str:
        return f"{self.loss} seed {self.seed}: {self.error}"


def train_parallel(
    config: BenchmarkConfig,
    runs: Sequence[tuple[RunSpec, Path]],
    jobs: int,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[tuple[int, dict | RunFailure]]:
    """Train ``runs`` (``(spec, path of its run folder)``, each stored through its
    :class:`~pml_proxies.benchmark.store.RunFolder`) with ``jobs`` spawned workers; yields
    ``(index in runs, result dict or RunFailure)`` as each run finishes; ``on_wait()`` is called
    about twice a second while none finishes (a progress display's refresh). Closing the
    generator (or an exception in the consumer, e.g. ``KeyboardInterrupt``) stops every
    worker."""
    import pml_proxies

    ctx = multiprocessing.get_context("spawn")
    tasks = ctx.Queue()
    results = ctx.Queue()
    for index, (spec, directory) in enumerate(runs):
        # a spec is rebuilt in the worker from its own config (the run's overrides applied)
        tasks.put((index, spec.config, spec.loss, spec.seed, str(directory)))
    jobs = max(1, min(jobs, len(runs)))
    for _ in range(jobs):
        tasks.put(None)
    worker_config = replace(config, progress=False)
    args = (worker_config, tasks, results, os.getpid(), pml_proxies.__file__, _decoded_data())
    workers = _start(ctx, jobs, _worker, args)
    pending = set(range(len(runs)))
    running: dict[int, int] = {}  # worker pid -> run index
    ready = False  # a worker has started
    try:
        while pending:
            check_interrupt()
            try:
                message = results.get(timeout=0.5)
            except queue.Empty:
                if on_wait is not None:
                    on_wait()
                if any(w.is_alive() for w in workers):
                    yield from _dead_workers(workers, running, pending, runs)
                    continue
                try:  # every worker has exited: what they sent before is readable now
                    message = results.get(timeout=1.0)
                except queue.Empty:
                    if not ready:
                        codes = ", ".join(str(w.exitcode) for w in workers)
                        raise RuntimeError(
                            f"the worker processes exited before training (exit codes {codes}); "
                            "a script that runs the benchmark with jobs > 1 must guard its code "
                            "with `if __name__ == '__main__':` (spawned workers import the main "
                            "module), or use jobs=1"
                        ) from None
                    yield from _dead_workers(workers, running, pending, runs)
                    for index in sorted(pending):
                        yield index, _failure(runs, index, "not trained: every worker stopped")
                    return
            kind, pid, index, payload = message
            if kind == "fatal":  # a worker could not start (data, wrong package): stop all
                raise RuntimeError(payload)
            if kind == "ready":
                ready = True
                continue
            if kind == "started":
                running[pid] = index
                continue
            running.pop(pid, None)
            if index not in pending:  # already failed: its worker was seen dead first
                continue
            pending.discard(index)
            if kind == "done":
                yield index, payload
            else:
                yield index, _failure(runs, index, *payload)
    finally:
        _stop(workers, graceful=not pending)
        for q in (tasks, results):
            q.cancel_join_thread()
            q.close()


def _decoded_data() -> dict:
    """What this process has decoded of the data (the Omniglot images, a user's data), handed to
    the workers with their arguments so that they do not decode it again (:func:`_adopt`)."""
    from ..datasets.omniglot import decoded_images
    from .userdata import read_user_data

    return {"omniglot": decoded_images(), "user_data": read_user_data()}


def _adopt(decoded: dict) -> None:
    """Take the parent's :func:`_decoded_data` in a worker."""
    from ..datasets.omniglot import adopt_decoded_images
    from .userdata import adopt_user_data

    adopt_decoded_images(decoded.get("omniglot", {}))
    adopt_user_data(decoded.get("user_data", {}))


def _failure(runs: Sequence[tuple[RunSpec, Path]], index: int, *error: str) -> RunFailure:
    """The failure of run ``index`` of ``runs`` (``error``: the one line, then the details)."""
    spec = runs[index][0]
    return RunFailure(spec.loss, spec.seed, *error)


def _start(ctx, n: int, target: Callable, args: tuple) -> list:
    """Start ``n`` processes with SIGINT ignored from their first instruction (a spawned
    interpreter keeps an ignored SIGINT ignored), so that Ctrl-C reaches only the parent."""
    previous = None
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: the workers ignore SIGINT once started
        pass
    try:
        workers = [ctx.Process(target=target, args=args, daemon=True) for _ in range(n)]
        for w in workers:
            w.start()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return workers


def _dead_workers(workers, running: dict[int, int], pending: set, runs) -> Iterator:
    """Fail the run of each worker that died while training it (a worker exits normally, code
    0, only after its last run's result was sent)."""
    for w in workers:
        if w.exitcode in (None, 0) or w.pid not in running:
            continue
        index = running.pop(w.pid)
        if index in pending:
            pending.discard(index)
            yield index, _failure(runs, index, f"its worker process died (exit code {w.exitcode})")


def _stop(workers, graceful: bool) -> None:
    """Stop ``workers``: with ``graceful`` (every run finished) let them exit on their own first;
    terminate the others, then kill what is still alive after :data:`STOP_TIMEOUT_S`."""
    deadline = time.time() + STOP_TIMEOUT_S
    if graceful:
        for w in workers:
            w.join(max(0.0, deadline - time.time()))
    for w in workers:
        if w.is_alive():
            w.terminate()
    deadline = time.time() + STOP_TIMEOUT_S
    for w in workers:
        w.join(max(0.0, deadline - time.time()))
        if w.is_alive():
            w.kill()
            w.join()


def _watch_parent(parent_pid: int) -> None:
    """Exit this worker when its parent is gone (e.g. killed with SIGKILL)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker(config, tasks, results, parent_pid: int, parent_package: str, decoded=None) -> None:
    """A worker process: serve ``tasks`` until ``None``. The parent's ``terminate()`` (SIGTERM)
    stops it with an exception, not by killing it, so that multiprocessing's exit handlers run
    and release what this process created: e.g. tqdm's lock, a named semaphore that the
    resource tracker would otherwise report as leaked ("There appear to be N leaked semaphore
    objects") once the parent exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with catching_interrupts(signal.SIGTERM):
            _serve(config, tasks, results, parent_pid, parent_package, decoded or {})
    except KeyboardInterrupt:  # stopped by the parent, which no longer reads the results
        results.cancel_join_thread()


def _serve(config, tasks, results, parent_pid: int, parent_package: str, decoded: dict) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    pid = os.getpid()
    try:
        import pml_proxies

        if os.path.realpath(pml_proxies.__file__) != os.path.realpath(parent_package):
            raise RuntimeError(
                f"a worker process imported pml_proxies from {pml_proxies.__file__}, the parent "
                f"from {parent_package}; run with the same sys.path (PYTHONPATH) or --jobs 1"
            )
        import torch

        from .data import load_config_data

        _adopt(decoded)  # the parent's decoded images: not decoded again
        if config.threads_or_default is not None:
            torch.set_num_threads(config.threads_or_default)
        data = load_config_data(config, progress=False)
    except KeyboardInterrupt:  # stopped by the parent (SIGTERM)
        raise
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops
        results.put(("fatal", pid, None, f"a worker could not start: {type(e).__name__}: {e}"))
        return
    from .spec import build_run_spec
    from .store import RunFolder
    from .train import train_and_evaluate

    results.put(("ready", pid, None, None))
    while True:
        task = tasks.get()
        if task is None:
            return
        index, run_config, loss, seed, directory = task
        results.put(("started", pid, index, None))
        try:
            spec = build_run_spec(replace(run_config, progress=False), loss, seed)
            result = train_and_evaluate(spec, data, RunFolder(directory))
        except Exception as e:  # noqa: BLE001 - reported with its run; the others go on
            results.put(
                ("failed", pid, index, (f"{type(e).__name__}: {e}", traceback.format_exc()))
            )
        else:
            results.put(("done", pid, index, result))
