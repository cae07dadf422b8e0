"""CPU cost of the benchmark's main job, part by part (a script, not a test).

* ``startup``: CPU time (user + system) of ``python -m pml_proxies.benchmark --help`` and of a
  ``--jobs`` worker's start-up (the imports of ``parallel._serve`` and the data loading), each in
  a fresh interpreter, with the heavy modules each one imported (pandas, matplotlib, tensorboard,
  Optuna, SQLAlchemy, scikit-learn, faiss, scipy.stats, torch._dynamo).
* ``iteration``: CPU time of a training iteration of the benchmark (``fit_one_epoch``: the data
  path, forward, loss, backward, optimizer step, logging) against a bare PyTorch loop doing the
  same forward, backward and optimizer step on one batch taken from the same loader, on the same
  model, loss and optimizer; the two are interleaved (one epoch of each per round) and summed
  over ``--rounds`` rounds. Target: at most 1.2x.
* ``runs`` (not in the default ``--parts``): CPU time of whole runs of ``--losses`` (seed 0),
  one after another in this process after a short warm-up run.
* ``evaluation``: one whole run (``train_and_evaluate``) with the CPU time of its per-epoch
  validation and final test (``train.evaluate``: embedding passes and metrics) measured, and
  that of the map data (``map_arrays``: an embedding pass of up to ``map_samples``
  training-class images, the proxies): their shares of the run. Target: validation +
  test at most 15%.

Every figure is CPU time of this process (``time.process_time``) or of its children
(``getrusage``), at ``--threads`` torch threads (default 1, as a ``--jobs`` worker), so that load
from other processes changes it little.

    python benchmarks/speed_main.py                       # all parts, proxy_anchor
    python benchmarks/speed_main.py --parts iteration --loss mpa --rounds 4
    python benchmarks/speed_main.py --parts runs --losses proxy_anchor,mpa,proxy_isa,vcpa

The default run's CPU time is measured outside this script, with GNU time (docs/speed.md).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = (
    "pandas",
    "matplotlib",
    "tensorboard",
    "optuna",
    "sqlalchemy",
    "sklearn",
    "faiss",
    "scipy.stats",
    "torch._dynamo",
)

WORKER_START = """
import sys
from pml_proxies.benchmark import parallel  # noqa: F401
from pml_proxies.benchmark.config import BenchmarkConfig
from pml_proxies.benchmark.data import load_config_data
from pml_proxies.benchmark.spec import build_run_spec  # noqa: F401
from pml_proxies.benchmark.train import train_and_evaluate  # noqa: F401

load_config_data(BenchmarkConfig(losses=["proxy_anchor"], progress=False))
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""


