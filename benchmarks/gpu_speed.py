"""Speed of the losses on the GPU against PML's, with targets (issue 14); prints a table.

    python benchmarks/gpu_speed.py                          # CUDA if available, else the CPU
    python benchmarks/gpu_speed.py --device cpu --sizes tiny --out gpu_speed.json

Forward + backward (+ state update) medians (warm-up, interleaved rounds, CUDA events on the GPU)
at B = 180, D = 512: the MPA family at K = 10 against PML's ``SoftTripleLoss``, Proxy-ISA
(T = 55,000, memory full) and VCPA M = 10 against PML's ``ProxyAnchorLoss``, at C = 100 and
11,318; and a VCPA training step with a torchvision ResNet-50 trunk against a Proxy-Anchor step.
One row per ratio: PASS / FAIL against its target on CUDA; on the CPU the ratios are measured for
information and the rows SKIP (the targets are for the GPU), as does the ResNet-50 row. The exit
code is 1 if a target is missed. The correctness checks are pytest tests
(``python -m pytest -m cuda``); ``benchmarks/gpu_check.py`` runs both.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):  # _timing; the package from a checkout without installing
    if path not in sys.path:
        sys.path.insert(0, path)

from _timing import format_table, forward_backward, make_batch, synchronize  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
#: Speed targets (ratios of medians, issue 14).
TARGET_MPA_VS_SOFTTRIPLE = 1.0
TARGET_ISA_VS_PROXY_ANCHOR = 1.3
TARGET_VCPA_VS_PROXY_ANCHOR = 11.0
TARGET_VCPA_RESNET_STEP = 1.4


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode."""

    classes: tuple[int, ...]
    dim: int
    batch: int
    memory: int  # Proxy-ISA T
    repeats: int


SIZES = {
    "cuda": Sizes((100, 11318), 512, 180, 55000, 25),
    "cpu": Sizes((100,), 512, 180, 2000, 5),
    "tiny": Sizes((20,), 64, 48, 200, 2),
}


@dataclass
class Row:
    """One row of the table."""

    name: str
    status: str
    measured: str = ""
    target: str = ""
    reason: str = ""
    data: dict = field(default_factory=dict)


def median_ms(steps: dict[str, Callable[[], object]], device: torch.device, repeats: int):
    """Median milliseconds of each step, interleaved (one of each per round), after warm-up;
    CUDA events on the GPU, ``perf_counter`` on the CPU."""
    for step in steps.values():
        for _ in range(3):
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _status(device: torch.device, ratio: float, target: float) -> tuple[str, str]:
    if device.type != "cuda":
        return SKIP, "targets are for the GPU; CPU ratio measured for information"
    return (PASS if ratio <= target else FAIL), ""


