"""Speed of VCPA against PML's ProxyAnchorLoss (a script, not a test).

1. Loss only: forward + backward of ``VCPALoss`` (training mode, ``M`` Newton steps) and of PML's
   ``ProxyAnchorLoss`` on the same batch (B x D embeddings) at each number of classes in
   ``--sizes``, as a ratio to Proxy-Anchor (target: at most ``M + 1``), with the paper's steps,
   damped steps (same cost) and the monotone mode (``newton_line_search=True``, ``S`` draws: its
   cost relative to the plain step is the ratio of its row to the ``M=10`` row).
2. A whole training step (forward, loss, backward, optimizer steps) of a small CNN trunk on random
   ``3 x 32 x 32`` images, batch ``--train-batch``, ``D``-dim embeddings, ``--train-classes``
   classes, with VCPA vs Proxy-Anchor (target: at most 1.3x).

Measurements are interleaved (one step of each variant per round, median over ``--repeats``
rounds) so that load from other processes hits every variant alike. ``OMP_WAIT_POLICY`` defaults
to ``PASSIVE`` (spinning OpenMP threads make small-tensor timings erratic on a shared CPU).

    python benchmarks/speed_vcpa.py --repeats 7 --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# steadier timings on a shared CPU (PML_NOTES): set before torch starts its OpenMP runtime
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from pytorch_metric_learning.losses import ProxyAnchorLoss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    format_table,
    forward_backward,
    interleaved_times,
    make_batch,
)

from pml_proxies.losses import VCPALoss  # noqa: E402


def loss_only_table(args, device: torch.device) -> list[dict]:
    rows = []
    for num_classes in args.sizes:
        losses = {
            "PML ProxyAnchorLoss": ProxyAnchorLoss(num_classes, args.dim),
            f"VCPALoss (M={args.newton_steps})": VCPALoss(
                num_classes, args.dim, newton_steps=args.newton_steps, seed=0
            ),
            "VCPALoss (M=0)": VCPALoss(num_classes, args.dim, newton_steps=0, seed=0),
            f"VCPALoss (M={args.newton_steps}, eta=0.25)": VCPALoss(
                num_classes, args.dim, newton_steps=args.newton_steps, seed=0, newton_damping=0.25
            ),
            f"VCPALoss (M={args.newton_steps}, line search S={args.objective_samples})": VCPALoss(
                num_classes,
                args.dim,
                newton_steps=args.newton_steps,
                seed=0,
                newton_line_search=True,
                objective_samples=args.objective_samples,
            ),
        }
        if args.skip_line_search:
            losses = {k: v for k, v in losses.items() if "line search" not in k}
        embeddings, labels = make_batch(args.batch, args.dim, num_classes, device)
        steps = {
            name: forward_backward(fn.to(device), embeddings, labels) for name, fn in losses.items()
        }
        times = interleaved_times(steps, device, args.repeats, f"loss C={num_classes}")
        base = times["PML ProxyAnchorLoss"]
        for name, seconds in times.items():
            rows.append(
                {
                    "C": num_classes,
                    "loss": name,
                    "ms": f"{seconds * 1e3:.1f}",
                    "vs ProxyAnchor": f"{seconds / base:.2f}",
                }
            )
    return rows


class SmallCNN(torch.nn.Module):
    """Three conv blocks and a linear head: ``3 x 32 x 32`` images to ``dim``-d embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()

        def block(cin, cout):
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout)]

        self.features = torch.nn.Sequential(
            *block(3, 32),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            *block(32, 64),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            *block(64, 128),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(128, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def training_step(loss_fn: torch.nn.Module, args, device: torch.device):
    """A closure running one full training step (trunk + loss + optimizers)."""
    torch.manual_seed(0)
    model = SmallCNN(args.dim).to(device)
    loss_fn = loss_fn.to(device)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4)]
    loss_params = list(loss_fn.parameters())
    if loss_params:  # Proxy-Anchor's proxies (VCPA with Newton steps has none)
        optimizers.append(torch.optim.AdamW(loss_params, lr=1e-2))
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.train_batch, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(0, args.train_classes, (args.train_batch,), generator=gen).to(device)

    def step():
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        for opt in optimizers:
            opt.step()
        return loss

    return step


def training_table(args, device: torch.device) -> list[dict]:
    rows = []
    for num_classes in args.train_classes_list:
        args.train_classes = num_classes
        steps = {
            "PML ProxyAnchorLoss": training_step(
                ProxyAnchorLoss(num_classes, args.dim), args, device
            ),
            f"VCPALoss (M={args.newton_steps})": training_step(
                VCPALoss(num_classes, args.dim, newton_steps=args.newton_steps, seed=0),
                args,
                device,
            ),
        }
        times = interleaved_times(steps, device, args.repeats, f"train C={num_classes}")
        base = times["PML ProxyAnchorLoss"]
        for name, seconds in times.items():
            rows.append(
                {
                    "C": num_classes,
                    "B": args.train_batch,
                    "loss": name,
                    "ms / step": f"{seconds * 1e3:.1f}",
                    "vs ProxyAnchor": f"{seconds / base:.2f}",
                }
            )
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[100, 11_318],
        help="comma-separated numbers of classes C for the loss-only table",
    )
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--newton-steps", type=int, default=10)
    parser.add_argument(
        "--objective-samples", type=int, default=8, help="S of the line-search rows (monotone mode)"
    )
    parser.add_argument("--skip-line-search", action="store_true", help="no line-search rows")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument(
        "--train-classes-list",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[100],
        help="comma-separated numbers of classes for the training-step table",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"device={device} threads={torch.get_num_threads()} B={args.batch} D={args.dim} "
        f"M={args.newton_steps} repeats={args.repeats} torch={torch.__version__}"
    )
    if not args.skip_loss:
        print(f"\nLoss only, forward + backward (target: VCPA <= {args.newton_steps + 1}x)")
        print(format_table(loss_only_table(args, device), ["C", "loss", "ms", "vs ProxyAnchor"]))
    if not args.skip_train:
        print("\nWhole training step, small CNN, 3x32x32 images (target: VCPA <= 1.3x)")
        rows = training_table(args, device)
        print(format_table(rows, ["C", "B", "loss", "ms / step", "vs ProxyAnchor"]))


if __name__ == "__main__":
    main()
