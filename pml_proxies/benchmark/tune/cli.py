"""``pml-proxies-benchmark tune``: the untuned benchmark's options plus the search's.

Also ``python -m pml_proxies.benchmark.tune``. As in the untuned benchmark, an invalid option is
a usage error (exit code 2) before anything is written, and so is a command whose protocol or
space differs from the stored studies' (naming each differing setting); a folder another command
is using is refused (exit code 3); any other failure is one ``error:`` line (exit code 1),
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..cli import QUICK, config_from_args
from ..cli import build_parser as build_benchmark_parser
from ..config import BenchmarkConfig, ConfigError, typed_command
from ..losses import LOSS_NAMES, LOSSES

PROG = "pml-proxies-benchmark tune"
DEFAULT_OUTPUT = "tune_results"


def build_parser() -> argparse.ArgumentParser:
    p = build_benchmark_parser()
    p.prog = PROG
    p.description = (
        "Tuned fair comparison (MLRC protocol): an equal Optuna TPE budget per loss over the "
        "search spaces of powerful_benchmarker_configs/, selection on held-out training classes, "
        "then the best trial of each loss re-run with --seeds and evaluated once on the test "
        "classes."
    )
    # --workers and --list-losses mean the search's here (DataLoader workers: --loader-workers)
    for container in (p, *p._action_groups):
        container.conflict_handler = "resolve"
    p.set_defaults(output=DEFAULT_OUTPUT)
    actions = {action.dest: action for action in p._actions}
    actions["output"].help = f"output folder (resumable; one search) (default: {DEFAULT_OUTPUT})"
    quick = actions["quick"]
    quick.help = (quick.help or "").replace(str(QUICK["output"]), DEFAULT_OUTPUT)  # --output wins
    a = p.add_argument
    a("--list-losses", "--list-spaces", dest="list_losses", action="store_true",
      help="list each loss's search space, then exit")  # fmt: skip
    a("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("search (tune)")
    g.add_argument("--trials", type=int, default=20, help="trials per loss (equal budget)")
    g.add_argument("--prune", action="store_true", help="Optuna MedianPruner on validation")
    g.add_argument("--folds", type=int, default=1,
                   help="K > 1: class-disjoint K-fold CV over the training classes")  # fmt: skip
    g.add_argument("--sampler-seed", type=int, default=0, help="TPE seed")
    g.add_argument("--trial-seed", type=int, default=0, help="training seed of every trial")
    g.add_argument(
        "--startup-trials",
        type=int,
        default=None,
        help="random trials before TPE (default: max(1, trials // 4), at most 10)",
    )
    g.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="LOSS.ARG=LOW:HIGH[:log|int]",
        help="override (or add) a search range (repeatable)",
    )
    g.add_argument("--configs", default=None, help="powerful_benchmarker_configs folder")
    g.add_argument("--storage", default=None,
                   help="Optuna RDB URL (default: sqlite file OUTPUT/tune.sqlite3), "
                   "e.g. postgresql://user@host:port/db")  # fmt: skip
    g.add_argument("--study-name", default="tune", help="prefix of the studies (one per loss)")
    g.add_argument("--workers", type=int, default=1, help="local worker processes")
    g.add_argument("--worker-only", action="store_true",
                   help="search only (join a study from another machine): no re-runs, no report")  # fmt: skip
    g.add_argument("--worker-index", type=int, default=0, help="sampler offset of this worker")
    # set by `--workers K` for its local workers: the command recorded in the studies is the
    # one the user typed, not the worker's
    g.add_argument("--started-by", default=None, help=argparse.SUPPRESS)
    g.add_argument("--report-only", action="store_true",
                   help="no search: re-run the best trials (unless --no-reproduce) and report")  # fmt: skip
    g.add_argument("--no-reproduce", action="store_true", help="skip the --seeds re-runs")
    g.add_argument("--with-defaults", action="store_true",
                   help="also run the untuned benchmark (paper defaults) into OUTPUT/defaults")  # fmt: skip
    g.add_argument("--heartbeat", type=int, default=10, help="trial heartbeat interval (s)")
    g.add_argument("--grace-period", type=int, default=60,
                   help="a RUNNING trial without heartbeat this long is failed and retried")  # fmt: skip
    g.add_argument("--max-retry", type=int, default=3, help="retries of a stale trial")
    g.add_argument("--objective", default=None, metavar="MODULE:NAME",
                   help="custom objective(trial_config, reporter) -> float (default: training)")  # fmt: skip
    return p


def _check_args(args: argparse.Namespace) -> None:
    from ...functional.validation import check_int

    check_int("--trials", args.trials, low=1)
    check_int("--folds", args.folds, low=1)
    check_int("--workers", args.workers, low=1)
    check_int("--worker-index", args.worker_index, low=0)
    check_int("--heartbeat", args.heartbeat, low=1)
    check_int("--grace-period", args.grace_period, low=args.heartbeat + 1)
    if args.startup_trials is not None:
        check_int("--startup-trials", args.startup_trials, low=0)
    if args.worker_only and args.report_only:
        raise ValueError("--worker-only and --report-only exclude each other")
    if args.storage is not None:
        from .study import check_storage_url

        check_storage_url(args.storage)


def _check_config(config: BenchmarkConfig, args: argparse.Namespace) -> None:
    """The options that make every trial fail, refused before any trial."""
    if args.folds == 1 and config.val_fraction == 0 and not args.report_only:
        raise ConfigError(
            "val_fraction", "tuning selects on validation classes: give > 0 (or --folds K > 1)"
        )
    if args.report_only and args.storage is None and not Path(config.output).is_dir():
        raise ValueError(f"--report-only: {config.output} does not exist (no search to report)")


def _load_objective(target: str):
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"--objective expects MODULE:NAME, got {target!r}")
    return getattr(importlib.import_module(module), name)


def _command(argv: list[str]) -> str:
    """The command line of ``argv`` as typed (shell-quoted)."""
    return typed_command(argv, "tune")


def _worker_argv(argv: list[str], index: int) -> list[str]:
    """``argv`` for local worker ``index``: search only, one process, started by ``argv``."""
    out, skip = [], False
    local = ("--workers", "--worker-index", "--started-by")
    for item in argv:
        if skip:
            skip = False
            continue
        if item in local:
            skip = True
            continue
        if item.startswith(tuple(f"{flag}=" for flag in local)):
            continue
        out.append(item)
    return [*out, "--worker-only", "--workers", "1", "--worker-index", str(index),
            "--started-by", _command(argv)]  # fmt: skip


def _spawn_workers(argv: list[str], k: int, logs: Path) -> list[int]:
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(k):
        log = open(logs / f"worker_{i}.log", "a")
        cmd = [sys.executable, "-m", "pml_proxies.benchmark.tune", *_worker_argv(argv, i)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    try:
        for proc, log in procs:
            codes.append(proc.wait())
            log.close()
    except KeyboardInterrupt:
        for proc, _ in procs:
            proc.wait()
        raise
    return codes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .study import optuna_or_exit

        optuna_or_exit()
    except ImportError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    from .runner import TuneOptions
    from .spaces import format_spaces, parse_space_overrides, resolve_spaces

    try:
        _check_args(args)
        overrides = parse_space_overrides(args.space)
        if args.list_losses:
            print(format_spaces(resolve_spaces(list(LOSS_NAMES), overrides, args.configs)))
            return 0
        search_workers = args.workers
        del args.workers  # the benchmark's workers field is the DataLoader's
        if args.loader_workers:
            args.workers = args.loader_workers
        config: BenchmarkConfig = config_from_args(args, argv)
        config = dataclasses.replace(config, command=args.started_by or _command(argv))
        _check_config(config, args)
        spaces = resolve_spaces(config.losses, overrides, args.configs)
    except ConfigError as e:
        parser.error(f"argument --{e.field.replace('_', '-')}: {e.message}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    startup = args.startup_trials
    if startup is None:
        startup = min(10, max(1, args.trials // 4))
    options = TuneOptions(
        n_trials=args.trials,
        prune=args.prune,
        folds=args.folds,
        sampler_seed=args.sampler_seed,
        trial_seed=args.trial_seed,
        startup_trials=startup,
        storage=args.storage,
        study_name=args.study_name,
        worker_index=args.worker_index,
        heartbeat=args.heartbeat,
        grace_period=args.grace_period,
        max_retry=args.max_retry,
        reproduce=not args.no_reproduce,
        with_defaults=args.with_defaults,
    )
    objective = _load_objective(args.objective) if args.objective else None
    start = time.time()
    from ..interrupt import catching_interrupts
    from ..runner import FolderBusy, ProtocolMismatch
    from .errors import StorageError, UsageError

    output = Path(config.output)
    fresh = not output.exists()
    try:
        with catching_interrupts():
            out = _run(args, argv, config, spaces, options, objective, search_workers)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume ({config.output})",
              file=sys.stderr)  # fmt: skip
        return 130
    except (UsageError, ProtocolMismatch, FolderBusy, StorageError) as e:
        # raised before any trial: a folder this command created is removed with what it holds
        if fresh and not isinstance(e, FolderBusy) and not (output / "trials").exists():
            shutil.rmtree(output, ignore_errors=True)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, FolderBusy) else 1 if isinstance(e, StorageError) else 2
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        print(f"{PROG}: error: {type(e).__name__}: {e} (--debug shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1
    if out is None:  # --worker-only
        return 0
    print(out["report_md"].read_text())
    print(f"report: {out['report_md']} ({time.time() - start:.0f} s)")
    return 0


def _run(args, argv, config, spaces, options, objective, search_workers: int):
    """:func:`_search_and_report` holding the output folder's lock (as the benchmark does: two
    commands on one folder would search as the same worker and train the same re-runs); local
    workers run under their parent's lock. ``--report-only`` is checked first: a refusal
    creates nothing."""
    from ..runner import folder_lock

    if args.report_only:
        from .runner import check_report_only

        check_report_only(config, spaces, options)
    held = folder_lock(Path(config.output)) if args.started_by is None else contextlib.nullcontext()
    with held:
        return _search_and_report(args, argv, config, spaces, options, objective, search_workers)


def _search_and_report(args, argv, config, spaces, options, objective, search_workers: int):
    """This process's share of the search (or the local workers'), then the report (none with
    ``--worker-only``)."""
    if not args.report_only:
        if search_workers > 1:
            from .runner import check_search

            # the schema created once, before the workers race; the studies' settings, the data
            # and --folds checked once, before any worker starts
            check_search(config, spaces, options, objective)
            codes = _spawn_workers(argv, search_workers, Path(config.output) / "logs")
            bad = [i for i, c in enumerate(codes) if c != 0]
            if bad:
                print(f"workers {bad} exited with errors (see {config.output}/logs/)",
                      file=sys.stderr)  # fmt: skip
        else:
            from .runner import search

            search(config, spaces, options, objective)
    if args.worker_only:
        return None
    from .runner import run_tune

    return run_tune(config, spaces, options)


__all__ = ["main", "build_parser", "LOSSES"]
