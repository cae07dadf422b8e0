"""Command line of the benchmark: ``pml-proxies-benchmark`` / ``python -m pml_proxies.benchmark``.

The options, their help texts and defaults are derived from the fields of
:class:`~pml_proxies.benchmark.config.BenchmarkConfig` (one source of truth). Every invalid value
is a usage error (exit code 2, one line naming the option, then ``see '... --help'``) raised
before any file is written; other failures print one ``error:`` line (exit code 1), ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import fields
from typing import Any, NoReturn

from .config import BenchmarkConfig, ConfigError, field_default, typed_command

#: ``--quick``: a smoke test of the whole pipeline (tests / CI); explicit options still win.
QUICK: dict[str, Any] = dict(
    epochs=2,
    iterations_per_epoch=4,
    seeds=[0],
    map_samples=300,
    output="benchmark_results/quick",
)


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _parse_key_values(items: list[str], option: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("dataset_kwargs", f"{option} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _literal(value)
    return out


def _parse_loss_params(items: list[str]) -> dict[str, dict]:
    """``["mpa.centers_per_class=2", ...]`` -> ``{"mpa": {"centers_per_class": 2}}`` (values as
    Python literals; their types are checked against the loss's constructor later)."""
    from .losses import LOSS_NAMES, LOSSES

    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        loss, dot, arg = key.partition(".")
        if not sep or not dot or not arg.strip():
            raise ConfigError("loss_params", f"expects LOSS.ARG=VALUE, got {item!r}")
        loss = loss.strip()
        if loss not in LOSSES:
            raise ConfigError(
                "loss_params", f"unknown loss {loss!r}; choose from {', '.join(LOSS_NAMES)}"
            )
        out.setdefault(loss, {})[arg.strip()] = _literal(value)
    return out


def _parse_losses(text: str) -> list[str]:
    from .losses import LOSS_NAMES, LOSSES

    if text.strip() == "all":
        return list(LOSS_NAMES)
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise ConfigError("losses", f"name at least one loss; choose from {', '.join(LOSS_NAMES)}")
    if "" in names:
        raise ConfigError("losses", f"an empty name in {text!r}")
    for n in names:
        if n not in LOSSES:
            raise ConfigError("losses", f"unknown loss {n!r}; choose from {', '.join(LOSS_NAMES)}")
    return names


def _flag(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _help(f) -> str:
    default = f.metadata.get("default_text")
    if default is None:
        value = field_default(f)
        default = "no" if value is False else ("yes" if value is True else value)
    return f"{f.metadata['help']} (default: {default})".replace("%", "%%")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage error is two lines, ``<prog>: error: <message>`` and
    ``see '<prog> --help'`` (not the whole usage block), exit code 2. The benchmark's and
    ``tune``'s command lines use it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="pml-proxies-benchmark",
        description="Train and evaluate proxy-based DML losses under one fair protocol (same "
        "trunk, sampler, optimizer, augmentation and iteration budget; model selection on "
        "held-out training classes; several seeds, mean and 95% CI) and write a report.",
    )
    groups: dict[str, Any] = {"general": p}
    for f in fields(BenchmarkConfig):
        meta = f.metadata
        if not meta or meta.get("cli", True) is False:
            continue
        group = meta["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        g = groups[group]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
        if f.name in ("pretrained", "freeze_bn"):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "download":
            kw["action"] = "store_true"
        elif f.name in ("dataset_kwargs", "loss_params"):
            kw.update(action="append", metavar="KEY=VALUE" if f.name == "dataset_kwargs"
                      else "LOSS.ARG=VALUE")  # fmt: skip
        elif f.name == "losses":
            kw["metavar"] = "NAMES"
        else:
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            if "type" in meta:
                kw["type"] = meta["type"]
        g.add_argument(_flag(f), **kw)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 epochs x 4 iterations, seed 0, 300 map points, output "
        "benchmark_results/quick (explicit options still win) (default: no)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rebuild the tables, plots and report.md from the finished runs "
        "in --output (default: no)",
    )
    p.add_argument(
        "--list-losses",
        action="store_true",
        help="list the losses and their defaults, then exit (default: no)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress display (default: tqdm bars on a terminal, else a line when a run "
        "finishes, and at most every 30 s when something else changed)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="train each run with DistributedDataParallel on N processes (one per GPU; gloo on "
        "CPU): the command runs itself under torch.distributed.run (the same as running it "
        "under torchrun); the global batch is --batch-size; not with --jobs > 1 (default: 1)",
    )
    p.add_argument(
        "--debug", action="store_true", help="show Python tracebacks of errors (default: no)"
    )
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed ``args`` (``ConfigError`` on a bad value)."""
    from .losses import LOSS_NAMES

    given = {
        f.name: getattr(args, f.name) for f in fields(BenchmarkConfig) if hasattr(args, f.name)
    }
    values: dict[str, Any] = dict(QUICK) if getattr(args, "quick", False) else {}
    values.update(given)
    values["losses"] = _parse_losses(given["losses"]) if "losses" in given else list(LOSS_NAMES)
    if "dataset_kwargs" in given:
        values["dataset_kwargs"] = _parse_key_values(given["dataset_kwargs"], "--dataset-arg")
    if "loss_params" in given:
        values["loss_params"] = _parse_loss_params(given["loss_params"])
    values["progress"] = not getattr(args, "no_progress", False)
    values["command"] = typed_command(argv)
    return BenchmarkConfig(**values)


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
    """argparse's usage error (exit 2) naming the option of the config field."""
    flags = {f.name: _flag(f) for f in fields(BenchmarkConfig)}
    flags["nproc_per_node"] = "--nproc-per-node"
    parser.error(f"argument {flags.get(e.field, e.field)}: {e.message}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tune"]:  # the tuned comparison: pml-proxies-benchmark tune ...
        from .tune.cli import main as tune_main

        return tune_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runner import resolve_specs

    if args.list_losses:
        print(list_losses(getattr(args, "dataset", field_default(_field("dataset")))))
        return 0
    from . import distributed as ddp

    try:
        config = config_from_args(args, argv)
        specs = resolve_specs(config)  # loss arguments checked by the losses' constructors
        ddp.check_nproc(config, args.nproc_per_node)
    except ConfigError as e:
        _usage_error(parser, e)
    except ValueError as e:  # a loss argument the spec builder refused
        parser.error(f"argument --loss-param: {e}")
    if (args.nproc_per_node or 1) > 1 and not ddp.under_torchrun() and not args.report_only:
        return _launch(config, specs, argv, args.nproc_per_node)
    from ..distributed import destroy

    try:
        status = _main(args, config, parser)
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


def _main(args: argparse.Namespace, config: BenchmarkConfig, parser: ArgumentParser) -> int:
    from .interrupt import catching_interrupts
    from .runner import FolderBusy, ProtocolMismatch, run_benchmark

    try:
        with catching_interrupts():
            out = run_benchmark(config, report_only=args.report_only)
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
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1
    if not out:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print()
    print(out["files"]["summary_md"].read_text())
    print(f"{out['skipped']} finished run(s) reused. Report: {out['files']['report_md']}")
    return 0


def _field(name: str):
    return next(f for f in fields(BenchmarkConfig) if f.name == name)
