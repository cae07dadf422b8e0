"""What the CUDA checks share (``tests/test_cuda_*.py``, issues 14 and 19).

Each check is an ordinary test parametrized over :data:`DEVICES`: ``"cuda"`` is marked ``cuda``
(run with ``python -m pytest -m cuda`` on a GPU machine, skipped with a reason without CUDA) and
uses the GPU sizes; ``"cpu"`` runs the same test function in the default suite at reduced sizes
(float32 on the CPU against float64 on the CPU; the Python-level preview of host syncs), so that
the code of the checks cannot rot on machines without a GPU.

Errors are relative to the reference's scale: ``max |x - ref| / max |ref|`` per tensor (integer
and boolean buffers must match exactly).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- devices
CUDA_SKIP_REASON = "needs CUDA (run with `python -m pytest -m cuda` on a GPU machine)"
#: the marks of a CUDA parameter: selected by ``-m cuda``, skipped without CUDA
CUDA_MARKS = (
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON),
)
#: ``@pytest.mark.parametrize("device", DEVICES)``: the CPU smoke run and the CUDA check
DEVICES = (pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- tolerances
#: float32 against float64: float32 rounds at 6e-8 relative; the alpha = 32 exponents, the
#: log-sum-exps over up to C * K terms and a few optimizer steps amplify that to ~1e-5.
TOL_FLOAT32 = 1e-4
#: VCPA's Newton steps at the paper's temperature 0.01: the ``L_PA / tau`` term dominates the KL
#: damping, the diagonal steps oscillate (docs/vcpa.md, "Why the paper's steps do not lower the
#: objective") and amplify float32 rounding step after step when few samples dominate a class's
#: weights (measured on the CPU against
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
#: metrics of the recipe on 2 processes against 1: float32 sums in another order (gathered batch,
#: DDP average) and cuDNN's nondeterministic kernels shift embeddings by ~1e-6; a retrieval metric
#: moves only when a near-tie flips (one query of the 896 digits: 1.1e-3)
DDP_METRIC_TOL = 2e-3


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Problem sizes of the checks on one device type."""

    classes: int  # equality / sync
    dim: int
    batch: int
    steps: tuple[int, ...]  # epoch of each step of the equality sequence
    eval_rows: int
    eval_classes: int
    eval_subset: int
    bench_dataset: str  # the benchmark CLI (main job)
    bench_epochs: int
    bench_iterations: int
    bench_timeout_s: float  # per benchmark run


# one epoch per step: steps 1-2 plain, 3-5 with the memory, 6-8 with memory and filter (the
# memory, T = 2.5 B, wraps around at step 5); the CPU sizes cross the same switches faster
SEQUENCE = (1, 2, 3, 3, 3, 4, 4, 4)
TINY_SEQUENCE = (1, 3, 3, 4)
#: CUDA: Stanford Online Products' test size for the evaluation, bundled Omniglot for the main
#: job; CPU: sizes that keep the default suite fast (what ``gpu_check.py --sizes tiny`` ran)
SIZES = {
    "cuda": Sizes(100, 512, 180, SEQUENCE, 60502, 11316, 10000, "omniglot", 2, 10, 300.0),
    "cpu": Sizes(8, 64, 32, TINY_SEQUENCE, 600, 100, 300, "digits", 2, 4, 450.0),
}


def sizes_for(device: torch.device | str) -> Sizes:
    return SIZES[torch.device(device).type]


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
    generators of two devices are different objects (:func:`noise_tape` replays the device's
    noise instead).
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


# ------------------------------------------------------------------------ equality
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
    """One loss of the equality check: its factory, the epochs of its steps and its tolerance."""

    make: Callable[[], torch.nn.Module]
    steps: tuple[int, ...]
    tolerance: float = TOL_FLOAT32


#: names of the equality cases (the test ids; :func:`equality_cases` builds them per size)
EQUALITY_CASES = (
    *(f"{name} K={k}" for name in ("MPA", "MPA-DW", "MPA-AP") for k in (1, 10)),
    "Proxy-ISA",
    "VCPA M=10 temperature=1",
    "VCPA M=10 temperature=0.01, 1 step",
    "VCPA M=0",
    "IntraClassCenterRegularizer K=10",
)
#: float32, and bf16 / fp16 autocast
MODES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    assert tuple(cases) == EQUALITY_CASES
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


