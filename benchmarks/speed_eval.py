"""Time and peak memory of retrieval evaluation: ``pml_proxies.AccuracyCalculator`` (faiss and
pure-torch kNN back-ends) against PML's ``AccuracyCalculator``, as ratios to PML.

Every (case, calculator) runs in its own subprocess, so peak memory is that process's own peak
resident set (``VmHWM`` of ``/proc/self/status``, read by the child when it is done; the parent's
``getrusage(RUSAGE_CHILDREN)`` would be the maximum over all children) and cases do not pollute
each other. The calculators of one case run back to back (``--repeats`` rounds, interleaved), so
that load changes on a shared machine hit them alike; trust the ratios more than the seconds.

Cases (D = 128, 100 embeddings per class, seeded Gaussian clusters, L2-normalised):

* ``self-N``: self-retrieval of N embeddings, ``k="max_bin_count"``, Recall@1/2/4/8, MAP@R,
  R-Precision, precision@1, nDCG@10 (PML: its three metrics);
* ``ref-1M``: ``--ref-queries`` queries against ``--ref-size`` references (ours only: PML's label
  counting alone needs queries' classes x references bytes);
* ``sop-k-None``: 60,502 x 512 self-retrieval with ``k=None`` (11,316 classes, as the SOP test
  split), every kNN metric (ours only: PML holds the 60,502^2 neighbour matrix). Ours takes the
  positive-rank path there (no neighbour lists), with either back-end.

Usage::

    python benchmarks/speed_eval.py --sizes 10000,50000,200000 --ref-size 1000000 --sop
    python benchmarks/speed_eval.py --sizes 2000 --quick      # seconds; what the test runs
    python benchmarks/speed_eval.py --sizes 0 --sop           # only the SOP-sized k=None case
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from _timing import format_table

CALCULATORS = ("pml", "ours-faiss", "ours-torch")
OUR_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "ndcg_at_10",
)
PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
ALL_KNN_METRICS = PML_METRICS + ("mean_average_precision", "mean_reciprocal_rank")
PER_CLASS = 100


def peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def make_embeddings(num: int, dim: int, num_classes: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num,), generator=gen)
    centers = torch.randn(num_classes, dim, generator=gen)
    x = centers[labels].mul_(0.5).add_(torch.randn(num, dim, generator=gen))
    return torch.nn.functional.normalize(x, dim=1), labels


def worker(spec: dict) -> dict:
    """Run one (case, calculator) and return its time, peak memory and metrics."""
    import torch
    from pytorch_metric_learning.utils import accuracy_calculator as pml_ac

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    sys.path.insert(0, spec["repo"])
    from pml_proxies.utils.accuracy_calculator import AccuracyCalculator
    from pml_proxies.utils.knn import DefaultKNN, TorchKNN

    query, query_labels = make_embeddings(
        spec["queries"], spec["dim"], spec["classes"], spec["seed"]
    )
    reference = reference_labels = None
    if spec["references"]:
        reference, reference_labels = make_embeddings(
            spec["references"], spec["dim"], spec["classes"], spec["seed"] + 1
        )
    base_mb = peak_rss_mb()
    k = None if spec["k"] == "None" else spec["k"]
    cpu = torch.device("cpu")
    if spec["calculator"] == "pml":
        include = tuple(m for m in spec["metrics"] if m in ALL_KNN_METRICS)
        calc = pml_ac.AccuracyCalculator(include=include, k=k, device=cpu)
    else:
        # ours-faiss: the calculator's default DefaultKNN, which is PML's FaissKNN when faiss is
        # installed; both are the calculator's own exact searches, so k=None takes the
        # positive-rank path (which calls neither) in both
        knn = DefaultKNN() if spec["calculator"] == "ours-faiss" else TorchKNN()
        kwargs = {"memory_budget_mb": spec["budget"]} if spec["budget"] else {}
        calc = AccuracyCalculator(
            include=tuple(spec["metrics"]), k=k, device=cpu, knn_func=knn, **kwargs
        )
    start = time.perf_counter()
    if reference is None:
        acc = calc.get_accuracy(query, query_labels)
    else:
        acc = calc.get_accuracy(query, query_labels, reference, reference_labels, False)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {"seconds": seconds, "peak_mb": peak, "base_mb": base_mb, "metrics": acc}


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cases(args) -> list[dict]:
    out = []
    common = {"dim": args.dim, "seed": args.seed, "threads": args.threads, "budget": args.budget}
    for size in args.sizes:
        out.append(
            dict(
                common,
                name=f"self-{size}",
                queries=size,
                references=0,
                classes=max(2, size // PER_CLASS),
                k="max_bin_count",
                metrics=OUR_METRICS,
                calculators=args.calculators,
            )
        )
    if args.ref_size:
        out.append(
            dict(
                common,
                name=f"ref-{args.ref_queries}x{args.ref_size}",
                queries=args.ref_queries,
                references=args.ref_size,
                classes=max(2, args.ref_size // PER_CLASS),
                k="max_bin_count",
                metrics=OUR_METRICS,
                calculators=[c for c in args.calculators if c != "pml"],
            )
        )
    if args.sop:
        out.append(
            dict(
                common,
                name=f"sop-{args.sop_size}x512-k-None",
                queries=args.sop_size,
                references=0,
                dim=512,
                classes=max(2, round(args.sop_size * 11316 / 60502)),
                k="None",
                metrics=ALL_KNN_METRICS + OUR_METRICS[3:],
                calculators=[c for c in args.calculators if c != "pml"],
            )
        )
    return out


def max_metric_gap(a: dict, b: dict) -> float:
    gaps = [abs(a[m] - b[m]) for m in a if m in b and not (math.isnan(a[m]) or math.isnan(b[m]))]
    return max(gaps, default=float("nan"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ref-size", type=int, default=0, help="references of the ref case")
    parser.add_argument("--ref-queries", type=int, default=10000)
    parser.add_argument("--sop", action="store_true", help="the 60,502 x 512 k=None case")
    parser.add_argument("--sop-size", type=int, default=60502)
    parser.add_argument("--calculators", default=",".join(CALCULATORS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--budget", type=float, default=0, help="memory_budget_mb (0: default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small, fast: one repeat")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.sizes = [int(s) for s in args.sizes.split(",") if s and int(s) > 0]  # "0": none
    args.calculators = [c for c in args.calculators.split(",") if c]
    unknown = set(args.calculators) - set(CALCULATORS)
    if unknown:
        parser.error(f"unknown calculators {sorted(unknown)}; choose from {CALCULATORS}")
    if args.quick:
        args.repeats = 1
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows, raw = [], []
    for case in cases(args):
        results: dict[str, list[dict]] = {c: [] for c in case["calculators"]}
        for _ in range(args.repeats):
            for calc in case["calculators"]:
                spec = {k: v for k, v in case.items() if k not in ("name", "calculators")}
                spec.update(calculator=calc, repo=repo)
                res = run_child(spec, args.timeout)
                results[calc].append(res)
                raw.append({"case": case["name"], "calculator": calc, **res})
                print(
                    f"{case['name']} {calc}: {res.get('error') or round(res['seconds'], 2)}",
                    file=sys.stderr,
                    flush=True,
                )
        summary = {}
        for calc, runs in results.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                summary[calc] = {"error": runs[-1]["error"]}
                continue
            times = sorted(r["seconds"] for r in ok)
            summary[calc] = {
                "seconds": times[len(times) // 2],
                "spread": f"{times[0]:.1f}-{times[-1]:.1f}" if len(times) > 1 else "",
                "peak_mb": max(r["peak_mb"] for r in ok),
                "data_mb": max(r["base_mb"] for r in ok),
                "metrics": ok[-1]["metrics"],
            }
        base = summary.get("pml", {})
        for calc, s in summary.items():
            row = {"case": case["name"], "calculator": calc}
            if "error" in s:
                row["s"] = s["error"]
                rows.append(row)
                continue
            row.update(
                {
                    "s": f"{s['seconds']:.2f}",
                    "s spread": s["spread"],
                    "peak RSS MB": f"{s['peak_mb']:.0f}",
                    "RSS before MB": f"{s['data_mb']:.0f}",
                }
            )
            if "seconds" in base:
                row["time / PML"] = f"{s['seconds'] / base['seconds']:.2f}"
                row["peak / PML"] = f"{s['peak_mb'] / base['peak_mb']:.2f}"
                row["max |metric - PML|"] = f"{max_metric_gap(s['metrics'], base['metrics']):.1e}"
            rows.append(row)
    columns = [
        "case",
        "calculator",
        "s",
        "s spread",
        "peak RSS MB",
        "RSS before MB",
        "time / PML",
        "peak / PML",
        "max |metric - PML|",
    ]
    print(format_table(rows, columns))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(raw, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
