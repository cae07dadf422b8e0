"""Taking the answer home: the reports' settings to paste (executable constructor calls,
``best_params.json``) and ``--save-models`` + ``load_model`` (issue 20)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_helpers import tiny_config
from tune_helpers import env, run

from pml_proxies.benchmark import load_model, run_benchmark
from pml_proxies.benchmark.config import BenchmarkConfig
from pml_proxies.benchmark.data import load_config_data
from pml_proxies.benchmark.spec import build_run_spec
from pml_proxies.benchmark.store import MODEL_FILE, MODEL_RECORD_FILE, RunStore
from pml_proxies.benchmark.train import (
    compute_embeddings,
    make_accuracy_calculator,
    retrieval_metrics,
)
from pml_proxies.registry import build_loss

#: losses of the tiny run: a package loss, a PML loss with a builder (an object argument), one
#: with a miner, one with no optimiser-trained parameters
LOSSES = ["mpa", "soft_triple", "multi_similarity", "vcpa"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny run of :data:`LOSSES` with ``--save-models``, in this process (``jobs=1``), every
    test embedding kept in its map data (``map_samples`` above the test set's size)."""
    out = tmp_path_factory.mktemp("take_home")
    config = tiny_config(out, LOSSES, save_models=True, map_samples=10_000)
    run_benchmark(config)
    return config


# ------------------------------------------------------------------ --save-models
def test_save_models_is_an_option_outside_the_protocol():
    base = BenchmarkConfig(dataset="digits")
    saving = BenchmarkConfig(dataset="digits", save_models=True)
    assert saving.protocol() == base.protocol()
    assert saving.fingerprint("mpa") == base.fingerprint("mpa")
    for command in ([], ["tune"]):
        help_text = subprocess.run(
            [sys.executable, "-m", "pml_proxies.benchmark", *command, "--help"],
            capture_output=True, text=True, env=env(), check=True,
        ).stdout  # fmt: skip
        assert "--save-models" in help_text


