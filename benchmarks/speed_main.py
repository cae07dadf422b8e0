"""CPU cost of the benchmark's main job, part by part (a script, not a test).

* ``startup``: CPU time (user + system) of ``python -m pml_proxies.benchmark --help`` and of a
  ``--jobs`` worker's start-up (the imports of ``parallel._serve`` and the data loading, with the
  Omniglot images decoded by its parent, as a worker gets them, and without), each in a fresh
  interpreter, with the heavy modules each one imported (pandas, matplotlib, tensorboard,
  Optuna, SQLAlchemy, scikit-learn, faiss, scipy.stats, torch._dynamo).
* ``iteration``: CPU time of a training iteration of the benchmark (``fit_one_epoch``: the data
  path, forward, loss, backward, optimizer step, logging) against a bare PyTorch loop doing the
  same forward, backward and optimizer step on one batch taken from the same loader, on the same
  model, loss and optimizer; the two are interleaved (one epoch of each per round) and summed
  over ``--rounds`` rounds. Target: at most 1.2x.
* ``runs`` (not in the default ``--parts``): CPU time of whole runs of ``--losses`` (seed 0),
  one after another in this process after a short warm-up run.
* ``cnn`` (not in the default ``--parts``): where the small CNN's training step (forward and
  backward on a batch of the benchmark's shape, 1 x 32 x 32 images) spends its CPU time, by
  ablation in this process: the whole step, the step with each group of layers replaced by
  identities (the BatchNorms; the first block's BatchNorm alone), and each convolution alone
  (forward + backward, the arithmetic rate of its multiply-adds). The step is about 80% of a
  run; what it shows is the floor that rounding-only changes cannot go under.
* ``eval-batch`` (not in the default ``--parts``): the small CNN's evaluation embedding (3
  channels, ``--sides``) per image for batches of 1 to 128 images (user + system CPU time: a
  feature map over glibc's 32 MB mmap threshold is mapped afresh, page faults and all, at every
  batch, as in a run), and whether each batch size gives the same embeddings as 128 (bit for
  bit): what
  ``pml_proxies.benchmark.config.SMALL_CNN_EVAL_PIXELS`` and ``MIN_EVAL_BATCH`` rest on.
* ``fused-adam`` (not in the default ``--parts``): whole runs of ``--losses`` (seed 1: no map
  data) with the benchmark's optimizer as it is and with torch's fused Adam kernel
  (``fused=True``), alternated ``--rounds`` times; the ratio of the summed CPU times per loss.
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
    python benchmarks/speed_main.py --parts cnn --rounds 3
    python benchmarks/speed_main.py --parts eval-batch --sides 32,64,224
    python benchmarks/speed_main.py --parts fused-adam --losses proxy_anchor,mpa,soft_triple --rounds 2

The default run's CPU time is measured outside this script, with GNU time (docs/speed.md).
"""

from __future__ import annotations

import argparse
import inspect
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
import pickle, sys
from pml_proxies.benchmark import parallel  # noqa: F401
from pml_proxies.benchmark.config import BenchmarkConfig
from pml_proxies.benchmark.data import load_config_data
from pml_proxies.benchmark.spec import build_run_spec  # noqa: F401
from pml_proxies.benchmark.train import train_and_evaluate  # noqa: F401
from pml_proxies.datasets.omniglot import adopt_decoded_images

if len(sys.argv) > 1:  # the parent's decoded images, as a worker receives them
    with open(sys.argv[1], "rb") as f:
        adopt_decoded_images(pickle.load(f))
load_config_data(BenchmarkConfig(losses=["proxy_anchor"], progress=False))
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""


