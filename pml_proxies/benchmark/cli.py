"""Command line of the benchmark: ``pml-proxies-benchmark`` / ``python -m pml_proxies.benchmark``.

One parser with subcommands (:data:`COMMANDS`): ``run`` (train, evaluate, report; the default:
``pml-proxies-benchmark [OPTIONS]`` is ``pml-proxies-benchmark run [OPTIONS]``), ``tune``,
``report`` (``--report-only``) and ``list-losses`` (``--list-losses``). Each command's options
are derived the same way from its dataclasses (:func:`~pml_proxies.benchmark.options.add_options`):
:class:`~pml_proxies.benchmark.config.BenchmarkConfig`, :class:`RunOptions` /
:class:`~pml_proxies.benchmark.config.CommonOptions`, the tuner's
:class:`~pml_proxies.benchmark.tune.options.TuneArgs`. Every invalid value is a usage error
(exit code 2, one line naming the option, then ``see '... --help'``) raised before any file is
written; other failures print one ``error:`` line (exit code 1), ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from . import embed
from .config import (  # noqa: F401 - QUICK and _parse_loss_params: their former home
    QUICK,
    BenchmarkConfig,
    CommonOptions,
    ConfigError,
    _parse_loss_params,
    config_from_args,
    typed_command,
)
from .options import ArgumentParser, add_options, given_values, option, option_name

PROG = "pml-proxies-benchmark"
DESCRIPTION = (
    "Train and evaluate proxy-based DML losses under one fair protocol (same trunk, sampler, "
    "optimizer, augmentation and iteration budget; model selection on held-out training "
    "classes; several seeds, mean and 95% CI) and write a report."
)


@dataclass(frozen=True)
class RunOptions(CommonOptions):
    """``run``'s options beside the config's."""

    report_only: bool = option(
        False,
        "train nothing: rebuild the tables, plots and report.md from the finished runs in "
        "--output (the report command)",
    )
    list_losses: bool = option(
        False, "list the losses and their defaults, then exit (the list-losses command)"
    )


# ----------------------------------------------------------------- the commands' options
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``run``'s options (also the top-level parser's: ``run`` is the default command)."""
    parser.description = DESCRIPTION
    add_options(parser, BenchmarkConfig)
    add_options(parser, RunOptions)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """``report``'s options: the config's (the runs' protocol), ``--quick``, ``--debug``."""
    parser.description = (
        "Train nothing: rebuild the tables, plots and report.md from the finished runs in "
        "--output (the same as --report-only). The options give the protocol of the runs, as "
        "when they were trained; the report settings (--equivalence-margin) may differ."
    )
    add_options(parser, BenchmarkConfig)
    add_options(parser, CommonOptions, only=("quick", "debug"))  # trains nothing: no DDP


def add_list_losses_arguments(parser: argparse.ArgumentParser) -> None:
    """``list-losses``' options: the data set whose paper defaults are shown."""
    parser.description = (
        "List the losses and their defaults (the papers' values for --dataset), then exit "
        "(the same as --list-losses)."
    )
    add_options(parser, BenchmarkConfig, only=("dataset",))


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from .tune.cli import add_arguments  # loads torch: only when tune is the command

    add_arguments(parser)


def list_losses(dataset: str) -> str:
    from .losses import LOSS_NAMES, LOSSES, effective_kwargs

    lines = []
    for name in LOSS_NAMES:
        variant = LOSSES[name].variant_of
        status = f"  [this package's variant of {variant}, not a paper's loss]" if variant else ""
        kw = ", ".join(f"{k}={v}" for k, v in effective_kwargs(name, dataset).items())
        lines.append(
            f"{name:20s} {kw or '(class defaults)'}{status}\n{'':20s} {LOSSES[name].source}"
        )
    return "\n".join(lines)


def _usage_error(parser: argparse.ArgumentParser, e: ConfigError) -> NoReturn:
    """argparse's usage error (exit 2) naming the option of the settings field."""
    parser.error(f"argument {option_name(e.field, BenchmarkConfig, RunOptions)}: {e.message}")