@dataclass
class EqualityResult:
    """Errors of one case in one mode against the float64 CPU reference, and their bounds."""

    loss_error: float
    embedding_grad_error: float
    parameter_grad_error: float
    state_errors: dict[str, float]
    tolerance: float  # loss and state (the case's)
    embedding_grad_tolerance: float

    @property
    def worst_state(self) -> tuple[str, float]:
        if not self.state_errors:
            return "-", 0.0
        name = max(self.state_errors, key=self.state_errors.__getitem__)
        return name, self.state_errors[name]

    def failures(self) -> list[str]:
        """One line per error above its bound (empty: the check passes)."""
        state_name, state_error = self.worst_state
        rows = (
            ("loss", self.loss_error, self.tolerance),
            ("grad x", self.embedding_grad_error, self.embedding_grad_tolerance),
            ("grad params", self.parameter_grad_error, TOL_FLOAT32),
            (f"state ({state_name})", state_error, self.tolerance),
        )
        return [f"{what} {err:.1e} > {tol:.1e}" for what, err, tol in rows if not err <= tol]

    def measured(self) -> str:
        state_name, state_error = self.worst_state
        return (
            f"loss {self.loss_error:.1e}, grad x {self.embedding_grad_error:.1e}, grad params "
            f"{self.parameter_grad_error:.1e}, state {state_error:.1e} ({state_name})"
        )


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, ValueError):
        return False
    return True


def equality(case: Case, mode: str, device: torch.device, sizes: Sizes) -> EqualityResult:
    """Train ``case`` on ``device`` in ``mode`` (``float32``, ``bf16`` / ``fp16`` autocast) and
    on the CPU in float64 through the same steps; the errors of the losses, the gradients and
    every state entry."""
    input_dtype = MODES[mode]
    autocast_dtype = None if mode == "float32" else input_dtype
    torch.manual_seed(0)
    initial = case.make()
    if hasattr(initial, "sync_free_memory_updates"):
        # the fixed-shape (sync-free) memory update on the device, even on the CPU; the
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
    emb_tol = TOL_FLOAT32 if mode == "float32" else TOL_EMBEDDING_GRAD[input_dtype]
    # a looser case tolerance (VCPA at the paper's temperature) also bounds the loss and the
    # embeddings' gradient, which inherit the error of the Newton means
    return EqualityResult(
        value_err, emb_err, param_err, state_errors, case.tolerance, max(emb_tol, case.tolerance)
    )


# ------------------------------------------------------------------------ host syncs
#: Python-level host reads the CPU preview watches (each is a device-to-host sync on CUDA)
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
_SYNCING_OPS = ("nonzero", "unique", "masked_select")
#: names of the host-sync cases (the test ids; :func:`sync_cases` builds them per size)
SYNC_CASES = (
    "MPA K=10",
    "MPA-DW K=10",
    "MPA-AP K=10",
    "Proxy-ISA (memory + filter on)",
    "VCPA M=10",
    "VCPA M=0",
)


def sync_cases(sizes: Sizes) -> dict[str, Callable[[], torch.nn.Module]]:
    """Factories of the losses of the host-sync check, with their default reducer
    (``pml_proxies.reducers.SyncFreeDivisorReducer``) and ``check_inputs=False``."""
    from pml_proxies.losses import (
        AllPairsMultiProxyAnchorLoss,
        DataWiseMultiProxyAnchorLoss,
        MultiProxyAnchorLoss,
        ProxyISALoss,
        VCPALoss,
    )

    C, D, T = sizes.classes, sizes.dim, (5 * sizes.batch) // 2
    off = {"check_inputs": False}
    cases: dict[str, Callable[[], torch.nn.Module]] = {
        "MPA K=10": lambda: MultiProxyAnchorLoss(C, D, **off),
        "MPA-DW K=10": lambda: DataWiseMultiProxyAnchorLoss(C, D, **off),
        "MPA-AP K=10": lambda: AllPairsMultiProxyAnchorLoss(C, D, **off),
        "Proxy-ISA (memory + filter on)": lambda: ProxyISALoss(C, D, memory_size=T, **off),
        "VCPA M=10": lambda: VCPALoss(C, D, newton_steps=10, seed=0, **off),
        "VCPA M=0": lambda: VCPALoss(C, D, newton_steps=0, seed=0, **off),
    }
    assert tuple(cases) == SYNC_CASES
    return cases


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


