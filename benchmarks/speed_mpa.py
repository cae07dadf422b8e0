"""Speed of the MPA family against PML's ProxyAnchorLoss and SoftTripleLoss (a script, not a test).

Prints the forward + backward time of MPA, MPA-DW and MPA-AP (K centers per class) next to PML's
``ProxyAnchorLoss`` and ``SoftTripleLoss`` (same K) measured in the same run, as ratios to
SoftTripleLoss, at each number of classes in ``--sizes``; then the extra time and extra peak memory
of the center regulariser (MPA with vs without it) at the largest size.

Measurements are interleaved (one step of every loss per round, median over ``--repeats`` rounds)
so that load from other processes hits every loss alike.

    python benchmarks/speed_mpa.py --repeats 7 --device cpu --sizes 100,11318
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss, SoftTripleLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    format_table,
    forward_backward,
    interleaved_times,
    make_batch,
    peak_memory_mb,
)

from pml_proxies.losses import (  # noqa: E402
    AllPairsMultiProxyAnchorLoss,
    DataWiseMultiProxyAnchorLoss,
    MultiProxyAnchorLoss,
)

MPA_LOSSES = {
    "MPA": MultiProxyAnchorLoss,
    "MPA-DW": DataWiseMultiProxyAnchorLoss,
    "MPA-AP": AllPairsMultiProxyAnchorLoss,
}


def build_losses(num_classes: int, dim: int, k: int, device: torch.device) -> dict:
    losses = {
        "PML ProxyAnchorLoss": ProxyAnchorLoss(num_classes, dim),
        f"PML SoftTripleLoss (K={k})": SoftTripleLoss(num_classes, dim, centers_per_class=k),
    }
    for name, cls in MPA_LOSSES.items():
        losses[f"{name} (K={k})"] = cls(num_classes, dim, centers_per_class=k)
    return {name: loss.to(device) for name, loss in losses.items()}


def speed_table(args, device: torch.device) -> list[dict]:
    rows = []
    for num_classes in args.sizes:
        losses = build_losses(num_classes, args.dim, args.centers, device)
        embeddings, labels = make_batch(args.batch, args.dim, num_classes, device)
        steps = {n: forward_backward(fn, embeddings, labels) for n, fn in losses.items()}
        times = interleaved_times(steps, device, args.repeats, f"C={num_classes}", args.clock)
        soft_triple = times[f"PML SoftTripleLoss (K={args.centers})"]
        proxy_anchor = times["PML ProxyAnchorLoss"]
        for name, seconds in times.items():
            rows.append(
                {
                    "C": num_classes,
                    "loss": name,
                    "ms": f"{seconds * 1e3:.1f}",
                    "vs SoftTriple": f"{seconds / soft_triple:.2f}",
                    "vs ProxyAnchor": f"{seconds / proxy_anchor:.2f}",
                }
            )
        del losses, steps
    return rows


def regularizer_step(num_classes: int, args, device: torch.device, with_reg: bool):
    kwargs = {} if with_reg else {"weight_regularizer": None}
    loss = MultiProxyAnchorLoss(num_classes, args.dim, centers_per_class=args.centers, **kwargs)
    embeddings, labels = make_batch(args.batch, args.dim, num_classes, device)
    return forward_backward(loss.to(device), embeddings, labels)


def memory_probe(args) -> None:
    """Child process: peak memory growth over two steps (the first one included: peak RSS never
    decreases, so a warm-up would hide it), printed as JSON."""
    device = torch.device(args.device)
    step = regularizer_step(args.sizes[-1], args, device, with_reg=args.probe == "with")

    def two_steps():
        step()
        step()

    print(json.dumps({"mb": peak_memory_mb(two_steps, device)}))


def probe_in_subprocess(args, which: str) -> float:
    """CPU peak RSS is process-wide, so each configuration is measured in a fresh process."""
    command = [
        sys.executable,
        __file__,
        "--probe",
        which,
        "--device",
        args.device,
        "--sizes",
        str(args.sizes[-1]),
        "--batch",
        str(args.batch),
        "--dim",
        str(args.dim),
        "--centers",
        str(args.centers),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mb"]


def regularizer_memory(args, device: torch.device) -> dict:
    """Peak memory of one MPA step with and without the regulariser, in MB."""
    num_classes = args.sizes[-1]
    if device.type == "cuda":
        return {
            w: peak_memory_mb(regularizer_step(num_classes, args, device, w == "with"), device)
            for w in ("with", "without")
        }
    # A child inherits its parent's peak RSS through fork: probe before this process grows.
    return {w: probe_in_subprocess(args, w) for w in ("with", "without")}


def regularizer_cost(args, device: torch.device, memory: dict) -> list[dict]:
    num_classes = args.sizes[-1]
    steps = {
        "with": regularizer_step(num_classes, args, device, True),
        "without": regularizer_step(num_classes, args, device, False),
    }
    times = interleaved_times(steps, device, args.repeats, "regulariser")
    del steps
    return [
        {
            "C": num_classes,
            "K": args.centers,
            "ms without": f"{times['without'] * 1e3:.1f}",
            "ms with": f"{times['with'] * 1e3:.1f}",
            "extra time": f"{(times['with'] / times['without'] - 1) * 100:+.1f}%",
            "peak MB without": f"{memory['without']:.0f}",
            "peak MB with": f"{memory['with']:.0f}",
            "extra memory": f"{memory['with'] - memory['without']:+.0f} MB",
        }
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[100, 11_318],
        help="comma-separated numbers of classes C; the regulariser runs at the last one",
    )
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centers", type=int, default=10, help="K for SoftTriple and MPA")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (steadier on a loaded machine; use --threads 1)",
    )
    parser.add_argument("--skip-regularizer", action="store_true")
    parser.add_argument("--probe", choices=["with", "without"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"device={device} threads={torch.get_num_threads()} B={args.batch} D={args.dim} "
        f"K={args.centers} repeats={args.repeats} torch={torch.__version__}"
    )
    memory = None if args.skip_regularizer else regularizer_memory(args, device)
    rows = speed_table(args, device)
    print(format_table(rows, ["C", "loss", "ms", "vs SoftTriple", "vs ProxyAnchor"]))
    if memory is not None:
        print()
        reg = regularizer_cost(args, device, memory)
        print(format_table(reg, list(reg[0])))


if __name__ == "__main__":
    main()
