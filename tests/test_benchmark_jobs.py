"""Parallel benchmark runs (``--jobs``) and the evaluation image cache: results identical to the
sequential runs, failures isolated with their run, Ctrl-C stops the workers."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pml_proxies
from pml_proxies.benchmark import BenchmarkConfig, build_run_spec, parallel, run_benchmark, train
from pml_proxies.benchmark import config as config_module
from pml_proxies.benchmark.cli import build_parser, main
from pml_proxies.benchmark.config import ConfigError
from pml_proxies.benchmark.data import load_config_data
from pml_proxies.benchmark.models import EmbeddingNet, build_trunk
from pml_proxies.benchmark.progress import LineProgress, progress_bar
from pml_proxies.benchmark.runner import RunsFailed
from pml_proxies.benchmark.train import compute_embeddings, inspect_run

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_helpers import tiny_config  # noqa: E402

REPO = Path(pml_proxies.__file__).resolve().parents[1]


def _env() -> dict:
    """The environment of a subprocess that imports this checkout's package."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}


def _results(output: Path) -> dict:
    """Every run's result.json without what may differ between invocations (time, command)."""
    out = {}
    for path in sorted(Path(output).glob("runs/*/seed_*/result.json")):
        r = json.loads(path.read_text())
        r.pop("train_time_s")
        r.pop("command")
        out[path.parent.relative_to(output).as_posix()] = r
    return out


# ------------------------------------------------------------------ the option
def test_jobs_option_validated_and_not_part_of_the_protocol(tmp_path, monkeypatch, capsys):
    base = tiny_config(tmp_path, ["mpa"])
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ConfigError, match="jobs"):
            tiny_config(tmp_path, ["mpa"], jobs=bad)
    with pytest.raises(SystemExit) as info:
        main(["--jobs", "0", "--output", str(tmp_path / "never")])
    assert info.value.code == 2 and "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert "--jobs" in build_parser().format_help()
    other = tiny_config(tmp_path, ["mpa"], jobs=2)
    assert "jobs" not in base.protocol() and other.fingerprint("mpa") == base.fingerprint("mpa")


def test_default_jobs_fill_the_cores_for_the_small_cnn_on_cpu_only(monkeypatch):
    monkeypatch.setattr(config_module, "available_cores", lambda: 4)
    small = BenchmarkConfig(losses=["mpa"], device="cpu", progress=False)
    assert small.jobs is None and small.threads_or_default == 1
    assert [small.jobs_for(n) for n in (1, 3, 33)] == [1, 3, 4]
    two_threads = BenchmarkConfig(losses=["mpa"], device="cpu", threads=2)
    assert two_threads.jobs_for(33) == 2
    assert BenchmarkConfig(losses=["mpa"], device="cpu", threads=8).jobs_for(33) == 1
    pretrained = BenchmarkConfig(losses=["mpa"], device="cpu", trunk="efficientnet_lite0")
    assert pretrained.jobs_for(33) == 1
    explicit = BenchmarkConfig(losses=["mpa"], device="cpu", jobs=3)
    assert (explicit.jobs_for(33), explicit.jobs_for(2)) == (3, 2)


def test_line_progress_counts_a_generator_with_a_total():
    stream = io.StringIO()
    bar = progress_bar((i for i in range(3)), "benchmark", stream=stream, total=3)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix_str("mpa seed 0 done")
    text = stream.getvalue()
    assert "\x1b" not in text and text.splitlines()[-1].startswith("benchmark: 3/3, ")
    # waiting for a slow item (a parallel run): refresh() writes a line when one is due
    stream = io.StringIO()

    def items():
        yield 1
        bar.refresh()
        yield 2

    bar = LineProgress(items(), "benchmark", stream=stream, period=0.0, total=2)
    bar.refresh()  # before the iteration: nothing
    assert stream.getvalue() == ""
    assert list(bar) == [1, 2]
    lines = stream.getvalue().splitlines()
    # never the same line twice (the second refresh while at 1/2 writes nothing)
    assert lines == ["benchmark: 1/2, 0 s", "benchmark: 2/2, 0 s"]
    slow = LineProgress(items(), "benchmark", stream=io.StringIO(), period=60.0)
    bar = slow
    list(slow)
    assert slow.stream.getvalue().splitlines() == ["benchmark: 2, 0 s"]  # only the final line