@pytest.mark.parametrize("loss", LOSSES)
def test_load_model_gives_the_recorded_test_embeddings_and_metrics(saved_run, loss):
    config = saved_run
    folder = RunStore(config.output).run(loss, 0)
    recorded = folder.map_data()
    result = json.loads((folder.path / "result.json").read_text())
    saved = load_model(folder.path, with_loss=True)
    assert not saved.model.training and saved.spec["loss"] == loss
    assert saved.spec["best_epoch"] == result["best_epoch"]
    data = load_config_data(config)
    assert len(recorded["labels"]) == len(data.test)  # every test row was recorded
    # the run's own embedding path, in this process, with the same batches and bit-identical
    # weights (state dicts are copied, not computed): the same float operations in the same
    # order; the tolerance only allows for a kernel choice that depends on memory layout
    emb, labels = compute_embeddings(saved.model, data.test, config)
    np.testing.assert_allclose(emb.numpy(), recorded["embeddings"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels.numpy(), recorded["labels"])
    spec = build_run_spec(config, loss, 0)
    metrics = retrieval_metrics(make_accuracy_calculator(spec), emb, labels)
    assert metrics == pytest.approx(result["test"], abs=1e-9)
    # the user's path: the whole test set as one batch (other batch sizes may pick other conv
    # kernels, whose float32 sums are ordered differently: for the unit-norm embeddings of this
    # 3-block CNN (at most 3*3*128 = 1152 terms per sum) the rounding stays far below 1e-4)
    images = torch.stack([data.test[i][0] for i in range(len(data.test))])
    np.testing.assert_allclose(
        saved.embed(images).numpy(), recorded["embeddings"], rtol=0, atol=1e-4
    )
    if "proxies" in recorded:  # the learned proxies of the selected epoch, copied exactly
        from pml_proxies.benchmark.losses import get_proxies

        proxies = get_proxies(saved.loss, saved.spec["num_classes"])
        np.testing.assert_array_equal(proxies[0], recorded["proxies"])


def test_load_model_needs_no_harness_imports(saved_run):
    run_dir = RunStore(saved_run.output).run("mpa", 0).path
    code = (
        "import sys\n"
        "from pml_proxies.benchmark import load_model\n"
        f"saved = load_model({str(run_dir)!r})\n"
        "heavy = ('pandas', 'matplotlib', 'optuna', 'pytorch_metric_learning', 'record_keeper')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _copy_run(saved_run, tmp_path, loss="mpa") -> Path:
    import shutil

    src = RunStore(saved_run.output).run(loss, 0).path
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_load_model_refuses_a_run_without_a_model(saved_run, tmp_path):
    run_dir = _copy_run(saved_run, tmp_path)
    for name in (MODEL_FILE, MODEL_RECORD_FILE):
        (run_dir / name).unlink()
    with pytest.raises(ValueError, match="--save-models"):
        load_model(run_dir)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_model(tmp_path / "nowhere")


def test_load_model_refuses_a_damaged_weights_file(saved_run, tmp_path):
    run_dir = _copy_run(saved_run, tmp_path)
    blob = bytearray((run_dir / MODEL_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: torch.load could still read it
    (run_dir / MODEL_FILE).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"model\.pt is damaged"):
        load_model(run_dir)
    (run_dir / MODEL_FILE).unlink()
    with pytest.raises(ValueError, match="not in"):
        load_model(run_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: "{not json", "not valid JSON"),
        (lambda r: json.dumps({**r, "spec": {**r["spec"], "channels": "one"}}), "spec.channels"),
        (lambda r: json.dumps({**r, "format": 99}), "'format' is 99"),
    ],
)
def test_load_model_refuses_a_damaged_record(saved_run, tmp_path, edit, message):
    run_dir = _copy_run(saved_run, tmp_path)
    record = json.loads((run_dir / MODEL_RECORD_FILE).read_text())
    (run_dir / MODEL_RECORD_FILE).write_text(edit(record))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(run_dir)


def test_load_model_refuses_weights_of_another_network(saved_run, tmp_path):
    run_dir = _copy_run(saved_run, tmp_path)
    record = json.loads((run_dir / MODEL_RECORD_FILE).read_text())
    record["spec"]["config"]["embedding_size"] += 1  # the record no longer fits the weights
    (run_dir / MODEL_RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not fit"):
        load_model(run_dir)


def test_a_run_without_a_model_is_trained_again_with_save_models(tmp_path):
    config = tiny_config(tmp_path, ["proxy_anchor"])
    run_benchmark(config)
    folder = RunStore(tmp_path).run("proxy_anchor", 0)
    assert not (folder.path / MODEL_FILE).exists()
    first = json.loads((folder.path / "result.json").read_text())
    out = run_benchmark(tiny_config(tmp_path, ["proxy_anchor"], save_models=True))
    assert out["skipped"] == 0  # not reused: it had no model
    second = json.loads((folder.path / "result.json").read_text())
    assert second["best_epoch"] == first["best_epoch"]
    assert load_model(folder.path).spec["loss"] == "proxy_anchor"
    # a later command with --save-models reuses it
    assert run_benchmark(tiny_config(tmp_path, ["proxy_anchor"], save_models=True))["skipped"] == 1


# ------------------------------------------------------------------ settings to paste
def _snippets(markdown: str) -> dict[str, list[str]]:
    """``{loss: [code of each python block]}`` of a report's "Settings to paste" section."""
    section = markdown.split("## Settings to paste", 1)[1].split("\n## ", 1)[0]
    out = {}
    for part in section.split("\n### ")[1:]:
        loss = part.split("\n", 1)[0].strip()
        out[loss] = re.findall(r"```python\n(.*?)```", part, flags=re.DOTALL)
    return out


def _hyper_parameters(module: torch.nn.Module) -> dict:
    """Every plain attribute of ``module`` and its submodules (the constructor's settings)."""
    return {
        f"{name}.{key}": value
        for name, sub in module.named_modules()
        for key, value in vars(sub).items()
        if isinstance(value, (bool, int, float, str)) and not key.startswith("_")
    }


def _assert_same(built: dict, loss: torch.nn.Module, miner: torch.nn.Module | None) -> None:
    """``built`` (a snippet's namespace) holds a loss (and miner) equal to ``loss`` (``miner``):
    same class, same settings, same state (both built right after ``torch.manual_seed(0)``)."""
    assert type(built["loss"]) is type(loss)
    assert _hyper_parameters(built["loss"]) == _hyper_parameters(loss)
    state, expected = built["loss"].state_dict(), loss.state_dict()
    assert state.keys() == expected.keys()
    for key in state:  # the same constructor calls after the same seed: the same draws
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0)
    if miner is None:
        assert "miner" not in built
    else:
        assert type(built["miner"]) is type(miner)
        assert _hyper_parameters(built["miner"]) == _hyper_parameters(miner)


def _exec(code: str) -> dict:
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "<snippet>", "exec"), namespace)  # noqa: S102 - the test's purpose
    return namespace


def _check_snippets(markdown: str, specs: dict, num_classes: int) -> None:
    blocks = _snippets(markdown)
    assert set(blocks) == set(specs)
    for loss, spec in specs.items():
        assert len(blocks[loss]) == 2  # the class call and the create_loss form
        for code in blocks[loss]:
            torch.manual_seed(0)
            expected, miner = build_loss(
                loss, num_classes, spec.config.embedding_size, spec.config.dataset,
                dict(spec.loss_overrides),
            )  # fmt: skip
            _assert_same(_exec(code), expected, miner)


def test_report_snippets_build_the_runs_losses(saved_run):
    config = saved_run
    markdown = (Path(config.output) / "report.md").read_text()
    num_classes = load_config_data(config).train.num_classes
    specs = {loss: build_run_spec(config, loss, 0) for loss in LOSSES}
    _check_snippets(markdown, specs, num_classes)
    assert "from pml_proxies.regularizers import IntraClassCenterRegularizer" in markdown