def child_cpu(args: list[str]) -> tuple[float, str]:
    """CPU seconds (user + system) of the command ``args`` and its last output line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = out.strip().splitlines()
    return cpu, lines[-1] if lines else ""


def startup(repeats: int) -> None:
    py = sys.executable
    help_cpu = min(
        child_cpu([py, "-m", "pml_proxies.benchmark", "--help"])[0] for _ in range(repeats)
    )
    probe = f"import sys, pml_proxies.benchmark.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    help_heavy = child_cpu([py, "-c", probe])[1]
    runs = [child_cpu([py, "-c", WORKER_START.format(heavy=HEAVY)]) for _ in range(repeats)]
    worker_cpu = min(c for c, _ in runs)
    print(f"startup: --help {help_cpu:.2f} s CPU (heavy modules: {help_heavy or 'none'})")
    print(f"startup: worker {worker_cpu:.2f} s CPU (heavy modules: {runs[0][1] or 'none'})")
    print("startup: target under 2 s each (best of", repeats, "runs)")


def _setup(loss: str, out: Path):
    from pml_proxies.benchmark.config import BenchmarkConfig
    from pml_proxies.benchmark.data import load_config_data
    from pml_proxies.benchmark.spec import build_run_spec

    config = BenchmarkConfig(losses=[loss], progress=False, output=str(out))
    data = load_config_data(config)
    return config, data, build_run_spec(config, loss, 0)


def iteration(loss: str, rounds: int) -> None:
    import torch

    from pml_proxies.benchmark import train

    with tempfile.TemporaryDirectory() as tmp:
        config, data, spec = _setup(loss, Path(tmp))
        run = train.build_run(spec, data, Path(tmp) / "run")
        train.seed_everything(0)
        x, y = next(iter(run.loader))
        n = config.iterations_per_epoch

        def bare() -> None:
            run.model.train()
            for _ in range(n):
                run.optimizer.zero_grad(set_to_none=True)
                value = run.loss(run.model(x), y, None)
                value.backward()
                run.optimizer.step()

        harness_s = bare_s = 0.0
        for epoch in range(1, rounds + 2):
            start = time.process_time()
            train.fit_one_epoch(run, spec, epoch)
            middle = time.process_time()
            bare()
            end = time.process_time()
            if epoch > 1:  # the first round warms both up
                harness_s += middle - start
                bare_s += end - middle
        run.record_keeper.tensorboard_writer.close()
    its = rounds * n
    print(
        f"iteration ({loss}, batch {run.batch_size}, {torch.get_num_threads()} thread(s)): "
        f"benchmark {1000 * harness_s / its:.1f} ms, bare loop {1000 * bare_s / its:.1f} ms, "
        f"ratio {harness_s / bare_s:.2f} (target <= 1.2)"
    )


def evaluation(loss: str) -> None:
    from pml_proxies.benchmark import train

    spent = {"evaluate": 0.0, "map": 0.0}
    originals = {"evaluate": train.evaluate, "map": train.map_arrays}

    def timed(part: str):
        def call(*args, **kwargs):
            start = time.process_time()
            try:
                return originals[part](*args, **kwargs)
            finally:
                spent[part] += time.process_time() - start

        return call

    train.evaluate, train.map_arrays = timed("evaluate"), timed("map")
    tmp = Path(tempfile.mkdtemp())
    try:
        config, data, spec = _setup(loss, tmp)
        start = time.process_time()
        result = train.train_and_evaluate(spec, data, tmp / "run")
        total = time.process_time() - start
    finally:
        train.evaluate, train.map_arrays = originals["evaluate"], originals["map"]
        shutil.rmtree(tmp)
    print(
        f"evaluation ({loss}): run {total:.1f} s CPU; validation + test (embedding passes and "
        f"metrics) {spent['evaluate']:.2f} s = {100 * spent['evaluate'] / total:.1f}% of the run "
        f"(target <= 15%); map data (training-class embeddings, proxies) {spent['map']:.2f} s = "
        f"{100 * spent['map'] / total:.1f}%; test MAP@R "
        f"{result['test']['mean_average_precision_at_r']:.4f}"
    )


def runs(losses: list[str]) -> None:
    """CPU time of whole runs (``train_and_evaluate``), one after another in this process after a
    short warm-up run (so no run pays the imports and the per-process caches)."""
    from pml_proxies.benchmark import train
    from pml_proxies.benchmark.config import BenchmarkConfig
    from pml_proxies.benchmark.data import load_config_data
    from pml_proxies.benchmark.spec import build_run_spec

    with tempfile.TemporaryDirectory() as tmp:
        warm = BenchmarkConfig(losses=losses[:1], progress=False, epochs=1, iterations_per_epoch=2)
        data = load_config_data(warm)
        train.train_and_evaluate(build_run_spec(warm, losses[0], 0), data, Path(tmp) / "warm")
        config = BenchmarkConfig(losses=losses, progress=False)
        total = 0.0
        for loss in losses:
            start = time.process_time()
            train.train_and_evaluate(build_run_spec(config, loss, 0), data, Path(tmp) / loss)
            seconds = time.process_time() - start
            total += seconds
            print(f"runs: {loss} seed 0 {seconds:.1f} s CPU")
    print(f"runs: {total:.1f} s CPU in all")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="startup,iteration,evaluation")
    p.add_argument("--loss", default="proxy_anchor")
    p.add_argument(
        "--losses",
        default="proxy_anchor,mpa,proxy_isa,vcpa",
        help="the losses of the 'runs' part",
    )
    p.add_argument("--rounds", type=int, default=3, help="measured epochs of each loop")
    p.add_argument("--repeats", type=int, default=3, help="start-ups measured (best kept)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",")]
    if "startup" in parts:
        startup(args.repeats)
    if {"iteration", "evaluation", "runs"} & set(parts):
        import torch

        torch.set_num_threads(args.threads)
    if "iteration" in parts:
        iteration(args.loss, args.rounds)
    if "evaluation" in parts:
        evaluation(args.loss)
    if "runs" in parts:
        runs(args.losses.split(","))


if __name__ == "__main__":
    main()
