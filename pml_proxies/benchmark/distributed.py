"""The benchmark under ``torchrun``: each (loss, seed) run trained with DistributedDataParallel.

``pml-proxies-benchmark --nproc-per-node N ...`` re-executes the same command line through
``python -m torch.distributed.run --standalone --nproc-per-node N -m pml_proxies.benchmark``
(:func:`launch`); running the command under ``torchrun`` directly does the same. Every process
builds the same config and run specs; then

* **rank 0 leads**: it takes the folder's lock, checks and records the protocol, loads the data,
  decides which runs to train (finished runs are reused, whatever world size trained them) and
  sends that list to the other ranks (:func:`leading`), trains them with them, and alone writes
  the output folder (runs, logs, report, plots, ``protocol.json``, ``config.json``);
* **the other ranks follow** (:func:`~pml_proxies.benchmark.runner.follow`): they load the data once rank 0 has (no download
  race), train the same runs in the same order into temporary folders, and write nothing;
* **one run** (:func:`attach`, hooked into :func:`~pml_proxies.benchmark.train.build_run`): the
  sampler is :class:`~pml_proxies.distributed.DistributedMPerClassSampler` (the global batch is
  the one-process batch, ``m`` images per class, whole classes per rank), the network is in DDP
  (built again when the warm-up changes which parameters train), the loss goes through
  :class:`~pml_proxies.distributed.DistributedProxyLoss` (the proxies' gradients exchanged by
  ``sync_gradients`` before gradient clipping and the optimizer step), a miner through PML's
  ``DistributedMinerWrapper`` (it mines the gathered batch), trainable BatchNorm becomes
  ``SyncBatchNorm`` on CUDA;
* **evaluation** (:func:`~pml_proxies.benchmark.train.evaluate_sharded`): each rank embeds a contiguous share of the set, the
  shares are gathered in order, rank 0 computes the metrics and sends them to the others (every
  rank selects the same epoch).

The world size is not part of the protocol (a run with ``N`` processes computes the one-process
run up to float rounding: same draw, same global batch): it is recorded in each run's
``result.json`` (``"world_size"``; absent, i.e. 1, in older folders) and in the report, and
a folder may hold runs trained with different world sizes. Exceptions: random augmentations are
drawn per rank (each rank transforms its own share of the batch with its own random state), and
trainable BatchNorm on CPU normalises each rank's share; only runs without augmentation and with
frozen or synchronised BatchNorm repeat the one-process run to rounding. A run that raises stops
the whole job (no per-run isolation as with ``--jobs``: the other ranks could not tell); the
same command resumes from the finished runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from .. import distributed as D
from .config import BenchmarkConfig, ConfigError

if TYPE_CHECKING:
    from .spec import RunSpec


class RunParts(Protocol):
    """What the DDP hooks use of a run (built by :func:`~pml_proxies.benchmark.train.build_run`):
    ``model`` and ``miner`` are replaced here (SyncBatchNorm, the distributed miner), so they are
    typed ``Any`` (a protocol's writable attribute must match the run's type exactly)."""

    model: Any
    loss: torch.nn.Module
    miner: Any
    device: torch.device
    ddp: DistributedRun | None


R = TypeVar("R", bound=RunParts)

#: exit code of :func:`launch` when ``torch.distributed.run`` cannot be started
LAUNCH_FAILED = 1


def world_size() -> int:
    """Processes of this job (1 without an initialised process group)."""
    return D.world()[1]


def is_main() -> bool:
    """Rank 0 (the only process that writes), or no process group."""
    return D.world()[0] == 0


def under_torchrun() -> bool:
    """Started by ``torchrun`` with several processes (``WORLD_SIZE`` > 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


# ------------------------------------------------------------------ the command line
def check_nproc(config: BenchmarkConfig, nproc: int | None) -> None:
    """Refuse ``--nproc-per-node`` values that cannot work, before anything starts.

    Raises:
        ConfigError: ``nproc`` < 1; under ``torchrun``, an ``nproc`` other than torchrun's
            processes per node; else on CUDA, more processes than GPUs; :func:`check_world`.
    """
    if nproc is None:
        return
    if nproc < 1:
        raise ConfigError("nproc_per_node", f"must be at least 1, got {nproc}")
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if under_torchrun() and local is not None and int(local) != nproc:
        raise ConfigError(
            "nproc_per_node",
            f"{nproc}, but torchrun started {local} processes per node: leave --nproc-per-node "
            "out under torchrun",
        )
    if not under_torchrun() and str(config.device).startswith("cuda"):
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise ConfigError(
                "nproc_per_node",
                f"{nproc} processes but {gpus} CUDA device(s): one GPU per process (NCCL), or "
                "--device cpu (gloo)",
            )
    check_world(config, nproc)


def check_world(config: BenchmarkConfig, nproc: int) -> None:
    """Refuse, with several processes per run, ``--jobs`` > 1 (each run already uses every
    process) and a ``--batch-size`` that the processes cannot share in whole classes
    (:class:`ConfigError`)."""
    if nproc > 1 and config.jobs is not None and config.jobs > 1:
        raise ConfigError(
            "jobs",
            f"{config.jobs} with {nproc} processes per run: --jobs trains several one-process "
            "runs at once (CPU), --nproc-per-node / torchrun trains each run on several "
            "processes (GPUs); choose one",
        )
    if config.batch_size % (nproc * config.m_per_class):
        raise ConfigError(
            "batch_size",
            f"{config.batch_size} is not a multiple of the processes per run x --m-per-class "
            f"({nproc} x {config.m_per_class}): every process gets whole classes of the global "
            "batch",
        )


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``pml-proxies-benchmark argv`` under ``python -m torch.distributed.run --standalone
    --nproc-per-node nproc`` (a free port, one node) and wait; its exit code (non-zero when a
    process failed: torchrun names it). ``argv`` keeps ``--nproc-per-node``: the processes
    check it against torchrun's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "pml_proxies.benchmark", *argv]  # fmt: skip
    try:
        process = subprocess.Popen(command)
    except OSError as e:
        print(f"error: could not start torch.distributed.run: {e}", file=sys.stderr)
        return LAUNCH_FAILED
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # the processes got the Ctrl-C too: torchrun stops them
            continue


# ------------------------------------------------------------------ the benchmark
def setup(config: BenchmarkConfig) -> BenchmarkConfig:
    """Start the process group under ``torchrun`` (gloo on CPU, NCCL on CUDA) and return the
    config of this process: its own GPU (``cuda:LOCAL_RANK``), one run at a time, progress bars
    on rank 0 only. ``config`` itself without ``torchrun``.

    Raises:
        ConfigError: ``jobs`` > 1 or a batch size the processes cannot share
            (:func:`check_world`).
    """
    if not under_torchrun():
        return config
    check_world(config, int(os.environ["WORLD_SIZE"]))
    rank, size, device = D.init_from_env(config.device)
    return replace(config, device=str(device), jobs=1, progress=config.progress and rank == 0)


@contextlib.contextmanager
def leading() -> Iterator:
    """Rank 0's side of :func:`follow`: yields ``send(runs)``, which tells the other ranks the
    ``(loss, seed)`` runs to train, in order; if the block ends before ``send`` (an error, a
    refused folder), they are told to stop. A no-op with one process."""
    sent = False

    def send(runs: Sequence[tuple[str, int]]) -> None:
        nonlocal sent
        if world_size() > 1 and not sent:
            torch.distributed.broadcast_object_list([list(runs)], src=0)
        sent = True

    try:
        yield send
    finally:
        if world_size() > 1 and not sent:
            torch.distributed.broadcast_object_list([None], src=0)


# ------------------------------------------------------------------ one run
class DistributedRun:
    """The DDP pieces of one run (:func:`attach`): the loss wrapper and the DDP network."""

    def __init__(self, run: RunParts) -> None:
        self.world_size = world_size()
        self.loss = D.DistributedProxyLoss(run.loss)
        self._network: torch.nn.Module | None = None
        self._trainable: tuple[bool, ...] = ()

    def network(self, run: RunParts) -> torch.nn.Module:
        """The network to train through this epoch: DDP around ``run.model``, built again when
        the set of parameters that train changed (the warm-up's frozen trunk)."""
        trainable = tuple(p.requires_grad for p in run.model.parameters())
        if self._network is None or trainable != self._trainable:
            self._network = D.wrap_model(run.model, run.device)
            self._trainable = trainable
        return self._network

    def sync_gradients(self) -> None:
        """After ``backward``: the proxies' global-batch gradient on every rank."""
        self.loss.sync_gradients()


def attach(run: R, spec: RunSpec) -> R:
    """With several processes, give ``run`` its :class:`DistributedRun` (``run.ddp``), wrap its
    miner in PML's ``DistributedMinerWrapper`` and, on CUDA with trainable BatchNorm, make the
    BatchNorm layers ``SyncBatchNorm`` (the same parameter objects: the optimizer is unchanged).
    ``run`` unchanged with one process. (The sampler is
    :class:`~pml_proxies.distributed.DistributedMPerClassSampler` in every case.)"""
    if world_size() == 1:
        return run
    from pytorch_metric_learning.utils.distributed import DistributedMinerWrapper

    if run.device.type == "cuda" and not spec.trunk.freeze_bn:
        run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    if run.miner is not None:
        run.miner = DistributedMinerWrapper(run.miner, efficient=False)
    run.ddp = DistributedRun(run)
    return run


__all__ = [
    "DistributedRun",
    "attach",
    "check_nproc",
    "check_world",
    "is_main",
    "launch",
    "leading",
    "setup",
    "under_torchrun",
    "world_size",
]
