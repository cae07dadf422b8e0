"""Command line of the benchmark: ``pml-proxies-benchmark`` / ``python -m pml_proxies.benchmark``."""

from __future__ import annotations

import argparse
import ast
import shlex
import sys

import torch

from .config import BenchmarkConfig
from .losses import LOSS_NAMES, LOSSES, available_losses, effective_kwargs, is_available
from .models import POOLING_NAMES, TRUNK_DEFAULTS

#: ``--quick``: a smoke test of the whole pipeline (tests / CI).
QUICK = dict(epochs=2, iterations_per_epoch=4, seeds=[0], map_samples=300)


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _parse_key_values(items: list[str], option: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _literal(value)
    return out


def _parse_loss_params(items: list[str]) -> dict[str, dict]:
    """``["mpa.centers_per_class=2", ...]`` -> ``{"mpa": {"centers_per_class": 2}}``."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        loss, dot, arg = key.partition(".")
        if not sep or not dot or not arg:
            raise ValueError(f"--loss-param expects LOSS.ARG=VALUE, got {item!r}")
        if loss not in LOSSES:
            raise ValueError(f"--loss-param: unknown loss {loss!r}")
        out.setdefault(loss, {})[arg.strip()] = _literal(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pml-proxies-benchmark",
        description="Train and evaluate proxy-based DML losses under one fair protocol "
        "(same trunk, sampler, optimizer, augmentation and iteration budget; model selection on "
        "held-out training classes; several seeds, mean and 95%% CI) and write a report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--dataset", default="digits", help="digits, omniglot, cub200, cars196, sop, inshop")
    a(
        "--losses",
        default="all",
        help="comma-separated registry names, or 'all' (every "
        f"available loss): {', '.join(LOSS_NAMES)}",
    )
    a("--seeds", type=_int_list, default=None, help="seeds, e.g. '0,1,2' (default 0,1,2)")
    a("--output", default="benchmark_results", help="output folder (resumable)")
    a("--root", default=None, help="data folder (default: the datasets module's)")
    a("--download", action="store_true", help="allow downloading the data set")
    a(
        "--dataset-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra argument of the data set class, e.g. variant=full for Omniglot (repeatable)",
    )
    a(
        "--quick",
        action="store_true",
        help="smoke test: 2 epochs x 4 iterations, seed 0 (explicit options still win)",
    )
    a("--list-losses", action="store_true", help="list losses and their defaults, then exit")
    g = p.add_argument_group("model")
    g.add_argument("--trunk", default="small_cnn", choices=sorted(TRUNK_DEFAULTS))
    g.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ImageNet weights (default: yes for every trunk but small_cnn)",
    )
    g.add_argument("--pooling", default="avg", choices=POOLING_NAMES)
    g.add_argument("--embedding-size", type=int, default=512)
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side (default: the dataset's, e.g. 8 for digits)",
    )
    g = p.add_argument_group("data and sampling")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of training classes held out for model selection",
    )
    g.add_argument("--split-seed", type=int, default=0, help="seed of the validation class draw")
    g.add_argument(
        "--max-train-classes",
        type=int,
        default=None,
        help="use only the first N training-split classes (quick runs)",
    )
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--m-per-class", type=int, default=4, help="MPerClassSampler m")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=None, help="(default 10; --quick 2)")
    g.add_argument("--iterations-per-epoch", type=int, default=None, help="(default 30; --quick 4)")
    g.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    g.add_argument(
        "--primary-metric",
        default="mean_average_precision_at_r",
        help="validation metric of model selection",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "rmsprop", "sgd"])
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="trunk/embedder lr (default 1e-3 small_cnn, 1e-4 pretrained)",
    )
    g.add_argument(
        "--proxy-lr-mult",
        type=float,
        default=100.0,
        help="lr multiplier of loss parameters (proxies)",
    )
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--lr-decay-epochs", type=int, default=0, help="step decay period (0: none)")
    g.add_argument("--lr-decay-gamma", type=float, default=0.5)
    g.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help="epochs with a frozen trunk (default 0 small_cnn, 1 pretrained)",
    )
    g.add_argument(
        "--freeze-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="freeze trunk BatchNorm (default: pretrained trunks)",
    )
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: none)")
    g.add_argument(
        "--loss-param",
        action="append",
        default=[],
        metavar="LOSS.ARG=VALUE",
        help="override a loss hyper-parameter (repeatable)",
    )
    g = p.add_argument_group("evaluation and execution")
    g.add_argument("--recall-ks", type=_int_list, default=[1, 2, 4, 8])
    g.add_argument("--ndcg-ks", type=_int_list, default=[10])
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for small_cnn on CPU, else torch's)",
    )
    g.add_argument("--log-freq", type=int, default=10, help="record-keeper logging period")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument(
        "--map",
        dest="map_method",
        default="pca",
        choices=["pca", "tsne"],
        help="2-D projection of the embedding maps",
    )
    return p


def config_from_args(args: argparse.Namespace, argv: list[str]) -> BenchmarkConfig:
    if args.losses == "all":
        losses = available_losses()
    else:
        losses = [n.strip() for n in args.losses.split(",") if n.strip()]
        for n in losses:
            if n not in LOSSES:
                raise ValueError(f"unknown loss {n!r}; choose from {', '.join(LOSS_NAMES)}")
            if not is_available(n):
                raise ValueError(f"loss {n!r} is not available in this installation yet")
    quick = QUICK if args.quick else {}
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = BenchmarkConfig(
        dataset=args.dataset,
        losses=losses,
        seeds=args.seeds if args.seeds is not None else quick.get("seeds", [0, 1, 2]),
        output=args.output,
        root=args.root,
        dataset_kwargs=_parse_key_values(args.dataset_arg, "--dataset-arg"),
        download=args.download,
        trunk=args.trunk,
        pretrained=args.pretrained,
        pooling=args.pooling,
        embedding_size=args.embedding_size,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        max_train_classes=args.max_train_classes,
        batch_size=args.batch_size,
        m_per_class=args.m_per_class,
        epochs=args.epochs if args.epochs is not None else quick.get("epochs", 10),
        iterations_per_epoch=(
            args.iterations_per_epoch
            if args.iterations_per_epoch is not None
            else quick.get("iterations_per_epoch", 30)
        ),
        eval_every=args.eval_every,
        primary_metric=args.primary_metric,
        optimizer=args.optimizer,
        lr=args.lr,
        proxy_lr_mult=args.proxy_lr_mult,
        weight_decay=args.weight_decay,
        lr_decay_epochs=args.lr_decay_epochs,
        lr_decay_gamma=args.lr_decay_gamma,
        warmup_epochs=args.warmup_epochs,
        freeze_bn=args.freeze_bn,
        grad_clip=args.grad_clip,
        loss_params=_parse_loss_params(args.loss_param),
        recall_ks=args.recall_ks,
        ndcg_ks=args.ndcg_ks,
        eval_batch_size=args.eval_batch_size,
        device=device,
        workers=args.workers,
        threads=args.threads,
        log_freq=args.log_freq,
        progress=not args.no_progress,
        map_method=args.map_method,
        map_samples=quick.get("map_samples", 1000),
        command="pml-proxies-benchmark " + " ".join(shlex.quote(a) for a in argv),
    )
    return config


def list_losses(dataset: str) -> str:
    lines = []
    for name in LOSS_NAMES:
        status = "" if is_available(name) else "  [not available yet]"
        kw = ", ".join(f"{k}={v}" for k, v in effective_kwargs(name, dataset).items())
        lines.append(
            f"{name:20s} {kw or '(class defaults)'}{status}\n{'':20s} {LOSSES[name].source}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .runner import run_benchmark

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_losses:
        print(list_losses(args.dataset))
        return 0
    try:
        config = config_from_args(args, argv)
    except ValueError as e:
        parser.error(str(e))
    missing = [n for n in LOSS_NAMES if not is_available(n)]
    if args.losses == "all" and missing:
        print(
            f"note: not available in this installation, skipped: {', '.join(missing)}",
            file=sys.stderr,
        )
    out = run_benchmark(config)
    print()
    print((out["files"]["summary_md"]).read_text())
    print(f"{out['skipped']} finished run(s) reused. Report: {out['files']['report_md']}")
    return 0