HANDOVER = """
import pickle, sys
from pml_proxies.benchmark.config import BenchmarkConfig
from pml_proxies.benchmark.data import load_config_data
from pml_proxies.datasets.omniglot import decoded_images

load_config_data(BenchmarkConfig(losses=["proxy_anchor"], progress=False))
with open(sys.argv[1], "wb") as f:
    pickle.dump(decoded_images(), f, protocol=pickle.HIGHEST_PROTOCOL)
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
    worker = [py, "-c", WORKER_START.format(heavy=HEAVY)]
    alone = min(child_cpu(worker)[0] for _ in range(repeats))
    with tempfile.TemporaryDirectory() as tmp:  # what --jobs workers get from their parent
        handed = Path(tmp) / "decoded.pkl"
        child_cpu([py, "-c", HANDOVER, str(handed)])
        runs = [child_cpu([*worker, str(handed)]) for _ in range(repeats)]
    worker_cpu = min(c for c, _ in runs)
    print(f"startup: --help {help_cpu:.2f} s CPU (heavy modules: {help_heavy or 'none'})")
    print(f"startup: worker {worker_cpu:.2f} s CPU (heavy modules: {runs[0][1] or 'none'}); "
          f"{alone:.2f} s decoding the Omniglot images itself")  # fmt: skip
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


def _user_ms(step: Callable[[], None], steps: int = 100) -> float:
    """User CPU milliseconds of ``step()`` (after a warm-up). User time only: a loop of identical
    steps frees and re-maps its large buffers every step (the kernel's page faults, system
    time), which a whole run, with its larger heap, mostly does not."""
    for _ in range(10):
        step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    for _ in range(steps):
        step()
    return 1000 * (resource.getrusage(resource.RUSAGE_SELF).ru_utime - start) / steps


def cnn(rounds: int) -> None:
    """The small CNN's training step by ablation (module docstring)."""
    import torch
    from torch import nn

    from pml_proxies.benchmark.models import SmallCNN

    torch.manual_seed(0)
    x = torch.randn(32, 1, 32, 32)

    def variant(*identities: int) -> nn.Module:
        model = SmallCNN(1)
        for i in identities:
            model.features[i] = nn.Identity()
        return model

    bns = [i for i, m in enumerate(SmallCNN(1).features) if isinstance(m, nn.BatchNorm2d)]
    models = {"whole step": variant(), "without BatchNorm": variant(*bns)}
    models["without the first BatchNorm"] = variant(bns[0])
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):  # interleaved: load from other processes hits every variant alike
        for name, model in models.items():
            times[name].append(_user_ms(lambda m=model: m(x).mean((2, 3)).sum().backward()))
    whole = min(times.pop("whole step"))
    print(f"cnn: whole step (forward + backward, batch 32): {whole:.2f} ms")
    for name, values in times.items():
        best = min(values)
        share = 100 * (whole - best) / whole
        print(f"cnn: {name}: {best:.2f} ms (the removed layers: {share:.0f}% of the step)")
    # each convolution of the network alone (its own weights and memory layout)
    convs = [m for m in SmallCNN(1).features if isinstance(m, nn.Conv2d)]
    sizes = [32, 16, 8]  # the maps each convolution sees (after each block's pooling)
    for n, (conv, size) in enumerate(zip(convs, sizes), 1):
        shape = (32, conv.in_channels, size, size)
        inp = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        inp.requires_grad_(n > 1)  # the images need no gradient
        grad = torch.randn_like(conv(inp))  # the gradient's layout as in the network

        def step(c=conv, i=inp, g=grad) -> None:
            c(i).backward(g)

        ms = min(_user_ms(step) for _ in range(rounds))
        macs = 32 * size * size * conv.out_channels * conv.in_channels * 9  # forward
        flops = 2 * macs * (3 if n > 1 else 2)  # + weight (and input) gradient
        print(f"cnn: convolution {n} ({conv.in_channels} -> {conv.out_channels} channels, "
              f"{size} x {size}), forward + backward: {ms:.2f} ms, "
              f"{flops / ms / 1e6:.0f} GFLOP/s")  # fmt: skip