# ------------------------------------------------------------------ evaluation image cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_evaluation_images_give_the_dataloaders_embeddings(tmp_path, monkeypatch, dtype):
    config = tiny_config(tmp_path, ["mpa"], eval_batch_size=37)
    data = load_config_data(config)
    torch.manual_seed(0)
    model = EmbeddingNet(build_trunk("small_cnn", 1, 8, False), "avg", 16).to(dtype)

    class AsDtype(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x.to(dtype))

    wrapped = AsDtype()
    rows = [5, 0, 17, 3, 40]
    monkeypatch.setattr(train, "EVAL_CACHE_BYTES", 0)  # the DataLoader path
    loader = [compute_embeddings(wrapped, data.test, config)]
    loader.append(compute_embeddings(wrapped, data.train_eval, config, rows))
    assert train._EVAL_CACHE[data.test].usable is False
    train._EVAL_CACHE.clear()
    monkeypatch.undo()
    for _ in range(2):  # filled on the first pass, read on the second
        cached = [compute_embeddings(wrapped, data.test, config)]
        cached.append(compute_embeddings(wrapped, data.train_eval, config, rows))
        assert len(train._EVAL_CACHE[data.test].items) == len(data.test)
        assert len(train._EVAL_CACHE[data.train_eval].items) == len(
            set(rows) | {0}
        )  # + the probe, row 0
        for (e1, y1), (e2, y2) in zip(loader, cached):
            assert torch.equal(e1, e2) and torch.equal(y1, y2)
            assert e1.dtype == torch.float32
    # DataLoader workers decode in parallel: no cache
    with_workers = tiny_config(tmp_path, ["mpa"], workers=1)
    assert train._eval_images(data.val, with_workers) is None


# ------------------------------------------------------------------ the worker
@pytest.fixture
def in_process_worker():
    """Run parallel._worker in this process: restore what it changes (SIGINT, threads)."""
    sigint, threads = signal.getsignal(signal.SIGINT), torch.get_num_threads()
    yield parallel._worker
    signal.signal(signal.SIGINT, sigint)
    torch.set_num_threads(threads)


def test_worker_refuses_another_copy_of_the_package(tmp_path, in_process_worker):
    tasks, results = queue.Queue(), queue.Queue()
    tasks.put(None)
    config = tiny_config(tmp_path, ["mpa"])
    in_process_worker(config, tasks, results, os.getppid(), "/elsewhere/pml_proxies/__init__.py")
    kind, _, _, message = results.get_nowait()
    assert kind == "fatal" and "/elsewhere/pml_proxies" in message
    assert tasks.get_nowait() is None  # nothing was trained


def test_worker_trains_the_sequential_spec_and_reports_failures(tmp_path, in_process_worker):
    tasks, results = queue.Queue(), queue.Queue()
    config = tiny_config(tmp_path, ["proxy_anchor"])
    (tmp_path / "blocked").write_text("a file where the run folder's parent should be")
    tasks.put((0, config, "proxy_anchor", 0, str(tmp_path / "blocked" / "seed_0")))
    tasks.put((1, config, "proxy_anchor", 0, str(tmp_path / "ok")))
    tasks.put(None)
    in_process_worker(config, tasks, results, os.getppid(), pml_proxies.__file__)
    messages = [results.get_nowait() for _ in range(results.qsize())]
    kinds = [(m[0], m[2]) for m in messages]
    assert kinds == [("ready", None), ("started", 0), ("failed", 0), ("started", 1), ("done", 1)]
    assert "Error" in messages[2][3][0] and "Traceback" in messages[2][3][1]
    spec = build_run_spec(config, "proxy_anchor", 0)
    assert messages[4][3]["config_fingerprint"] == spec.fingerprint
    assert inspect_run(tmp_path / "ok")[0] is not None


def test_a_spec_is_rebuilt_identically_from_its_own_config(tmp_path):
    """Workers receive a run's config (its overrides applied) and rebuild the spec from it: a
    tuned run (loss overrides, proxy lr) trains with the parent's spec."""
    config = tiny_config(tmp_path, ["mpa"], loss_params={"mpa": {"centers_per_class": 3}})
    for spec in (
        build_run_spec(config, "mpa", 1),
        build_run_spec(config, "mpa", 2, loss_overrides={"alpha": 8.5}, proxy_lr_mult=0.25),
        build_run_spec(
            config, "multi_similarity", 0, loss_overrides={"miner_kwargs": {"epsilon": 0.3}}
        ),
    ):
        assert build_run_spec(spec.config, spec.loss, spec.seed) == spec


