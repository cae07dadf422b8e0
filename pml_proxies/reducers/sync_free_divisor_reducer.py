"""PML's ``DivisorReducer`` without host syncs."""

from __future__ import annotations

import torch
from pytorch_metric_learning.reducers import DivisorReducer


class SyncFreeDivisorReducer(DivisorReducer):
    """``sum(losses) / divisor`` as PML's ``DivisorReducer``, with no device-to-host sync.

    PML's reducer branches in Python on ``divisor != 0`` and on ``torch.isnan(output)`` (a float16
    retry); with a tensor divisor on CUDA each branch is a host sync per sub-loss. This one selects
    with ``torch.where`` instead: the value is the same (``sum / divisor``, or a zero with a zero gradient
    when the divisor is 0, connected to the graph as PML's), and the float16 retry is not needed because every loss of this
    package reduces float32 (or float64) terms. It is the default reducer of every loss here; pass
    PML's ``DivisorReducer()`` as ``reducer=`` to get PML's exact code path.
    """

    def sum_and_divide(
        self, losses: torch.Tensor, embeddings: torch.Tensor, divisor
    ) -> torch.Tensor:
        total = torch.sum(losses)
        if not torch.is_tensor(divisor):
            return total / divisor if divisor != 0 else self.zero_loss(embeddings)
        nonzero = divisor != 0
        safe = torch.where(nonzero, divisor, torch.ones_like(divisor)).to(total.dtype)
        # the zero must keep the graph only when ``total`` does not (constant losses); otherwise a
        # constant zero does, without PML's ``sum(embeddings * 0)`` pass over (B, D) and back
        zero = total.new_zeros(()) if total.requires_grad else self.zero_loss(embeddings)
        return torch.where(nonzero, total / safe, zero.to(total.dtype))
