"""The benchmark's one command line (issue 19): subcommands ``run`` (the default), ``tune``,
``report`` and ``list-losses``, every command's options derived from its dataclass fields by one
function, the options without a command working as before. Nothing here trains: the runners
are replaced by functions that record what they were given."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import pml_proxies
from pml_proxies.benchmark import cli
from pml_proxies.benchmark import runner as runner_module
from pml_proxies.benchmark.config import (
    NON_PROTOCOL_FIELDS,
    USER_DATA_FIELDS,
    BenchmarkConfig,
    CommonOptions,
)
from pml_proxies.benchmark.options import (
    ConfigError,
    add_options,
    check_fields,
    given_values,
    option,
)

REPO = Path(pml_proxies.__file__).resolve().parents[1]
PROG = "pml-proxies-benchmark"


@pytest.fixture
def recorded(monkeypatch):
    """``run_benchmark`` replaced: each call's (config, report_only) is appended, nothing runs."""
    calls: list[tuple[BenchmarkConfig, bool]] = []

    def fake(config, report_only=False):
        calls.append((config, report_only))
        return {}  # what a torchrun rank other than 0 returns: nothing printed

    monkeypatch.setattr(runner_module, "run_benchmark", fake)
    monkeypatch.delenv("PML_PROXIES_COMMAND", raising=False)
    return calls


def _two_line_error(err: str, prog: str, starts: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"{prog}: error: {starts}"), err
    assert lines[1] == f"see '{prog} --help'"


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


# ------------------------------------------------------------------ help
@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_has_its_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG} {name} ")
    assert "--dataset" in out  # every command has the data set (list-losses: its defaults)


def test_the_top_level_help_lists_the_commands_and_runs_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG} [COMMAND] [OPTIONS]")
    for name in cli.COMMANDS:
        assert f"    {name} " in out
    for flag in ("--epochs", "--report-only", "--list-losses", "--quick", "--nproc-per-node"):
        assert flag in out


def test_the_top_level_help_does_not_load_torch():
    """The command list needs no command's options: the tuner's (which load torch) are added
    when ``tune`` is the command."""
    code = (
        "import sys\nfrom pml_proxies.benchmark.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "False"


def test_tune_cli_does_not_import_the_benchmark_cli():
    """No import cycle: ``cli`` -> ``tune.cli`` only (lazily), never back."""
    code = (
        "import sys\nimport pml_proxies.benchmark.tune.cli\n"
        "print('pml_proxies.benchmark.cli' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ one derivation
def _config_option_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(BenchmarkConfig) if f.metadata.get("cli")]


@pytest.mark.parametrize("name", ["run", "report", "tune"])
def test_every_config_field_is_the_same_option_in_each_command(name):
    """One function derives every command's options from BenchmarkConfig: each field is an
    option of run, report and tune with the same default, help, parser and choices (tune
    changes only --output's default and the DataLoader workers' flag, --loader-workers)."""
    top = _options(cli.build_parser())
    command = _options(cli.command_parser(name))
    changed = {"output", "workers"} if name == "tune" else set()
    for f in _config_option_fields():
        a, b = top[f.name], command[f.name]
        keys = ("default", "help", "type", "choices", "nargs", "metavar", "const")
        if f.name not in changed:
            assert a.option_strings == b.option_strings, f.name
            assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys], f.name
        assert type(a) is type(b), f.name
    if name == "tune":
        assert command["workers"].option_strings == ["--loader-workers"]
        assert command["search_workers"].option_strings == ["--workers"]
        assert command["output"].default == "tune_results"


def test_the_common_options_are_the_same_in_run_report_and_tune():
    parsers = [cli.build_parser(), *(cli.command_parser(n) for n in ("run", "report", "tune"))]
    keys = ("option_strings", "default", "type", "nargs", "metavar")
    for f in dataclasses.fields(CommonOptions):
        actions = [_options(p)[f.name] for p in parsers if f.name in _options(p)]
        assert len({tuple(str(getattr(a, k)) for k in keys) for a in actions}) == 1, f.name
    assert _options(cli.command_parser("run")).keys() == _options(cli.build_parser()).keys()
    assert "nproc_per_node" not in _options(cli.command_parser("report"))  # it trains nothing


def test_list_losses_takes_only_the_data_set():
    assert set(_options(cli.command_parser("list-losses"))) == {"dataset"}