# ------------------------------------------------------------------ end to end (spawned workers)
@pytest.mark.slow
def test_jobs_2_gives_the_sequential_results(tmp_path):
    losses, seeds = ["proxy_anchor", "mpa"], [0, 1]
    sequential = run_benchmark(tiny_config(tmp_path / "seq", losses, seeds=seeds, jobs=1))
    # the parallel run through the command line (not a terminal: line progress)
    argv = ["--dataset", "digits", "--losses", ",".join(losses), "--seeds", "0,1",
            "--epochs", "2", "--iterations-per-epoch", "2", "--embedding-size", "16",
            "--batch-size", "16", "--map-samples", "50", "--log-freq", "1", "--jobs", "2",
            "--output", str(tmp_path / "par")]  # fmt: skip
    probe = "import pml_proxies.benchmark.parallel as p; print(p.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, check=True
    )
    assert Path(done.stdout.strip()).resolve() == Path(parallel.__file__).resolve()
    done = subprocess.run(
        [sys.executable, "-m", "pml_proxies.benchmark", *argv],
        env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr and "benchmark: 4/4" in done.stderr
    assert _results(tmp_path / "seq") == _results(tmp_path / "par") != {}
    columns = [c for c in sequential["runs"].columns if c != "train_time_s"]
    import pandas as pd

    parallel_runs = pd.read_csv(tmp_path / "par" / "runs.csv")
    sequential_runs = pd.read_csv(tmp_path / "seq" / "runs.csv")
    assert parallel_runs[columns].equals(sequential_runs[columns])
    assert "runs trained at once (--jobs): 2" in (tmp_path / "par" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, capsys, jobs):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "mpa").write_text("a file where mpa's run folders should be")
    config = tiny_config(out, ["proxy_anchor", "mpa", "normalized_softmax"], jobs=jobs)
    with pytest.raises(RunsFailed, match="1 run.s. failed.*mpa seed 0: ") as info:
        run_benchmark(config)
    assert [(f.loss, f.seed) for f in info.value.failures] == [("mpa", 0)]
    assert "mpa seed 0: " in capsys.readouterr().err  # noted when it failed
    runs = (out / "runs.csv").read_text()
    assert "proxy_anchor" in runs and "normalized_softmax" in runs and "mpa," not in runs
    # the same command trains the failed run again once its folder can be made
    (out / "runs" / "mpa").unlink()
    again = run_benchmark(config)
    assert again["skipped"] == 2 and len(again["runs"]) == 3


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_ctrl_c_stops_every_worker_and_leaves_no_half_written_result(tmp_path):
    out = tmp_path / "out"
    # the default data set: its loading creates tqdm's lock in each worker, a named semaphore
    # that a killed worker leaks (the resource tracker's "leaked semaphore objects" warning)
    argv = ["--dataset", "omniglot", "--losses", "proxy_anchor,mpa", "--seeds", "0,1,2",
            "--epochs", "50", "--iterations-per-epoch", "20", "--jobs", "2", "--no-progress",
            "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "pml_proxies.benchmark", *argv],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while len(list(out.glob("runs/*/seed_*"))) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(list(out.glob("runs/*/seed_*"))) >= 2, "the workers did not start training"
        children = _children(proc.pid)
        assert len(children) >= 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "leaked semaphore" not in err and "Traceback" not in err, err
    deadline = time.time() + 20  # the parent joined its workers; helpers end when it does
    while [pid for pid in children if _alive(pid)] and time.time() < deadline:
        time.sleep(0.2)
    assert [pid for pid in children if _alive(pid)] == []
    for directory in out.glob("runs/*/seed_*"):  # unfinished (trained again), never damaged
        result, problem = inspect_run(directory)
        assert result is not None or "has no result.json" in problem
    assert not (out / "runs.csv").exists()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_tuned_reruns_with_jobs_2_give_the_sequential_results_and_are_reused(tmp_path):
    from pml_proxies.benchmark.tune.runner import _reproduce

    best = [("proxy_anchor", {"alpha": 16.0, "margin": 0.2, "proxy_lr": 0.01}),
            ("multi_similarity", {"alpha": 1.5, "beta": 8.0, "miner.epsilon": 0.4})]  # fmt: skip
    got = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        config = tiny_config(out, ["proxy_anchor", "multi_similarity"], seeds=[0, 1], jobs=jobs)
        results = _reproduce(config, best, out)
        assert [(r["loss"], r["seed"]) for r in results] == [
            ("proxy_anchor", 0), ("proxy_anchor", 1), ("multi_similarity", 0),
            ("multi_similarity", 1),
        ]  # fmt: skip
        got[jobs] = _results(out)
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_*/result.json")}
        again = _reproduce(config, best, out)  # everything reused, nothing trained
        assert [r["config_fingerprint"] for r in again] == [
            r["config_fingerprint"] for r in results
        ]
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert got[1] == got[2] and len(got[1]) == 4


def test_torch_threads_are_set_in_the_block_and_restored_after_an_error(tmp_path):
    before = torch.get_num_threads()
    inside = 2 if before == 1 else 1  # differs from the threads before
    config = tiny_config(tmp_path, ["mpa"], threads=inside)
    with pytest.raises(RuntimeError, match="inside"):
        with train.torch_threads(config):
            assert torch.get_num_threads() == inside
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