def speed_losses(C: int, device: torch.device, sizes: Sizes) -> list[Row]:
    """The losses' steps at ``C`` classes as ratios to PML's, one row per target."""
    from pytorch_metric_learning.losses import ProxyAnchorLoss, SoftTripleLoss

    from pml_proxies.losses import (
        AllPairsMultiProxyAnchorLoss,
        DataWiseMultiProxyAnchorLoss,
        MultiProxyAnchorLoss,
        ProxyISALoss,
        VCPALoss,
    )

    D, B = sizes.dim, sizes.batch
    torch.manual_seed(0)
    losses = {
        "PML ProxyAnchorLoss": ProxyAnchorLoss(C, D),
        "PML SoftTripleLoss K=10": SoftTripleLoss(C, D, centers_per_class=10),
        "MPA K=10": MultiProxyAnchorLoss(C, D),
        "MPA-DW K=10": DataWiseMultiProxyAnchorLoss(C, D),
        "MPA-AP K=10": AllPairsMultiProxyAnchorLoss(C, D),
        "Proxy-ISA": ProxyISALoss(C, D, memory_size=sizes.memory),
        "VCPA M=10": VCPALoss(C, D, newton_steps=10, seed=0),
    }
    losses = {n: fn.to(device) for n, fn in losses.items()}
    x, labels = make_batch(B, D, C, device)
    isa = losses["Proxy-ISA"]
    isa.set_epoch(4)  # steady state: memory and filter on, memory full
    with torch.no_grad():
        for _ in range(-(-sizes.memory // B) + 1):
            isa(x, labels)
    steps = {n: forward_backward(fn, x, labels) for n, fn in losses.items()}
    ms = median_ms(steps, device, sizes.repeats)
    pa, st = ms["PML ProxyAnchorLoss"], ms["PML SoftTripleLoss K=10"]
    rows = [(n, st, "PML SoftTripleLoss K=10", TARGET_MPA_VS_SOFTTRIPLE) for n in
            ("MPA K=10", "MPA-DW K=10", "MPA-AP K=10")]  # fmt: skip
    rows += [("Proxy-ISA", pa, "PML ProxyAnchorLoss", TARGET_ISA_VS_PROXY_ANCHOR)]
    rows += [("VCPA M=10", pa, "PML ProxyAnchorLoss", TARGET_VCPA_VS_PROXY_ANCHOR)]
    out = []
    for name, base, base_name, target in rows:
        ratio = ms[name] / base
        status, reason = _status(device, ratio, target)
        out.append(
            Row(
                f"speed C={C}: {name} vs {base_name}",
                status,
                measured=f"{ratio:.2f}x ({ms[name]:.2f} / {base:.2f} ms)",
                target=f"<= {target}x",
                reason=reason,
                data={"ratio": ratio, "ms": ms[name], "baseline_ms": base, "all_ms": ms},
            )
        )
    return out


RESNET_ROW = "speed ResNet-50 step (224 px, batch 180, C=100): VCPA M=10 vs PML ProxyAnchorLoss"


def speed_resnet(device: torch.device, sizes: Sizes) -> list[Row]:
    """A VCPA training step with a ResNet-50 trunk (random init, AdamW) against Proxy-Anchor's."""
    target = f"<= {TARGET_VCPA_RESNET_STEP}x"
    if device.type != "cuda":
        return [Row(RESNET_ROW, SKIP, target=target, reason="a ResNet-50 step at batch 180 "
                    "needs the GPU")]  # fmt: skip
    try:
        import torchvision
    except ImportError:
        return [Row(RESNET_ROW, SKIP, target=target, reason="torchvision is not installed")]
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    from pml_proxies.losses import VCPALoss

    torch.backends.cudnn.benchmark = True
    B, C, D = 180, 100, 512
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 224, 224, generator=gen).to(device)
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    steps: dict[str, Callable[[], object]] = {}
    for loss_name, loss_fn in (
        ("PML ProxyAnchorLoss", ProxyAnchorLoss(C, D)),
        ("VCPA M=10", VCPALoss(C, D, newton_steps=10, seed=0)),
    ):
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None)
        model.fc = torch.nn.Linear(model.fc.in_features, D)
        model, loss_fn = model.to(device), loss_fn.to(device)
        params = [*model.parameters(), *loss_fn.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, loss_fn=loss_fn, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
            optimizer.step()

        steps[loss_name] = step
    ms = median_ms(steps, device, max(5, sizes.repeats // 3))
    base = ms["PML ProxyAnchorLoss"]
    ratio = ms["VCPA M=10"] / base
    status, reason = _status(device, ratio, TARGET_VCPA_RESNET_STEP)
    return [
        Row(
            RESNET_ROW,
            status,
            measured=f"{ratio:.2f}x ({ms['VCPA M=10']:.1f} / {base:.1f} ms)",
            target=target,
            reason=reason,
            data={"ratio": ratio, "all_ms": ms},
        )
    ]


def guarded(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """``fn()``'s rows; an exception becomes a FAIL row of ``name`` (the others still run)."""
    try:
        return fn()
    except Exception as e:
        tb = traceback.format_exc(limit=-6)
        return [Row(name, FAIL, reason=f"{type(e).__name__}: {e}", data={"traceback": tb})]


def environment(device: torch.device) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


COLUMNS = ["check", "status", "measured", "target", "reason"]


def table(rows: list[Row]) -> str:
    cells = [
        {"check": r.name, "status": r.status, "measured": r.measured, "target": r.target,
         "reason": r.reason.replace("|", "/")}
        for r in rows
    ]  # fmt: skip
    return format_table(cells, COLUMNS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N, cpu")
    p.add_argument("--out", default="gpu_speed.json", help="JSON report")
    p.add_argument(
        "--sizes", default=None, choices=sorted(SIZES), help="problem sizes (default: the device's)"
    )
    return p


def resolve_device(spec: str) -> torch.device | None:
    """``auto``: CUDA if available, else the CPU; ``None`` for CUDA that is not available."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return None
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if device is None:
        return 2
    sizes = SIZES[args.sizes or ("cuda" if device.type == "cuda" else "cpu")]
    if device.type == "cpu":
        print("CPU mode: the targets are for the GPU (rows SKIP, ratios for information); the "
              "ResNet-50 step SKIPs", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    rows: list[Row] = []
    for C in sizes.classes:
        rows += guarded(f"speed C={C}", functools.partial(speed_losses, C, device, sizes))
        print(f"  C={C} done", flush=True)
    rows += guarded(RESNET_ROW, lambda: speed_resnet(device, sizes))
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, FAIL, SKIP)}
    elapsed = time.perf_counter() - t0
    report = {
        "environment": environment(device),
        "sizes": asdict(sizes),
        "rows": [asdict(r) for r in rows],
        "summary": {**counts, "elapsed_s": elapsed},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(table(rows))
    print(f"\n{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP in {elapsed:.0f} s "
          f"on {device}\nJSON: {out}")  # fmt: skip
    return 1 if counts[FAIL] else 0


if __name__ == "__main__":
    sys.exit(main())
