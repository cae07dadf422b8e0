"""``pml_proxies.AccuracyCalculator`` on the device (issue 14): at Stanford Online Products' test
size (60,502 x 512, 11,316 classes, ``k="max_bin_count"``, the benchmark's metrics) with
``TorchKNN`` and, when installed, PML's ``FaissKNN``: it completes with finite metrics (time and
peak GPU memory are recorded as properties, not asserted), and every metric on a 10,000-row
subset equals ``TorchKNN`` on the CPU. The ``cpu`` parameter runs it at 600 rows."""

from __future__ import annotations

import math
import time

import pytest
import torch
from cuda_helpers import (
    DEVICES,
    KNN_BACKENDS,
    TOL_METRIC,
    calculator,
    knn_factory,
    sizes_for,
    sop_like,
    synchronize,
)

from pml_proxies.utils.knn import TorchKNN


def _data(device: torch.device):
    sizes = sizes_for(device)
    return sizes, sop_like(sizes.eval_rows, sizes.eval_classes, 512)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_calculator_at_full_size_gives_finite_metrics(device, backend, record_property):
    device = torch.device(device)
    factory = knn_factory(backend, device)
    _, (x, labels) = _data(device)
    x, labels = x.to(device), labels.to(device)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    acc = calculator(device, factory()).get_accuracy(x, labels)
    synchronize(device)
    record_property("seconds", round(time.perf_counter() - t0, 3))
    if device.type == "cuda":
        record_property("peak_mib", round((torch.cuda.max_memory_allocated(device) - base) / 2**20))
    assert acc and all(math.isfinite(v) for v in acc.values()), acc


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_calculator_on_device_equals_torch_knn_on_cpu(device, backend, record_property):
    device = torch.device(device)
    factory = knn_factory(backend, device)
    sizes, (x, labels) = _data(device)
    x, labels = x[: sizes.eval_subset], labels[: sizes.eval_subset]
    cpu = torch.device("cpu")
    reference = calculator(cpu, TorchKNN()).get_accuracy(x, labels)
    got = calculator(device, factory()).get_accuracy(x.to(device), labels.to(device))
    assert set(got) == set(reference)
    errors = {k: abs(got[k] - reference[k]) for k in reference}
    worst = max(errors, key=errors.__getitem__)
    record_property("measured", f"max |diff| {errors[worst]:.1e} ({worst}), {len(errors)} metrics")
    assert errors[worst] <= TOL_METRIC, errors