def test_best_params_json_of_a_run(saved_run):
    config = saved_run
    records = json.loads((Path(config.output) / "best_params.json").read_text())["losses"]
    assert [r["loss"] for r in records] == LOSSES
    num_classes = load_config_data(config).train.num_classes
    for r in records:
        spec = build_run_spec(config, r["loss"], 0)
        assert r["num_classes"] == num_classes
        assert r["class"] == spec_class(r["loss"])
        result = json.loads(
            (RunStore(config.output).run(r["loss"], 0).path / "result.json").read_text()
        )
        (metric,) = r["metrics"]
        assert metric == {
            "name": config.primary_metric, "split": "test", "seeds": [0],
            "value": result["test"][config.primary_metric],
        }  # fmt: skip
        has_params = r["loss"] != "multi_similarity" and r["loss"] != "vcpa"
        expected_lr = spec.trunk.lr * spec.proxy_lr_mult if has_params else None
        assert r["optimizer"]["loss_lr"] == expected_lr
        torch.manual_seed(0)
        loss, miner = build_loss(r["loss"], num_classes, config.embedding_size, config.dataset,
                                 dict(spec.loss_overrides))  # fmt: skip
        import pml_proxies

        torch.manual_seed(0)
        rebuilt = pml_proxies.create_loss(
            r["loss"], r["num_classes"], r["embedding_size"], **r["kwargs"]
        )
        _assert_same({"loss": rebuilt, **({"miner": miner} if miner else {})}, loss, miner)
        assert (r["miner"] is None) == (miner is None)


def spec_class(loss: str) -> str:
    from pml_proxies.registry import get_spec

    return get_spec(loss).target.replace(":", ".")


# ------------------------------------------------------------------ tune
@pytest.mark.slow
def test_tune_settings_to_paste_and_saved_models(tmp_path):
    out = tmp_path / "tune"
    losses = ["mpa", "multi_similarity"]
    args = ["--dataset", "digits", "--losses", ",".join(losses), "--seeds", "0", "--epochs", "2",
            "--iterations-per-epoch", "2", "--embedding-size", "16", "--batch-size", "16",
            "--no-progress", "--jobs", "1", "--trials", "2", "--startup-trials", "1",
            "--map-samples", "10000", "--save-models", "--output", str(out)]  # fmt: skip
    proc = run(args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = tiny_config(out, losses, save_models=True, map_samples=10_000)
    rows = {r["loss"]: r for r in json.loads((out / "search.json").read_text())}
    from pml_proxies.benchmark.tune.trial import trial_spec

    specs = {loss: trial_spec(config, loss, rows[loss]["params"], 0) for loss in losses}
    num_classes = load_config_data(config).train.num_classes
    _check_snippets((out / "tune_report.md").read_text(), specs, num_classes)
    records = {r["loss"]: r for r in json.loads((out / "best_params.json").read_text())["losses"]}
    tuned = RunStore(out / "tuned")
    data = load_config_data(config)
    for loss in losses:
        validation, test = records[loss]["metrics"]
        assert validation["split"] == "validation"
        assert validation["value"] == rows[loss]["best_value"]
        assert records[loss]["searched"] == list(rows[loss]["params"])
        folder = tuned.run(loss, 0)
        result = json.loads((folder.path / "result.json").read_text())
        assert test == {
            "name": config.primary_metric, "split": "test", "seeds": [0], "runs": "tuned/",
            "value": result["test"][config.primary_metric],
        }  # fmt: skip
        # the re-run's model: the recorded test embeddings (same tolerance reasoning as above,
        # another process on the same machine: same kernels, same batches)
        saved = load_model(folder.path)
        emb, _ = compute_embeddings(saved.model, data.test, config)
        np.testing.assert_allclose(emb.numpy(), folder.map_data()["embeddings"], rtol=0, atol=1e-6)
    assert not list((out / "trials").rglob(MODEL_FILE))  # trials keep no model


@pytest.mark.parametrize("trunk", ["linear", "mlp"])
def test_load_model_rebuilds_a_head_on_frozen_features(tmp_path, trunk):
    """A head's input is the features' width, not an image's channels, and ``mlp`` has a hidden
    width: both recorded, so the saved head loads (it failed to before: the network was rebuilt
    with the image channels)."""
    from test_user_data_benchmark import tiny_features

    path = tiny_features(tmp_path / "f.npz", dim=16)
    config = tiny_config(tmp_path / "out", ["mpa"], dataset=f"features:{path}", trunk=trunk,
                         mlp_width=12, save_models=True, map_samples=10_000)  # fmt: skip
    run_benchmark(config)
    folder = RunStore(config.output).run("mpa", 0)
    saved = load_model(folder.path)
    recorded = folder.map_data()
    features = torch.as_tensor(np.load(path)["features"])
    test_rows = np.load(path)["split"] == "validation"
    emb = saved.embed(features[torch.as_tensor(test_rows)])
    # one batch of plain matrix products, as evaluated: float32 rounding only
    np.testing.assert_allclose(emb.numpy(), recorded["embeddings"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="embeds feature vectors"):  # no image transform
        saved.transform()
