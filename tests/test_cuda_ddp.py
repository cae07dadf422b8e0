"""The recipe under DDP on the device (issue 14): ``examples/cub200_recipe.py --quick --dataset
digits`` for a few iterations on 2 processes (``torchrun``; NCCL on 2 GPUs) against 1 process,
for Proxy-ISA and VCPA: ``"world_size"`` recorded and every metric within
:data:`~cuda_helpers.DDP_METRIC_TOL`. The CUDA parameters need 2 CUDA devices (skipped with
fewer); the ``cpu`` parameter (slow) runs the same comparison with gloo."""

from __future__ import annotations

import pytest
import torch
from cuda_helpers import CUDA_MARKS, DDP_METRIC_TOL, run_recipe

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TWO_GPUS = (
    *CUDA_MARKS,
    pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA devices, found {GPUS}"),
)
#: seconds per recipe launch (a hung rank must not hang the run)
TIMEOUT_S = 300


@pytest.mark.parametrize(
    "device, loss",
    [
        pytest.param("cpu", "proxy_isa", marks=pytest.mark.slow, id="cpu-gloo-proxy_isa"),
        pytest.param("cuda", "proxy_isa", marks=TWO_GPUS, id="cuda-nccl-proxy_isa"),
        pytest.param("cuda", "vcpa", marks=TWO_GPUS, id="cuda-nccl-vcpa"),
    ],
)
def test_recipe_on_two_processes_matches_one(device, loss, tmp_path, record_property):
    histories = []
    for nproc in (1, 2):
        results = run_recipe(tmp_path / str(nproc), loss, device, nproc, TIMEOUT_S)
        record_property(f"command_{nproc}", results["command"])
        assert results["world_size"] == nproc
        histories.append(results["history"])
    assert len(histories[0]) == len(histories[1]) > 0
    diff = max(
        abs(a[k] - b[k]) for a, b in zip(*histories) for k in a if k not in ("epoch", "train_loss")
    )
    record_property("max_metric_difference", diff)
    assert diff <= DDP_METRIC_TOL
