"""SyncFreeDivisorReducer: the values (and gradients) of PML's DivisorReducer, without syncs."""

import pytest
import torch
from pytorch_metric_learning.reducers import DivisorReducer

from pml_proxies.losses import MultiProxyAnchorLoss, ProxyISALoss, VCPALoss
from pml_proxies.reducers import SyncFreeDivisorReducer


def _loss_dict(losses, divisor):
    idx = torch.arange(losses.shape[0])
    return {
        "loss": {"losses": losses, "indices": idx, "reduction_type": "element", "divisor": divisor}
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divisor", [3, 2.5, 0, "tensor3", "tensor0"])
def test_same_value_and_gradient_as_pml(dtype, divisor):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 4, generator=gen, dtype=dtype, requires_grad=True)
    if isinstance(divisor, str):
        divisor = torch.tensor(int(divisor[-1]))
    outs = []
    for reducer in (DivisorReducer(), SyncFreeDivisorReducer()):
        losses = (emb**2).sum(dim=1)
        out = reducer(_loss_dict(losses, divisor), emb, torch.zeros(5, dtype=torch.long))
        (grad,) = torch.autograd.grad(out, emb)
        outs.append((out.detach(), grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)
    assert outs[1][0].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_divisor_with_constant_losses_keeps_the_graph(dtype):
    # losses that do not depend on the embeddings: the zero must still reach them (as PML's
    # zero_loss), so that backward works and gives zero gradients
    emb = torch.randn(5, 4, dtype=dtype, requires_grad=True)
    for reducer in (DivisorReducer(), SyncFreeDivisorReducer()):
        losses = torch.ones(5, dtype=dtype)
        out = reducer(_loss_dict(losses, torch.tensor(0)), emb, torch.zeros(5, dtype=torch.long))
        assert out.requires_grad and float(out) == 0.0
        (grad,) = torch.autograd.grad(out, emb)
        assert torch.equal(grad, torch.zeros_like(emb))


def test_every_loss_uses_it_by_default_with_pml_values():
    torch.manual_seed(0)
    emb = torch.randn(12, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3])
    builders = [
        lambda **kw: MultiProxyAnchorLoss(4, 8, centers_per_class=2, **kw),
        lambda **kw: ProxyISALoss(4, 8, **kw),
        lambda **kw: VCPALoss(4, 8, newton_steps=0, stochastic=False, **kw),
    ]
    for build in builders:
        ours = build()
        reducers = ours.reducer.reducers.values()  # PML wraps one reducer per sub-loss
        assert all(isinstance(r, SyncFreeDivisorReducer) for r in reducers)
        torch.manual_seed(1)
        pml = build(reducer=DivisorReducer())
        pml.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(emb, labels), pml(emb, labels), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    emb = torch.randn(6, 3, device="cuda")
    losses = emb.sum(dim=1)
    divisor = (losses > 0).sum()
    torch.cuda.set_sync_debug_mode("error")
    try:
        SyncFreeDivisorReducer()(_loss_dict(losses, divisor), emb, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