def warm_loss(make: Callable[[], torch.nn.Module], device: torch.device, sizes: Sizes):
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


def training_step(loss_fn: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    x.grad = None
    loss_fn.zero_grad(set_to_none=True)
    loss_fn(x, labels).backward()


def sync_site(tb: str) -> str:
    """The innermost traceback frame outside torch (where the syncing call was made)."""
    frames = [line.strip() for line in tb.splitlines() if line.strip().startswith('File "')]
    for line in reversed(frames):
        if "/torch/" not in line:
            return _short_path(line.split('"')[1]) + ":" + line.split("line ")[-1].split(",")[0]
    return frames[-1] if frames else "?"


# ------------------------------------------------------------------------ evaluation
def sop_like(rows: int, classes: int, dim: int, seed: int = 0):
    """Clustered unit embeddings with labels of ~rows/classes samples per class (SOP: 60,502
    test images of 11,316 classes), so that the metrics are neither 0 nor 1."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % classes
    labels = labels[torch.randperm(rows, generator=gen)]
    centers = torch.randn(classes, dim, generator=gen)
    x = centers[labels] + 1.5 * torch.randn(rows, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1), labels


def calculator(device: torch.device, knn_func):
    """``pml_proxies.AccuracyCalculator`` with the benchmark's metrics (from its registry)."""
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


KNN_BACKENDS = ("TorchKNN", "faiss")


def knn_factory(backend: str, device: torch.device) -> Callable[[], object]:
    """``TorchKNN``, or PML's ``FaissKNN`` when faiss can do the device's search (faiss-gpu on
    CUDA, any faiss on the CPU); skips the test with the reason otherwise."""
    from pml_proxies.utils.knn import TorchKNN, faiss_available, faiss_gpu_available

    if backend == "TorchKNN":
        return TorchKNN
    if device.type == "cuda" and not faiss_gpu_available():
        pytest.skip("faiss-gpu is not installed (or sees no GPU)")
    if not faiss_available():
        pytest.skip("faiss is not installed")
    from pytorch_metric_learning.utils.inference import FaissKNN

    return FaissKNN


# ------------------------------------------------------------------------ main job and DDP
def subprocess_env() -> dict[str, str]:
    """The environment of a child process: this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def omniglot_root(workdir: Path) -> str | None:
    """``None`` when ``get_dataset("omniglot", ...)`` finds data without a root (the bundled
    zips, or ``$PML_PROXIES_DATA``); else a folder linking the zips bundled in the package."""
    from pml_proxies.datasets import get_dataset

    try:
        get_dataset("omniglot", "test")
        return None
    except Exception:  # missing data: FileNotFoundError; anything else: try the fallback
        pass
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


def finished_runs(out: Path) -> dict[str, dict]:
    """Test metrics of the runs a benchmark finished (``runs/<loss>/seed_0/result.json``)."""
    finished = {}
    for path in sorted(out.glob("runs/*/seed_0/result.json")):
        try:
            finished[path.parent.parent.name] = json.loads(path.read_text()).get("test")
        except (OSError, ValueError):
            continue
    return finished


def expected_losses() -> list[str]:
    from pml_proxies.benchmark.losses import LOSS_NAMES

    return list(LOSS_NAMES)


def finite_summary(summary: list[dict]) -> bool:
    """True when ``summary`` has rows and every ``*_mean`` is a finite number."""
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


def run_recipe(out: Path, loss: str, device_type: str, nproc: int, timeout: float) -> dict:
    """``examples/cub200_recipe.py --quick --dataset digits`` with ``loss`` on ``nproc``
    processes of ``device_type`` (2: ``torchrun --standalone``, NCCL on CUDA, gloo on the CPU);
    its ``results.json``, with the command under ``"command"``."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    recipe = REPO / "examples" / "cub200_recipe.py"
    cmd = [*launcher, str(recipe), "--quick", "--dataset", "digits", "--loss", loss,
           "--device", device_type, "--output-dir", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout
    )
    command = " ".join(cmd)
    assert proc.returncode == 0, f"{command}: rc {proc.returncode}; {proc.stderr[-2000:]}"
    return {**json.loads((out / "results.json").read_text()), "command": command}
