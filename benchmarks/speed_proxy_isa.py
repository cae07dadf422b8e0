"""Speed of ProxyISALoss against PML's ProxyAnchorLoss (a script, not a test).

Forward + backward + state update of Proxy-ISA in its steady state (memory and filter on, the
memory of ``T`` entries full, per-class state as after a long run), next to PML's
``ProxyAnchorLoss`` measured in the same run, as a ratio, at each number of classes in
``--sizes``. Measurements are interleaved (one step of every loss per round, median over
``--repeats`` rounds) so that load from other processes hits every loss alike; ``--runs``
repeats the whole measurement and prints the median ratio with its range over the runs.

    python benchmarks/speed_proxy_isa.py --repeats 15 --device cpu --sizes 100,11318
    python benchmarks/speed_proxy_isa.py --sizes 100 --threads 1 --clock cpu --repeats 41 --runs 5

``--breakdown`` adds ProxyISALoss in eval mode (forward + backward with the same weights, no state
update), which splits its cost into the loss and the state update.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ProxyAnchorLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import format_table, forward_backward, interleaved_times  # noqa: E402

from pml_proxies.losses import ProxyISALoss  # noqa: E402


@torch.no_grad()
def fill_steady_state(loss: ProxyISALoss, seed: int = 0) -> None:
    """Put ``loss`` in a consistent steady state: memory full of random unit vectors with random
    labels, per-class sums and counts to match, counters as after many epochs."""
    gen = torch.Generator().manual_seed(seed)
    T, C, D = loss.memory_size, loss.num_classes, loss.embedding_size
    device = loss.proxies.device
    entries = F.normalize(torch.randn(T, D, generator=gen), dim=1).to(device)
    labels = torch.randint(0, C, (T,), generator=gen).to(device)
    loss.set_epoch(max(loss.memory_start_epoch, loss.filter_start_epoch))
    loss.memory_embeddings.copy_(entries)
    loss.memory_labels.copy_(labels)
    loss.memory_count.fill_(T)
    loss.memory_write_position.fill_(int(torch.randint(0, T, (1,), generator=gen)))
    loss.memory_class_counts.zero_().index_add_(0, labels, torch.ones_like(labels))
    loss.memory_class_sums.zero_().index_put_(
        (labels,), loss.memory.quantise(entries), accumulate=True
    )
    counts = torch.randint(20, 400, (C,), generator=gen).to(device)
    loss.sample_counts.copy_(counts)
    beta = (loss.volume_bound - 1) / loss.volume_bound
    loss.effective_numbers.copy_((1 - beta ** counts.double()) / (1 - beta))
    sums = loss.memory_class_sums.double() * 2.0**-loss.fixed_point_bits
    p = F.normalize(loss.proxies.detach(), dim=1).double()
    mean_cos = (sums * p).sum(1) / loss.memory_class_counts.clamp(min=1)
    loss.learned_similarities.copy_(loss.hardness_scale * mean_cos)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[100, 11_318]
    )
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--memory-size", type=int, default=55_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--runs", type=int, default=1, help="whole measurements (ratio range)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (steadier on a loaded machine; use --threads 1)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time ProxyISALoss in eval mode (no state update)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device={device} threads={torch.get_num_threads()} B={args.batch} D={args.dim} "
        f"T={args.memory_size} repeats={args.repeats} clock={args.clock} torch={torch.__version__}"
    )
    rows = []
    for num_classes in args.sizes:
        torch.manual_seed(0)
        pa = ProxyAnchorLoss(num_classes, args.dim).to(device)
        isa = ProxyISALoss(num_classes, args.dim, memory_size=args.memory_size).to(device)
        isa_unchecked = ProxyISALoss(
            num_classes, args.dim, memory_size=args.memory_size, check_inputs=False
        ).to(device)
        variants = [isa, isa_unchecked]
        if args.breakdown:
            isa_eval = ProxyISALoss(num_classes, args.dim, memory_size=args.memory_size).to(device)
            variants.append(isa_eval.eval())
        for loss in variants:
            loss.proxies.data.copy_(pa.proxies.data)
            fill_steady_state(loss)
        gen = torch.Generator().manual_seed(1)
        embeddings = torch.randn(args.batch, args.dim, generator=gen).to(device)
        embeddings.requires_grad_(True)
        labels = torch.randint(0, num_classes, (args.batch,), generator=gen).to(device)
        steps = {
            "PML ProxyAnchorLoss": forward_backward(pa, embeddings, labels),
            "ProxyISALoss": forward_backward(isa, embeddings, labels),
            "ProxyISALoss (check_inputs=False)": forward_backward(
                isa_unchecked, embeddings, labels
            ),
        }
        if args.breakdown:
            steps["ProxyISALoss (eval: no state update)"] = forward_backward(
                variants[2], embeddings, labels
            )
        runs = [
            interleaved_times(steps, device, args.repeats, f"C={num_classes}", args.clock)
            for _ in range(args.runs)
        ]
        assert int(isa.memory_count) == args.memory_size and bool(isa.filter_enabled)
        for name in steps:
            ratios = [run[name] / run["PML ProxyAnchorLoss"] for run in runs]
            seconds = statistics.median(run[name] for run in runs)
            rows.append(
                {
                    "C": num_classes,
                    "loss": name,
                    "ms": f"{seconds * 1e3:.2f}",
                    "vs ProxyAnchor": f"{statistics.median(ratios):.2f}",
                    "range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                }
            )
        del pa, isa, isa_unchecked, variants, steps
    print(format_table(rows, ["C", "loss", "ms", "vs ProxyAnchor", "range"]))


if __name__ == "__main__":
    main()
