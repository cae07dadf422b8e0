"""Tests of the benchmark's run specification, folder integrity (one protocol per folder, the
lock, damaged outputs) and command-line errors (usage errors before anything is written)."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_helpers import tiny_config

from pml_proxies.benchmark import BenchmarkConfig, build_run_spec, run_benchmark
from pml_proxies.benchmark.cli import build_parser, main
from pml_proxies.benchmark.config import ConfigError
from pml_proxies.benchmark.data import load_benchmark_data
from pml_proxies.benchmark.losses import convert_loss_params
from pml_proxies.benchmark.metrics import benchmark_metrics
from pml_proxies.benchmark.progress import LineProgress, progress_bar
from pml_proxies.benchmark.runner import FolderBusy, ProtocolMismatch
from pml_proxies.benchmark.train import build_run, make_accuracy_calculator, train_and_evaluate


def _tiny(output: Path, losses, **kw) -> BenchmarkConfig:
    return tiny_config(output, losses, **kw)


# ------------------------------------------------------------------ the run specification
def test_run_spec_resolves_once_and_is_immutable(tmp_path):
    config = _tiny("unused", ["mpa"], loss_params={"mpa": {"centers_per_class": 3}})
    spec = build_run_spec(config, "mpa", 1)
    assert spec.loss_overrides == {"centers_per_class": 3}
    assert spec.loss_kwargs["centers_per_class"] == 3 and spec.loss_kwargs["alpha"] == 32.0
    assert spec.effective_loss_kwargs["pooling"] == "softmax"  # a class default, for reports
    assert spec.channels == 1 and spec.image_size == 8
    assert spec.metric_names == tuple(m.name for m in benchmark_metrics([1, 2, 4, 8], [10]))
    assert spec.fingerprint == config.fingerprint("mpa")
    assert (spec.trunk.name, spec.trunk.lr, spec.trunk.warmup_epochs) == ("small_cnn", 1e-3, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 2
    with pytest.raises(TypeError):
        spec.loss_kwargs["alpha"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    # a tuning trial: overrides of the loss arguments and of the proxy lr multiplier
    trial = build_run_spec(config, "mpa", 1, loss_overrides={"margin": 0.2}, proxy_lr_mult=10)
    assert trial.loss_kwargs["margin"] == 0.2 and trial.loss_kwargs["centers_per_class"] == 3
    assert trial.proxy_lr_mult == 10.0 and trial.config.proxy_lr_mult == 10.0
    assert trial.fingerprint not in (spec.fingerprint, config.fingerprint("mpa"))
    data = load_benchmark_data("digits")
    run = build_run(trial, data, tmp_path / "built")
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert lrs == {"trunk": 1e-3, "embedder": 1e-3, "loss": pytest.approx(1e-2)}
    assert run.loss.centers_per_class == 3 and run.loss.margin == 0.2
    assert set(make_accuracy_calculator(trial).get_curr_metrics()) >= {"ndcg_at_10", "r_precision"}


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"bogus": 1}, "loss 'mpa' has no argument 'bogus'"),
        ({"alpha": "big"}, "'alpha' expects a real number"),
        ({"centers_per_class": 2.5}, "'centers_per_class' expects an integer"),
        ({"centers_per_class": 2.0}, "'centers_per_class' expects an integer"),
        ({"centers_per_class": True}, "'centers_per_class' expects an integer"),
        ({"pooling": 3}, "'pooling' expects a string"),
    ],
)
def test_loss_params_checked_by_constructor_signature(overrides, match):
    with pytest.raises(ValueError, match=match):
        convert_loss_params("mpa", overrides)


def test_loss_params_converted():
    assert convert_loss_params("mpa", {"alpha": 30, "centers_per_class": 4}) == {
        "alpha": 30.0,
        "centers_per_class": 4,
    }
    assert isinstance(convert_loss_params("mpa", {"alpha": 30})["alpha"], float)
    # PML's unannotated arguments: integers only where the registry says so
    assert convert_loss_params("proxy_anchor", {"alpha": 16}) == {"alpha": 16.0}
    assert convert_loss_params("soft_triple", {"centers_per_class": 2, "tau": 0}) == {
        "centers_per_class": 2,
        "tau": 0.0,
    }
    with pytest.raises(ValueError, match="'centers_per_class' expects an integer"):
        convert_loss_params("soft_triple", {"centers_per_class": 1.5})
    assert convert_loss_params("vcpa", {"seed": None}) == {"seed": None}


def test_train_and_evaluate_callback_no_test_and_val_classes(tmp_path):
    config = _tiny(tmp_path / "out", ["proxy_anchor"], epochs=3)
    spec = build_run_spec(config, "proxy_anchor", 0)
    data = load_benchmark_data("digits")
    pool = np.union1d(data.train.original_labels, data.val.original_labels)
    fold = [int(pool[0]), int(pool[-1])]
    seen = []
    result = train_and_evaluate(
        spec,
        data,
        tmp_path / "trial",
        val_classes=fold,
        epoch_callback=lambda epoch, metrics: seen.append((epoch, metrics)),
        evaluate_test=False,
    )
    assert [e for e, _ in seen] == [1, 2, 3]
    for (epoch, metrics), row in zip(seen, result["history"]):
        assert epoch == row["epoch"]
        assert metrics["mean_average_precision_at_r"] == row["val_mean_average_precision_at_r"]
        assert set(metrics) == set(spec.metric_names)
    assert result["test"] is None and not (tmp_path / "trial" / "map_data.npz").exists()
    # the fold's classes are the validation classes, the others are trained on
    refold = data.with_validation_classes(fold)
    assert sorted(set(refold.val.original_labels)) == fold
    assert not set(refold.train.original_labels) & set(fold)
    assert set(refold.train.original_labels) | set(fold) == set(pool.tolist())
    default = train_and_evaluate(spec, data, tmp_path / "default", evaluate_test=False)
    assert default["history"][0]["val_mean_average_precision_at_r"] != pytest.approx(
        result["history"][0]["val_mean_average_precision_at_r"]
    )
    with pytest.raises(ValueError, match="not training-split classes"):
        data.with_validation_classes([10_000])

    # a callback may raise (Optuna pruning): it propagates and no result is written
    class Pruned(Exception):
        pass

    def prune(epoch, metrics):
        raise Pruned

    with pytest.raises(Pruned):
        train_and_evaluate(spec, data, tmp_path / "pruned", epoch_callback=prune)
    assert not (tmp_path / "pruned" / "result.json").exists()


def test_train_embeddings_use_the_evaluation_transform_and_proxy_numbering(tmp_path):
    data = load_benchmark_data("digits")
    assert data.train_eval is not None
    np.testing.assert_array_equal(data.train_eval.labels, data.train.labels)
    assert data.train_eval.base is data.val.base  # the evaluation-transform base


# ------------------------------------------------------------------ folder integrity
def test_folder_of_another_protocol_refused_whatever_losses(tmp_path, capsys):
    out = tmp_path / "out"
    run_benchmark(_tiny(out, ["proxy_anchor"]))
    config_json = (out / "config.json").read_text()
    protocol_json = (out / "protocol.json").read_text()
    # a disjoint loss list under another protocol: refused before anything is written
    with pytest.raises(ProtocolMismatch) as info:
        run_benchmark(_tiny(out, ["normalized_softmax"], epochs=3, lr=0.01))
    message = str(info.value)
    assert "epochs: 2 -> 3" in message and "lr: None -> 0.01" in message
    assert "--output" in message
    assert not (out / "runs" / "normalized_softmax").exists()
    assert (out / "config.json").read_text() == config_json
    assert (out / "protocol.json").read_text() == protocol_json
    # the command line says so in one line, exit code 2, no traceback
    rc = main(["--dataset", "digits", "--losses", "normalized_softmax", "--epochs", "3",
               "--output", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "different protocol" in err and "Traceback" not in err
    # adding losses and seeds under the same protocol keeps working
    res = run_benchmark(_tiny(out, ["proxy_anchor", "normalized_softmax"], seeds=[0, 1]))
    assert res["skipped"] == 1 and len(res["runs"]) == 4
    assert (out / "protocol.json").read_text() == protocol_json


def test_protocol_recorded_by_older_config_json_is_honoured(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    old = dataclasses.asdict(_tiny(out, ["proxy_anchor"]))
    (out / "config.json").write_text(json.dumps(old))  # a folder written before protocol.json
    with pytest.raises(ProtocolMismatch, match="iterations_per_epoch: 2 -> 3"):
        run_benchmark(_tiny(out, ["mpa"], iterations_per_epoch=3))


PROTOCOL_DAMAGES = {
    # a setting missing: another protocol (here 3 epochs) must not get in, nor the same one
    "missing": (lambda p: p["protocol"].pop("epochs"), "'protocol.epochs' is missing"),
    "wrong_type": (
        lambda p: p["protocol"].update(epochs="2"),
        "'protocol.epochs' is \"2\", expected an integer",
    ),
    "list_item": (
        lambda p: p["protocol"].update(recall_ks=[1, "2"]),
        "'protocol.recall_ks[1]' is \"2\", expected an integer",
    ),
    "optional_wrong_type": (
        lambda p: p["protocol"].update(lr="fast"),
        "'protocol.lr' is \"fast\", expected a number or null",
    ),
    "no_protocol": (lambda p: p.pop("protocol"), "'protocol' is missing"),
    "protocol_not_object": (
        lambda p: p.update(protocol=[]),
        "'protocol' is [], expected an object",
    ),
}


@pytest.mark.parametrize("damage", sorted(PROTOCOL_DAMAGES))
def test_protocol_json_checked_against_its_schema(tmp_path, capsys, damage):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    path = out / "protocol.json"
    edit, named = PROTOCOL_DAMAGES[damage]
    record = {"protocol": _tiny(out, ["proxy_anchor"]).protocol()}
    edit(record)
    path.write_text(json.dumps(record))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for epochs in (2, 3):  # the recorded protocol's, and another
        with pytest.raises(ProtocolMismatch) as info:
            run_benchmark(_tiny(out, ["proxy_anchor"], epochs=epochs))
        assert str(path) in str(info.value) and named in str(info.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
    rc = main(["--dataset", "digits", "--losses", "proxy_anchor", "--output", str(out),
               "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "Traceback" not in err


def test_protocol_schema_is_the_configs_and_accepts_what_is_written(tmp_path):
    from pml_proxies.benchmark.runner import protocol_schema, recorded_protocol
    from pml_proxies.benchmark.schema import schema_problem

    config = _tiny(tmp_path / "out", ["proxy_anchor"], lr=0.01, val_fraction=0, image_size=8)
    assert set(protocol_schema()["protocol"]) == set(config.protocol())
    run_benchmark(config)
    written = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert schema_problem(written, protocol_schema()) is None
    assert recorded_protocol(tmp_path / "out") == json.loads(json.dumps(config.protocol()))


def test_report_only_of_a_missing_folder_is_refused_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "parent" / "missing"
    with pytest.raises(SystemExit) as info:
        main(["--dataset", "digits", "--losses", "proxy_anchor", "--output", str(missing),
              "--report-only", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.splitlines()[0].startswith("pml-proxies-benchmark: error: argument --output: ")
    assert str(missing) in err and "--report-only" in err
    assert not (tmp_path / "parent").exists()
    with pytest.raises(ConfigError, match="--report-only"):
        run_benchmark(_tiny(missing, ["proxy_anchor"]), report_only=True)
    assert not (tmp_path / "parent").exists()


def test_second_invocation_on_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from filelock import FileLock
            lock = FileLock({str(out / ".lock")!r}); lock.acquire()
            print("locked", flush=True); time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusy, match="another benchmark is running"):
            run_benchmark(_tiny(out, ["proxy_anchor"]))
        rc = main(["--dataset", "digits", "--losses", "proxy_anchor", "--output", str(out),
                   "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 3 and "another benchmark is running" in err and "Traceback" not in err
        assert not (out / "config.json").exists() and not (out / "runs").exists()
    finally:
        holder.kill()
        holder.wait()
    run_benchmark(_tiny(out, ["proxy_anchor"]))  # free again
    assert (out / "runs" / "proxy_anchor" / "seed_0" / "result.json").is_file()


def test_duplicate_loss_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="mpa more than once"):
        _tiny(tmp_path, ["mpa", "mpa"])
    with pytest.raises(SystemExit) as info:
        main(["--losses", "mpa,mpa", "--output", str(tmp_path / "dup")])
    assert info.value.code == 2
    assert "--losses" in capsys.readouterr().err
    assert not (tmp_path / "dup").exists()


DAMAGES = {
    "result_not_object": lambda run: (run / "result.json").write_text("[1, 2]"),
    "result_truncated": lambda run: (run / "result.json").write_text('{"loss": "proxy_a'),
    "result_lacks_keys": lambda run: (run / "result.json").write_text('{"loss": "x"}'),
    "map_data_truncated": lambda run: (run / "map_data.npz").write_bytes(
        (run / "map_data.npz").read_bytes()[:100]
    ),
    "no_result": lambda run: (run / "result.json").unlink(),
    # valid JSON objects with every key, but not a result of this protocol's run
    "best_epoch_not_int": lambda run: _edit_result(run, best_epoch="two"),
    "seed_a_string": lambda run: _edit_result(run, seed="0"),
    "metric_not_a_number": lambda run: _edit_result(run, test={"precision_at_1": "high"}),
    "metric_missing": lambda run: _edit_result(run, drop_metric="mean_average_precision_at_r"),
    "history_row_not_object": lambda run: _edit_result(run, history=[1, 2]),
    "fingerprint_not_string": lambda run: _edit_result(run, config_fingerprint=None),
    "lacks_command": lambda run: _edit_result(run, drop="command"),
    "other_seed": lambda run: _edit_result(run, seed=7),
}
#: what the note of each damage names (the field, or the file's problem)
DAMAGE_NAMES = {
    "best_epoch_not_int": "'best_epoch' is \"two\", expected an integer",
    "seed_a_string": "'seed' is \"0\", expected an integer",
    "metric_not_a_number": "'test.precision_at_1' is \"high\", expected a number",
    "metric_missing": "lacks the metric(s) mean_average_precision_at_r",
    "history_row_not_object": "'history[0]' is 1, expected an object",
    "fingerprint_not_string": "'config_fingerprint' is null, expected a string",
    "lacks_command": "'command' is missing",
    "other_seed": "'seed' is 7, expected 0",
    "result_lacks_keys": "'seed', 'best_epoch', ",
}


def _edit_result(run: Path, drop: str | None = None, drop_metric: str | None = None, **fields):
    path = run / "result.json"
    result = json.loads(path.read_text())
    if "test" in fields:
        fields["test"] = {**result["test"], **fields["test"]}
    result.update(fields)
    if drop is not None:
        del result[drop]
    if drop_metric is not None:
        del result["test"][drop_metric]
    path.write_text(json.dumps(result))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_run_reported_and_redone(tmp_path, capsys, damage):
    out = tmp_path / "out"
    config = _tiny(out, ["proxy_anchor"], epochs=1)
    first = run_benchmark(config)
    run = out / "runs" / "proxy_anchor" / "seed_0"
    DAMAGES[damage](run)
    capsys.readouterr()
    second = run_benchmark(config)
    err = capsys.readouterr().err
    assert second["skipped"] == 0
    assert str(run) in err and "trained again" in err
    assert DAMAGE_NAMES.get(damage, "") in err
    result = json.loads((run / "result.json").read_text())
    assert isinstance(result, dict) and set(result["test"]) >= {"precision_at_1"}
    assert len(np.load(run / "map_data.npz")["embeddings"]) > 0
    # the same numbers as the first time (same seed, same machine)
    cols = ["precision_at_1", "mean_average_precision_at_r"]
    assert first["runs"][cols].equals(second["runs"][cols])
    assert "trained again: runs/proxy_anchor/seed_0" in (out / "report.md").read_text()


# ------------------------------------------------------------------ command-line errors
CLI_ERRORS = [
    (["--dataset", "mnist"], "--dataset"),
    (["--trunk", "vgg"], "--trunk"),
    (["--recall-ks", "0"], "--recall-ks"),
    (["--ndcg-ks", ""], "--ndcg-ks"),
    (["--threads", "0"], "--threads"),
    (["--val-fraction", "-0.1"], "--val-fraction"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--image-size", "-8"], "--image-size"),
    (["--image-size", "0"], "--image-size"),
    (["--losses", ","], "--losses"),
    (["--losses", "mpa,,proxy_anchor"], "--losses"),
    (["--losses", "bogus"], "--losses"),
    (["--lr-decay-epochs", "-1"], "--lr-decay-epochs"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-0.1"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--seeds", "1,1"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--batch-size", "30", "--m-per-class", "4"], "--batch-size"),
    (["--primary-metric", "accuracy"], "--primary-metric"),
    (["--device", "tpu"], "--device"),
    (["--map-samples", "0"], "--map-samples"),
    (["--loss-param", "mpa.bogus=1"], "--loss-param"),
    (["--loss-param", "mpa.centers_per_class=2.5"], "--loss-param"),
    (["--loss-param", "mpa.alpha=big"], "--loss-param"),
    (["--loss-param", "nope.alpha=1"], "--loss-param"),
    (["--loss-param", "mpa.centers_per_class=0"], "--loss-param"),
    (["--dataset-arg", "novalue"], "--dataset-arg"),
]
if not torch.cuda.is_available():
    CLI_ERRORS.append((["--device", "cuda"], "--device"))


@pytest.mark.parametrize("argv, option", CLI_ERRORS, ids=[" ".join(a) for a, _ in CLI_ERRORS])
def test_cli_value_errors_are_usage_errors_before_any_output(tmp_path, capsys, argv, option):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        main([*argv, "--output", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    _assert_usage_error(err, "pml-proxies-benchmark", "argument " + option)
    assert not out.exists()


def _assert_usage_error(err: str, prog: str, starts: str) -> None:
    """``err`` is the two lines of a usage error: the error, then where the help is (not the
    usage block)."""
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"{prog}: error: {starts}"), err
    assert lines[1] == f"see '{prog} --help'"


@pytest.mark.parametrize(
    "argv, starts",
    [
        (["--epochs"], "argument --epochs: expected one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--trunk", "vgg"], "argument --trunk: invalid choice"),
    ],
)
def test_usage_errors_are_two_lines_for_the_benchmark_and_tune(capsys, argv, starts):
    from pml_proxies.benchmark.tune.cli import main as tune_main

    for run, prog in [(main, "pml-proxies-benchmark"), (tune_main, "pml-proxies-benchmark tune")]:
        with pytest.raises(SystemExit) as info:
            run(argv)
        assert info.value.code == 2
        _assert_usage_error(capsys.readouterr().err, prog, starts)
    with pytest.raises(SystemExit):  # tune through the benchmark's command
        main(["tune", "--trials", "0"])
    _assert_usage_error(capsys.readouterr().err, "pml-proxies-benchmark tune", "--trials")


def test_loss_param_error_names_loss_argument_and_type(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--loss-param", "mpa.centers_per_class=2.5", "--output", str(tmp_path / "x")])
    first = capsys.readouterr().err.splitlines()[0]
    assert "'mpa'" in first and "'centers_per_class'" in first and "an integer" in first


def test_unexpected_errors_are_one_line_and_debug_shows_traceback(monkeypatch, tmp_path, capsys):
    import pml_proxies.benchmark.runner as runner

    def boom(config, report_only=False):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runner, "run_benchmark", boom)
    argv = ["--dataset", "digits", "--losses", "proxy_anchor", "--output", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: disk on fire" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="disk on fire"):
        main([*argv, "--debug"])


def test_help_entries_each_have_a_help_text_and_one_default():
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert action.help.count("(default:") == 1, (action.dest, action.help)
    text = parser.format_help()
    assert "95%%" not in text and "95% CI" in text
    assert "default: None" not in text


def test_cli_quick_defaults_and_explicit_options_win():
    from pml_proxies.benchmark.cli import config_from_args

    args = build_parser().parse_args(["--quick", "--epochs", "3"])
    config = config_from_args(args, [])
    assert (config.epochs, config.iterations_per_epoch, config.seeds) == (3, 4, [0])
    assert config.output == "benchmark_results/quick"
    args = build_parser().parse_args(["--loss-param", "mpa.alpha=30"])
    config = config_from_args(args, [])
    assert build_run_spec(config, "mpa", 0).loss_kwargs["alpha"] == 30.0


# ------------------------------------------------------------------ progress
def test_line_progress_has_no_escape_codes():
    stream = io.StringIO()
    bar = LineProgress(range(5), "run", stream=stream, period=0.0)
    for _ in bar:
        bar.set_postfix(loss="1.0")
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.splitlines()[-1] == "run: 5/5, 0 s, loss=1.0"
    # not a terminal: line progress; disabled: nothing at all
    assert isinstance(progress_bar(range(3), "x", stream=io.StringIO()), LineProgress)
    silent = io.StringIO()
    assert list(progress_bar(range(3), "x", enabled=False, stream=silent)) == [0, 1, 2]
    assert silent.getvalue() == ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_line_progress_writes_only_changes_at_most_every_period():
    """A bar of runs: a line when a run finishes; while waiting, nothing (the same line is never
    written twice); other changes (the postfix) at most every ``period`` seconds."""
    clock, stream = FakeClock(), io.StringIO()

    def runs():
        for run in range(3):
            for _ in range(120):  # two minutes of waiting, refreshed every second
                clock.now += 1.0
                bar.refresh()
            yield run

    bar = LineProgress(runs(), "benchmark", stream=stream, total=3, each_item=True, clock=clock)
    for run in bar:
        bar.set_postfix_str(f"run {run} done")
    assert stream.getvalue().splitlines() == [
        "benchmark: 1/3, 120 s, run 0 done",
        "benchmark: 2/3, 240 s, run 1 done",
        "benchmark: 3/3, 360 s, run 2 done",
    ]
    # an epoch bar (not each item): a line when something changed, at most every 30 s
    clock, stream = FakeClock(), io.StringIO()

    def batches():
        for i in range(100):
            clock.now += 1.0
            yield i

    bar = LineProgress(batches(), "ep1", stream=stream, final_line=False, total=100, clock=clock)
    for _ in bar:
        bar.set_postfix(loss=1.0)
    assert stream.getvalue().splitlines() == [
        f"ep1: {n}/100, {n} s, loss=1.0" for n in (30, 60, 90)
    ]
    # a postfix change alone is a change; no change, no line, however long the wait
    clock, stream = FakeClock(), io.StringIO()

    def slow():
        yield 0
        for _ in range(3):
            clock.now += 100.0
            bar.refresh()
        bar.set_postfix_str("x")
        bar.refresh()
        yield 1

    bar = LineProgress(slow(), "b", stream=stream, total=2, clock=clock)
    list(bar)
    assert stream.getvalue().splitlines() == [
        "b: 1/2, 100 s",
        "b: 1/2, 300 s, x",
        "b: 2/2, 300 s, x",
    ]