def test_the_protocol_fields_come_from_the_fields_metadata():
    """NON_PROTOCOL_FIELDS is derived from ``protocol=False`` in the fields: the same set as
    the list it replaced (a change here changes which folders a run may resume)."""
    assert set(NON_PROTOCOL_FIELDS) == {
        "losses", "seeds", "workers", "threads", "jobs", "device", "output", "progress", "root",
        "download", "command", "map_method", "map_samples", "loss_params", "equivalence_margin",
        "save_models",
    }  # fmt: skip
    protocol = BenchmarkConfig(device="cpu").protocol()
    # the settings of a user's own data are in its protocol only (a named set's is unchanged)
    assert set(protocol) == {f.name for f in dataclasses.fields(BenchmarkConfig)} - set(
        NON_PROTOCOL_FIELDS
    ) - set(USER_DATA_FIELDS)


def test_every_config_field_has_a_check_or_says_why_not():
    """Each field's check lives in its metadata; the three without one are checked elsewhere
    (primary_metric against the metrics computed) or need none (free text)."""
    unchecked = {f.name for f in dataclasses.fields(BenchmarkConfig) if "check" not in f.metadata}
    assert unchecked == {"output", "root", "primary_metric", "pipeline_version", "command"}


# ------------------------------------------------------------------ old and new forms
SAME = [
    [],
    ["--quick", "--epochs", "3", "--losses", "mpa,vcpa"],
    ["--dataset", "digits", "--seeds", "3 4", "--no-progress", "--map", "tsne"],
    ["--dataset-arg", "variant=small", "--loss-param", "mpa.alpha=30", "--no-pretrained"],
]


@pytest.mark.parametrize("argv", SAME, ids=[" ".join(a) or "(none)" for a in SAME])
def test_run_is_the_default_command(argv, recorded, tmp_path):
    argv = [*argv, "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert cli.main(["run", *argv]) == 0
    (old, old_report), (new, new_report) = recorded
    assert dataclasses.replace(new, command="") == dataclasses.replace(old, command="")
    assert not old_report and not new_report
    typed = " ".join(map(shlex.quote, argv))
    assert (old.command, new.command) == (f"{PROG} {typed}", f"{PROG} run {typed}")


def test_report_is_report_only(recorded, tmp_path):
    argv = ["--dataset", "digits", "--losses", "mpa", "--output", str(tmp_path)]
    assert cli.main([*argv, "--report-only"]) == 0
    assert cli.main(["report", *argv]) == 0
    (old, old_report), (new, new_report) = recorded
    assert old_report and new_report
    assert dataclasses.replace(new, command="") == dataclasses.replace(old, command="")
    assert new.command.startswith(f"{PROG} report ")


def test_list_losses_is_the_list_losses_option(capsys):
    assert cli.main(["--list-losses", "--dataset", "cub200"]) == 0
    old = capsys.readouterr().out
    assert cli.main(["list-losses", "--dataset", "cub200"]) == 0
    assert capsys.readouterr().out == old == cli.list_losses("cub200") + "\n"


def test_nproc_relaunches_the_command_as_typed(monkeypatch, tmp_path):
    """``run --nproc-per-node N`` runs itself under torchrun with its command word."""
    from pml_proxies.benchmark import distributed

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda argv, n: launched.append((argv, n)) or 0)
    argv = ["--dataset", "digits", "--losses", "mpa", "--device", "cpu", "--nproc-per-node", "2",
            "--output", str(tmp_path / "o")]  # fmt: skip
    assert cli.main(["run", *argv]) == 0
    assert cli.main(argv) == 0
    assert launched == [(["run", *argv], 2), (argv, 2)]


def test_tune_through_the_benchmark_command_is_the_tune_module(monkeypatch, tmp_path):
    """``pml-proxies-benchmark tune ...`` and ``python -m pml_proxies.benchmark.tune ...``: the
    same config, search settings and recorded command."""
    pytest.importorskip("optuna")
    from pml_proxies.benchmark.tune import cli as tune_cli
    from pml_proxies.benchmark.tune import runner as tune_runner

    calls = []
    monkeypatch.setattr(tune_runner, "search", lambda *a: calls.append(a[:3]))
    monkeypatch.setattr(tune_runner, "run_tune", lambda *a: None)
    monkeypatch.delenv("PML_PROXIES_COMMAND", raising=False)
    argv = ["--dataset", "digits", "--losses", "mpa", "--quick", "--trials", "3", "--folds", "2",
            "--loader-workers", "1", "--no-reproduce", "--space", "mpa.alpha=1:10:log",
            "--worker-only", "--output", str(tmp_path / "o")]  # fmt: skip
    assert cli.main(["tune", *argv]) == 0
    assert tune_cli.main(argv) == 0
    (config, spaces, options), again = calls
    assert (config, spaces, options) == again
    assert config.command == f"{PROG} tune " + " ".join(map(shlex.quote, argv))
    assert (config.workers, config.epochs, options.n_trials, options.startup_trials) == (1, 2, 3, 1)
    assert (options.folds, options.reproduce) == (2, False)


