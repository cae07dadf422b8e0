"""The run store (``pml_proxies.benchmark.store``): the plan of an output folder (finished,
unfinished, damaged, other protocol), training that returns results without writing them, and
a resumed benchmark that retrains only the damaged run and ends with the uninterrupted
``runs.csv``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from benchmark_helpers import tiny_config

from pml_proxies.benchmark.data import load_config_data
from pml_proxies.benchmark.runner import run_benchmark
from pml_proxies.benchmark.spec import build_run_spec
from pml_proxies.benchmark.store import (
    MAP_FILE,
    RESULT_FILE,
    ProtocolMismatch,
    RunFolder,
    RunStore,
    write_json_atomic,
)
from pml_proxies.benchmark.train import train_and_evaluate, train_run


def _runs_csv(folder) -> pd.DataFrame:
    """``runs.csv`` without its wall-clock column."""
    return pd.read_csv(folder / "runs.csv").drop(columns="train_time_s")


def test_resume_retrains_only_the_damaged_run_and_ends_with_the_uninterrupted_runs_csv(tmp_path):
    config = tiny_config(tmp_path / "out", ["proxy_anchor", "mpa"], seeds=(0, 1), epochs=1)
    store = RunStore(config.output)
    run_benchmark(config)
    uninterrupted = _runs_csv(store.path)
    damaged = store.run("mpa", 0)
    (damaged.path / RESULT_FILE).write_text('{"loss": "mpa"')  # cut short
    others = [store.run(loss, seed).path for loss in ("proxy_anchor", "mpa") for seed in (0, 1)]
    others.remove(damaged.path)
    stamps = {p: (p / RESULT_FILE).stat().st_mtime_ns for p in others}
    plan = store.plan(_specs(config))
    assert [plan.specs[i].loss for i in plan.todo] == ["mpa"] and len(plan.finished) == 3
    assert str(damaged.path / RESULT_FILE) in plan.problems[plan.todo[0]]
    second = run_benchmark(config)
    assert second["skipped"] == 3
    assert {p: (p / RESULT_FILE).stat().st_mtime_ns for p in stamps} == stamps  # untouched
    assert damaged.inspect()[0] is not None
    # same seeds, same machine, same process: the retrained run's numbers are the first ones
    pd.testing.assert_frame_equal(_runs_csv(store.path), uninterrupted)


def _specs(config):
    return [build_run_spec(config, loss, seed) for loss in config.losses for seed in config.seeds]


def _result(spec, fingerprint=None) -> dict:
    return {
        "loss": spec.loss, "seed": spec.seed, "best_epoch": 1, "best_val_score": 0.5,
        "train_time_s": 1.0, "iterations": 4, "batch_size": 8, "m_per_class": 2,
        "test": {m: 0.5 for m in spec.metric_names}, "history": [], "loss_kwargs": {},
        "config_fingerprint": fingerprint or spec.fingerprint, "command": "",
    }  # fmt: skip


def test_plan_sorts_runs_into_finished_unfinished_damaged_and_refuses_another_protocol(tmp_path):
    config = tiny_config(tmp_path / "out", ["proxy_anchor", "mpa"], seeds=(0, 1))
    specs = _specs(config)  # proxy_anchor 0, 1; mpa 0, 1
    store = RunStore(config.output)
    finished = store.run_of(specs[0])
    finished.path.mkdir(parents=True)
    finished.save(_result(specs[0]), {"embeddings": np.zeros((2, 3), np.float32)})
    store.run_of(specs[1]).path.mkdir(parents=True)  # started, never finished
    wrong_seed = store.run_of(specs[2])
    wrong_seed.path.mkdir(parents=True)
    wrong_seed.save(_result(specs[3]))  # mpa seed 1's result in mpa seed 0's folder
    plan = store.plan(specs)  # specs[3]: never started
    assert list(plan.finished) == [0] and plan.finished[0]["loss"] == "proxy_anchor"
    assert plan.todo == [1, 2, 3]
    assert "unfinished" in plan.problems[1] and "'seed' is 1, expected 0" in plan.problems[2]
    assert 3 not in plan.problems
    # a finished run of other loss arguments: refused, naming the run
    finished.save(_result(specs[0], fingerprint="other"))
    with pytest.raises(ProtocolMismatch, match=str(finished.path)):
        store.plan(specs)


def test_a_run_folder_writes_its_result_last_and_atomically(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    (folder.path / "stale").write_text("x")
    folder.start()  # an earlier attempt's files are gone
    assert folder.path.is_dir() and not any(folder.path.iterdir())
    arrays = {"embeddings": np.arange(6, dtype=np.float64).reshape(2, 3)}
    folder.save({"a": np.float32(1.5), "b": [np.int64(2)]}, arrays)
    assert json.loads((folder.path / RESULT_FILE).read_text()) == {"a": 1.5, "b": [2]}
    assert np.array_equal(folder.map_data()["embeddings"], arrays["embeddings"])
    assert sorted(p.name for p in folder.path.iterdir()) == [MAP_FILE, RESULT_FILE]
    with pytest.raises(TypeError):  # not JSON: the old file stays whole, no temporary left
        write_json_atomic(folder.path / RESULT_FILE, {"a": object()})
    assert json.loads((folder.path / RESULT_FILE).read_text()) == {"a": 1.5, "b": [2]}


def test_training_returns_results_and_the_store_writes_them(tmp_path):
    config = tiny_config(tmp_path / "out", ["mpa"], epochs=1)
    spec = build_run_spec(config, "mpa", 0)
    data = load_config_data(config)
    folder = RunFolder(tmp_path / "trained")
    folder.start()
    trained = train_run(spec, data, folder)
    # training wrote only the record-keeper's logs
    assert sorted(p.name for p in folder.path.iterdir()) == ["logs", "tensorboard"]
    assert trained.result["loss"] == "mpa" and trained.result["test"] is not None
    assert set(trained.map_data) >= {"embeddings", "labels", "proxies"}
    stored = train_and_evaluate(spec, data, tmp_path / "stored")
    saved, problem = RunFolder(tmp_path / "stored").inspect(spec)
    assert problem is None and saved == json.loads(json.dumps(stored))
    # the same run both ways (same seed, same process): the same numbers
    assert stored["test"] == trained.result["test"]
    maps = RunFolder(tmp_path / "stored").map_data()
    assert all(np.array_equal(maps[k], trained.map_data[k]) for k in trained.map_data)


def test_only_the_first_seed_of_a_command_keeps_map_data(tmp_path):
    """The report draws each loss's maps from its first seed, so the other seeds' runs skip the
    map pass (an embedding pass of training-class images, VCPA's Monte Carlo uncertainty) and
    write no ``map_data.npz``; their results are unchanged."""
    config = tiny_config(tmp_path / "out", ["proxy_anchor"], epochs=1, seeds=[1, 0])
    data = load_config_data(config)

    def run(cfg, seed, name):
        folder = RunFolder(tmp_path / name)
        folder.start()
        return train_run(build_run_spec(cfg, "proxy_anchor", seed), data, folder)

    first, other = run(config, 1, "a"), run(config, 0, "b")
    assert first.map_data is not None and other.map_data is None
    alone = tiny_config(tmp_path / "out", ["proxy_anchor"], epochs=1, seeds=[0])
    same = run(alone, 0, "c")
    assert same.map_data is not None and same.result["test"] == other.result["test"]
