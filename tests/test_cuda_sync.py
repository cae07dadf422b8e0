"""No host sync in a training step of any loss (issue 14).

On CUDA: two training steps (memory and filter on for Proxy-ISA, ``check_inputs=False``, the
losses' default reducer ``SyncFreeDivisorReducer``) under
``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronizing call. On the CPU:
a Python-level preview of the same step (host reads such as ``item``, ``bool``, ``tolist``,
``cpu``, ``nonzero``, boolean-mask indexing, with their call sites) must find none at all.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from cuda_helpers import (
    DEVICES,
    SYNC_CASES,
    host_read_log,
    sizes_for,
    sync_cases,
    sync_site,
    synchronize,
    training_step,
    warm_loss,
)


@pytest.mark.parametrize("case", SYNC_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_training_step_has_no_host_sync(device, case, record_property):
    device = torch.device(device)
    sizes = sizes_for(device)
    loss_fn, x, labels = warm_loss(sync_cases(sizes)[case], device, sizes)
    sites: list[str] = []
    with host_read_log(sites):
        training_step(loss_fn, x, labels)
    sites = sorted(set(sites))
    record_property("python_level_sites", sites)
    if device.type != "cuda":
        assert sites == [], "host reads (each a sync on CUDA): " + "; ".join(sites)
        return
    torch.cuda.set_sync_debug_mode("error")
    error, where = None, ""
    try:
        for _ in range(2):
            training_step(loss_fn, x, labels)
    except RuntimeError as e:
        error, where = e, sync_site(traceback.format_exc())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    assert error is None, (
        f"synchronizing op at {where}: {str(error).splitlines()[0][:200]}; "
        f"Python-level sites: {sites}"
    )


def test_host_read_preview_finds_host_reads_and_their_site():
    from pml_proxies.losses import ProxyISALoss

    item = torch.Tensor.item
    loss_fn = ProxyISALoss(4, 8, memory_size=20, memory_start_epoch=1)
    loss_fn.sync_free_memory_updates = False  # the CPU's host-size update reads sizes
    x, labels = torch.randn(6, 8), torch.arange(6) % 4
    sites: list[str] = []
    with host_read_log(sites):
        torch.ones(()).item()
        loss_fn(x, labels)
    assert any("test_cuda_sync.py" in s and s.startswith("item") for s in sites)
    assert any("pml_proxies/utils/class_memory_bank.py" in s for s in sites)
    assert torch.Tensor.item is item  # restored


def test_sync_site_names_the_innermost_frame_outside_torch():
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/x/tests/test_cuda_sync.py", line 3, in test\n'
        '  File "/site/pml_proxies/losses/vcpa_loss.py", line 120, in forward\n'
        '  File "/site/torch/_tensor.py", line 40, in item\n'
    )
    assert sync_site(tb) == "pml_proxies/losses/vcpa_loss.py:120"


def test_preview_flags_pmls_divisor_reducer():
    """The finding that made ``SyncFreeDivisorReducer`` the losses' default: PML's
    ``DivisorReducer`` reads the device (``if divisor != 0``) in every training step."""
    from pytorch_metric_learning.reducers import DivisorReducer

    from pml_proxies.losses import MultiProxyAnchorLoss

    sizes = sizes_for("cpu")
    loss_fn, x, labels = warm_loss(
        lambda: MultiProxyAnchorLoss(
            sizes.classes, sizes.dim, check_inputs=False, reducer=DivisorReducer()
        ),
        torch.device("cpu"),
        sizes,
    )
    sites: list[str] = []
    with host_read_log(sites):
        training_step(loss_fn, x, labels)
    assert any("pytorch_metric_learning/reducers/divisor_reducer.py" in s for s in sites), sites