def eval_batch(sides: list[int]) -> None:
    """The small CNN's evaluation embedding per image by batch size (module docstring)."""
    import torch

    from pml_proxies.benchmark.models import build_network

    for side in sides:
        torch.manual_seed(0)
        net = build_network("small_cnn", 3, side, False, "avg", 512)
        net.train()  # a few steps: running statistics of BatchNorm as after training
        for _ in range(2):
            net(torch.randn(8, 3, side, side)).pow(2).mean().backward()
        net.eval()
        images = torch.randn(128, 3, side, side)

        def embed(size: int, net=net, images=images) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([net(images[i : i + size]) for i in range(0, 128, size)])

        reference = embed(128)
        for size in (1, 2, 4, 8, 16, 32, 64, 128):
            same = torch.equal(embed(size), reference)
            embed(size)
            start = time.process_time()  # with system time: large maps are mapped afresh
            embed(size)
            embed(size)
            ms = 1000 * (time.process_time() - start) / 2 / len(images)
            print(f"eval-batch: {side} px, batch {size}: {ms:.2f} ms an image, "
                  f"embeddings {'equal to' if same else 'other than'} batch 128's")  # fmt: skip


def fused_adam(losses: list[str], rounds: int) -> None:
    """Whole runs with the benchmark's optimizer and with torch's fused Adam (module docstring)."""
    import torch

    from pml_proxies.benchmark import train
    from pml_proxies.benchmark.config import BenchmarkConfig
    from pml_proxies.benchmark.data import load_config_data
    from pml_proxies.benchmark.spec import build_run_spec

    original = train.make_optimizer

    def fused(*args, **kwargs):
        opt = original(*args, **kwargs)
        accepted = inspect.signature(type(opt)).parameters
        settings = {k: v for k, v in opt.defaults.items() if k in accepted}
        return type(opt)(opt.param_groups, **{**settings, "foreach": None, "fused": True})

    spent: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = BenchmarkConfig(losses=losses[:1], progress=False, epochs=1, iterations_per_epoch=2)
        data = load_config_data(warm)
        train.train_and_evaluate(build_run_spec(warm, losses[0], 0), data, Path(tmp) / "warm")
        config = BenchmarkConfig(losses=losses, progress=False, seeds=(0, 1))
        try:
            for r in range(rounds):
                for name, make in (("as built", original), ("fused", fused)):
                    train.make_optimizer = make
                    for loss in losses:
                        start = time.process_time()
                        out = Path(tmp) / f"{name}{r}{loss}"
                        train.train_and_evaluate(build_run_spec(config, loss, 1), data, out)
                        seconds = time.process_time() - start
                        spent[name, loss] = spent.get((name, loss), 0.0) + seconds
                        print(f"fused-adam: {loss} ({name}) {seconds:.1f} s CPU", flush=True)
        finally:
            train.make_optimizer = original
    for loss in losses:
        ratio = spent["fused", loss] / spent["as built", loss]
        print(
            f"fused-adam: {loss}: fused / as built {ratio:.3f} ({torch.get_num_threads()} thread)"
        )


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
    p.add_argument("--sides", default="32,64,224", help="image sides of the 'eval-batch' part")
    p.add_argument("--repeats", type=int, default=3, help="start-ups measured (best kept)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",")]
    if "startup" in parts:
        startup(args.repeats)
    if {"iteration", "evaluation", "runs", "cnn", "eval-batch", "fused-adam"} & set(parts):
        import torch

        torch.set_num_threads(args.threads)
    if "iteration" in parts:
        iteration(args.loss, args.rounds)
    if "evaluation" in parts:
        evaluation(args.loss)
    if "runs" in parts:
        runs(args.losses.split(","))
    if "cnn" in parts:
        cnn(args.rounds)
    if "eval-batch" in parts:
        eval_batch([int(v) for v in args.sides.split(",")])
    if "fused-adam" in parts:
        fused_adam(args.losses.split(","), args.rounds)


if __name__ == "__main__":
    main()