# ------------------------------------------------------------------ usage errors
@pytest.mark.parametrize(
    "argv, prog, starts",
    [
        (["run", "--epochs", "0"], f"{PROG} run", "argument --epochs: must be an integer >= 1"),
        (["run", "--bogus"], f"{PROG} run", "unrecognized arguments: --bogus"),
        (["report", "--report-only"], f"{PROG} report", "unrecognized arguments: --report-only"),
        (["report", "--seeds", "1,1"], f"{PROG} report", "argument --seeds: must be distinct"),
        (["list-losses", "--epochs", "2"], f"{PROG} list-losses", "unrecognized arguments"),
        (["tune", "--bogus"], f"{PROG} tune", "unrecognized arguments: --bogus"),
        (["bogus"], PROG, "argument COMMAND: invalid choice: 'bogus'"),
        (["--epochs", "3", "tune"], PROG, "argument COMMAND: tune comes first"),
    ],
)
def test_usage_errors_name_the_command(argv, prog, starts, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--output", str(tmp_path / "never")] if argv[0] != "list-losses" else argv)
    assert info.value.code == 2
    _two_line_error(capsys.readouterr().err, prog, starts)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "argv, option_name",
    [
        (["--loader-workers", "-1"], "--loader-workers"),
        (["--dataset-arg", "novalue"], "--dataset-arg"),
        (["--loss-param", "nope.alpha=1"], "--loss-param"),
        (["--map-samples", "0"], "--map-samples"),
    ],
)
def test_tune_errors_name_the_option_typed(argv, option_name, capsys, tmp_path):
    """Before: ``argument --workers`` for --loader-workers, ``--dataset-kwargs`` and
    ``--loss-params`` (the field names) for --dataset-arg and --loss-param."""
    pytest.importorskip("optuna")
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", *argv, "--output", str(tmp_path / "never")])
    assert info.value.code == 2
    _two_line_error(capsys.readouterr().err, f"{PROG} tune", f"argument {option_name}: ")


# ------------------------------------------------------------------ the derivation itself
def _even(name, value):
    if value % 2:
        raise ValueError(f"{name} must be even, got {value}")


@dataclasses.dataclass(frozen=True)
class _Toy:
    count: int = option(2, "how many", type=int, check=_even)
    names: list = option([], "names", "lists", convert=lambda t: t.split(","), cli_default="a,b")
    verbose: bool = option(False, "talk", flag=("--verbose", "--loud"))
    tags: list = option([], "a tag (repeatable)", "lists", action="append", metavar="TAG")
    secret: str = option("", "not an option", cli=False)

    def __post_init__(self):
        check_fields(self)


def test_options_are_derived_from_the_fields():
    parser = argparse.ArgumentParser()
    add_options(parser, _Toy)
    args = parser.parse_args([])
    assert vars(args) == {"names": "a,b"}  # only what was typed, and the cli_default
    assert _Toy(**given_values(args, _Toy)) == _Toy(names=["a", "b"])
    args = parser.parse_args(["--count", "4", "--loud", "--tags", "x", "--tags", "y"])
    assert _Toy(**given_values(args, _Toy)) == _Toy(4, ["a", "b"], True, ["x", "y"])
    help_text = " ".join(parser.format_help().split())
    assert "how many (default: 2)" in help_text and "talk (default: no)" in help_text
    assert "lists:" in help_text and "--secret" not in help_text
    with pytest.raises(ConfigError) as info:
        _Toy(**given_values(parser.parse_args(["--count", "3"]), _Toy))
    assert (info.value.field, info.value.message) == ("count", "must be even, got 3")


def test_changes_replace_a_fields_metadata_for_one_parser():
    parser = argparse.ArgumentParser()
    add_options(parser, _Toy, only=("count",), changes={"count": {"flag": "--n", "help": "n"}})
    assert _options(parser).keys() == {"count"}
    assert parser.parse_args(["--n", "6"]).count == 6
    assert "n (default: 2)" in " ".join(parser.format_help().split())
