"""``pml-proxies-benchmark tune``: the untuned benchmark's options plus the search's.

Also ``python -m pml_proxies.benchmark.tune``. The options are derived as every command's
(:func:`~pml_proxies.benchmark.options.add_options`) from
:class:`~pml_proxies.benchmark.config.BenchmarkConfig` (the DataLoader workers as
``--loader-workers``: ``--workers`` are the search's) and
:class:`~pml_proxies.benchmark.tune.options.TuneArgs`. As in the untuned benchmark, an invalid option is
a usage error (exit code 2) before anything is written, and so is a command whose protocol or
space differs from the stored studies' (naming each differing setting); a folder another command
is using is refused (exit code 3); any other failure is one ``error:`` line (exit code 1),
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..config import BenchmarkConfig, ConfigError, config_from_args, quick_help, typed_command
from ..losses import LOSS_NAMES, LOSSES
from ..options import ArgumentParser, add_options, given_values, option_name
from .options import TuneArgs

PROG = "pml-proxies-benchmark tune"
DEFAULT_OUTPUT = "tune_results"
DESCRIPTION = (
    "Tuned fair comparison (MLRC protocol): an equal Optuna TPE budget per loss over the "
    "search spaces of powerful_benchmarker_configs/, selection on held-out training classes, "
    "then the best trial of each loss re-run with --seeds and evaluated once on the test "
    "classes."
)
#: the benchmark's options as the tuner shows them: its own output folder, and the DataLoader
#: workers as --loader-workers (--workers are the search's local worker processes)
CONFIG_CHANGES = {
    "output": {
        "help": "output folder (resumable; one search)",
        "cli_default": DEFAULT_OUTPUT,
        "default_text": DEFAULT_OUTPUT,
    },
    "workers": {"flag": "--loader-workers", "metavar": "LOADER_WORKERS"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tune``'s options to ``parser``: the benchmark config's and :class:`TuneArgs`'s."""
    parser.description = DESCRIPTION
    add_options(parser, BenchmarkConfig, changes=CONFIG_CHANGES)
    # --quick's output folder is --output's default here (--output wins over --quick)
    add_options(parser, TuneArgs, changes={"quick": {"help": quick_help(DEFAULT_OUTPUT)}})


def build_parser() -> ArgumentParser:
    """The parser of ``pml-proxies-benchmark tune`` (also ``python -m
    pml_proxies.benchmark.tune``)."""
    parser = ArgumentParser(prog=PROG)
    add_arguments(parser)
    return parser


def _check_config(config: BenchmarkConfig, tune: TuneArgs) -> None:
    """The options that make every trial fail or that tune cannot honour, refused before any
    trial."""
    spread = "spread a search with --workers K, or --worker-only on several machines"
    if (tune.nproc_per_node or 1) > 1:
        raise ConfigError(
            "nproc_per_node",
            f"tune trains each trial in one process ({spread}); DistributedDataParallel is for "
            "the run command",
        )
    from ..distributed import under_torchrun

    if under_torchrun():
        raise ValueError(f"tune does not run under torchrun ({spread})")
    if tune.folds == 1 and config.val_fraction == 0 and not tune.report_only:
        raise ConfigError(
            "val_fraction", "tuning selects on validation classes: give > 0 (or --folds K > 1)"
        )
    if tune.report_only and tune.storage is None and not Path(config.output).is_dir():
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
    return run(parser.parse_args(argv), argv, parser)


def run(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """Run ``tune`` with parsed ``args`` (``argv``: the words after ``tune``; ``parser``: the one
    that parsed them, for usage errors)."""
    try:
        from .study import optuna_or_exit

        optuna_or_exit()
    except ImportError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    from .spaces import format_spaces, parse_space_overrides, resolve_spaces

    try:
        tune = TuneArgs(**given_values(args, TuneArgs))
    except ConfigError as e:  # the search's own options read "--trials must be ..."
        parser.error(f"{option_name(e.field, TuneArgs)} {e.message}")
    try:
        overrides = parse_space_overrides(tune.space)
        if tune.list_losses:
            print(format_spaces(resolve_spaces(list(LOSS_NAMES), overrides, tune.configs)))
            return 0
        config = config_from_args(args, argv, command=tune.started_by or _command(argv))
        _check_config(config, tune)
        spaces = resolve_spaces(config.losses, overrides, tune.configs)
    except ConfigError as e:
        flag = option_name(e.field, BenchmarkConfig, TuneArgs, changes=CONFIG_CHANGES)
        parser.error(f"argument {flag}: {e.message}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    options = tune.tune_options()
    objective = _load_objective(tune.objective) if tune.objective else None
    start = time.time()
    from ..interrupt import catching_interrupts
    from ..runner import FolderBusy, ProtocolMismatch
    from .errors import StorageError, UsageError

    output = Path(config.output)
    fresh = not output.exists()
    try:
        with catching_interrupts():
            out = _run(tune, argv, config, spaces, options, objective)
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
        if tune.debug:
            raise
        print(f"{PROG}: error: {type(e).__name__}: {e} (--debug shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1
    if out is None:  # --worker-only
        return 0
    print(out["report_md"].read_text())
    print(f"report: {out['report_md']} ({time.time() - start:.0f} s)")
    failed = out.get("failed_workers")
    if failed:  # the report holds what the others finished; the command failed all the same
        print(f"{PROG}: error: search workers {failed} exited with errors (see "
              f"{config.output}/logs/); run the same command again to resume", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _run(tune: TuneArgs, argv, config, spaces, options, objective):
    """:func:`_search_and_report` holding the output folder's lock (as the benchmark does: two
    commands on one folder would search as the same worker and train the same re-runs); local
    workers run under their parent's lock. ``--report-only`` is checked first: a refusal
    creates nothing."""
    from ..runner import folder_lock

    if tune.report_only:
        from .runner import check_report_only

        check_report_only(config, spaces, options)
    held = folder_lock(Path(config.output)) if tune.started_by is None else contextlib.nullcontext()
    with held:
        return _search_and_report(tune, argv, config, spaces, options, objective)


def _search_and_report(tune: TuneArgs, argv, config, spaces, options, objective):
    """This process's share of the search (or the local workers'), then the report (none with
    ``--worker-only``)."""
    bad: list[int] = []
    if not tune.report_only:
        if tune.search_workers > 1:
            from .runner import check_search

            # the schema created once, before the workers race; the studies' settings, the data
            # and --folds checked once, before any worker starts
            check_search(config, spaces, options, objective)
            codes = _spawn_workers(argv, tune.search_workers, Path(config.output) / "logs")
            bad = [i for i, c in enumerate(codes) if c != 0]
            if bad:
                print(f"workers {bad} exited with errors (see {config.output}/logs/)",
                      file=sys.stderr)  # fmt: skip
        else:
            from .runner import search

            search(config, spaces, options, objective)
    if tune.worker_only:
        return None
    from .runner import run_tune

    out = run_tune(config, spaces, options)
    return {**out, "failed_workers": bad} if bad else out


__all__ = ["main", "build_parser", "add_arguments", "run", "LOSSES"]