# ----------------------------------------------------------------- running the commands
def run(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``run`` with parsed ``args`` (``argv``: the words after ``run``; ``parser``: the one
    that parsed them, for usage errors)."""
    return _benchmark(args, argv, parser, "run")


def report(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``report``: ``run`` that trains nothing (``--report-only``)."""
    return _benchmark(args, argv, parser, "report")


def show_losses(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``list-losses``: print :func:`list_losses` of ``--dataset``."""
    print(list_losses(getattr(args, "dataset", BenchmarkConfig.dataset)))
    return 0


def _tune(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    from .tune.cli import run as run_tune

    return run_tune(args, argv, parser)


def _benchmark(
    args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser, command: str | None
) -> int:
    """``run``, ``report`` or (``command`` ``None``) the options without a command."""
    options = RunOptions(**given_values(args, RunOptions))
    if command == "report":
        options = dataclasses.replace(options, report_only=True)
    if options.list_losses:
        return show_losses(args, argv, parser)
    from . import distributed as ddp
    from .runner import resolve_specs

    try:
        config = config_from_args(args, argv, typed_command(argv, command))
        specs = resolve_specs(config)  # loss arguments checked by the losses' constructors
        ddp.check_nproc(config, options.nproc_per_node)
    except ConfigError as e:
        _usage_error(parser, e)
    except ValueError as e:  # a loss argument the spec builder refused
        parser.error(f"argument --loss-param: {e}")
    nproc = options.nproc_per_node or 1
    if nproc > 1 and not ddp.under_torchrun() and not options.report_only:
        return _launch(config, specs, [*([command] if command else []), *argv], nproc)
    from ..distributed import destroy

    try:
        status = _main(options, config, parser)
    except BaseException:
        destroy(wait=False)  # under torchrun; a peer may be gone
        raise
    destroy()  # under torchrun: every rank leaves together
    return status


def _launch(config: BenchmarkConfig, specs, argv: list[str], nproc: int) -> int:
    """``--nproc-per-node N``: refuse a folder of another protocol here, then run the same
    command under ``torch.distributed.run`` (:func:`~pml_proxies.benchmark.distributed.launch`).
    """
    from pathlib import Path

    from . import distributed as ddp
    from .runner import ProtocolMismatch, check_folder

    try:
        check_folder(config, specs, Path(config.output))
    except ProtocolMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return ddp.launch(argv, nproc)


def _main(options: RunOptions, config: BenchmarkConfig, parser: argparse.ArgumentParser) -> int:
    from .interrupt import catching_interrupts
    from .runner import FolderBusy, ProtocolMismatch, run_benchmark

    try:
        with catching_interrupts():
            out = run_benchmark(config, report_only=options.report_only)
    except ConfigError as e:  # e.g. --report-only of a folder that does not exist
        _usage_error(parser, e)
    except (ProtocolMismatch, FolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ProtocolMismatch) else 3
    except KeyboardInterrupt:
        print(
            "interrupted: finished runs are kept; run the same command to resume", file=sys.stderr
        )
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if options.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1
    if not out:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print()
    print(out["files"]["summary_md"].read_text())
    print(f"{out['skipped']} finished run(s) reused. Report: {out['files']['report_md']}")
    return 0


# ----------------------------------------------------------------- the command line
@dataclass(frozen=True)
class Command:
    """A subcommand: its line in ``--help``, the function that adds its options to its parser,
    and the one that runs it: ``run(args, argv, parser)`` (the parsed options, the words after
    the command, the command's parser for usage errors) -> exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str], argparse.ArgumentParser], int]


#: the subcommands, in ``--help``'s order
COMMANDS: dict[str, Command] = {
    "run": Command(
        "train and evaluate the losses, then write the report (the default command)",
        add_run_arguments,
        run,
    ),
    "tune": Command(
        "tuned comparison: an equal Optuna search per loss, then the best trials re-run "
        "with --seeds",
        _add_tune_arguments,
        _tune,
    ),
    "report": Command(
        "train nothing: rebuild the report from the finished runs in --output",
        add_report_arguments,
        report,
    ),
    "list-losses": Command(
        "list the losses and their defaults", add_list_losses_arguments, show_losses
    ),
    "embed": Command(
        "write a features file (--dataset features:FILE) of a trunk's features of the images",
        embed.add_arguments,
        embed.run,
    ),
}


class _CommandParser(ArgumentParser):
    """A subcommand's parser. Its options are added when it is first used (the tuner's load
    torch: the top-level ``--help`` does not need them), and an argument it does not know is
    its own usage error (``pml-proxies-benchmark tune: error: ...``), not the top-level
    parser's."""

    def __init__(
        self, *args: Any, add_arguments: Callable[[argparse.ArgumentParser], None], **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self._add_arguments: Callable[[argparse.ArgumentParser], None] | None = add_arguments

    def add_arguments(self) -> None:
        """Add the command's options (once)."""
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self.add_arguments()
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def format_help(self) -> str:
        self.add_arguments()
        return super().format_help()


def _build() -> tuple[ArgumentParser, dict[str, _CommandParser]]:
    """The top-level parser (``run``'s options, then the commands) and each command's."""
    parser = ArgumentParser(prog=PROG, usage="%(prog)s [COMMAND] [OPTIONS]")
    subparsers = parser.add_subparsers(
        title="commands",
        dest="subcommand",
        metavar="COMMAND",
        parser_class=_CommandParser,
        help="what to do, each with its own --help (default: run, whose options this help lists)",
    )
    commands = {
        name: subparsers.add_parser(
            name,
            prog=f"{PROG} {name}",
            help=command.help,
            add_arguments=command.add_arguments,
        )
        for name, command in COMMANDS.items()
    }
    add_run_arguments(parser)
    return parser, commands


def build_parser() -> ArgumentParser:
    """The parser of ``pml-proxies-benchmark``: ``run``'s options (the default command) and
    the commands (:data:`COMMANDS`), each with its own options."""
    return _build()[0]


def command_parser(name: str) -> ArgumentParser:
    """The parser of command ``name`` (e.g. ``"tune"``), its options added."""
    parser = _build()[1][name]
    parser.add_arguments()
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _build()
    args = parser.parse_args(argv)
    name = args.subcommand
    if name is None:  # no command: run (the options as before there were commands)
        return _benchmark(args, argv, parser, None)
    if argv[0] != name:
        parser.error(f"argument COMMAND: {name} comes first: {PROG} {name} [OPTIONS]")
    return COMMANDS[name].run(args, argv[1:], commands[name])
