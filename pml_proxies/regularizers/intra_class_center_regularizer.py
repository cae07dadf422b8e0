"""The MPA paper's intra-class center regulariser (eq. 3)."""

from __future__ import annotations

import torch
from pytorch_metric_learning.regularizers import BaseRegularizer

from ..functional import proxy_math
from ..functional.validation import check_int, check_real


class _ClassGram(torch.autograd.Function):
    """``G_c = W_c W_c^T`` per class with a one-product backward ``dW_c = (g_c + g_c^T) W_c``.

    Autograd's own backward of ``bmm(W, W^T)`` computes two ``(C, K, D)`` products and adds them
    (plus a transposed copy); this halves the work and the temporary memory of the backward pass.
    """

    @staticmethod
    def forward(ctx, centers: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(centers)
        return torch.bmm(centers, centers.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_gram: torch.Tensor) -> torch.Tensor:
        (centers,) = ctx.saved_tensors
        return torch.bmm(grad_gram + grad_gram.transpose(1, 2), centers)


class IntraClassCenterRegularizer(BaseRegularizer):
    """Pulls the ``K`` centers of each class together (MPA paper eq. 3, SoftTriple's regulariser).

    ``R = sum_c sum_{t<s} sqrt(2 - 2 <w_ct, w_cs>) / (C K (K - 1))`` on L2-normalised centers:
    half the mean distance between two centers of the same class (PML's
    ``SparseCentersRegularizer`` computes the same value, up to ``eps``). The MPA losses add
    ``tau R`` with ``tau = 0.2`` (``weight_reg_weight``), which lets redundant centers merge.

    Unlike PML's ``SparseCentersRegularizer``, which builds ``(C K)^2`` matrices, this works class by
    class with a batched ``(C, K, K)`` Gram matrix: ``O(C K^2 D)`` time and ``O(C K^2)`` memory, so
    it runs at Stanford Online Products scale (C = 11,318): the centers are never normalised into a
    copy (the Gram matrix of the raw centers is divided by their norms), so besides the ``(C K, D)``
    gradient it allocates only ``(C, K, K)`` tensors. It is 0 for ``K = 1``. It computes in float32
    (float64 stays float64) with autocast off, whatever the dtype of the centers.

    The rows it receives must be class-major: rows ``c*K .. c*K + K - 1`` are the centers of class
    ``c`` (the layout of this package's losses and of PML's ``SoftTripleLoss.fc.t()``).

    Args:
        centers_per_class: ``K``, an integer >= 1.
        eps: added inside the square root, whose gradient is infinite at identical centers
            (docs/mpa.md, "Decisions"); finite and >= 0 (0: the exact value, as PML).
        **kwargs: PML ``BaseRegularizer`` keyword arguments.
    """

    def __init__(self, centers_per_class: int, eps: float = 1e-8, **kwargs) -> None:
        centers_per_class = check_int("centers_per_class", centers_per_class, low=1)
        eps = check_real("eps", eps, low=0)
        super().__init__(**kwargs)
        self.centers_per_class = centers_per_class
        self.eps = eps
        self.add_to_recordable_attributes(list_of_names=["centers_per_class"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["same_class_center_sim"], is_stat=True)

    def compute_loss(self, weights: torch.Tensor) -> dict:
        k = self.centers_per_class
        if weights.ndim != 2 or weights.shape[0] % k != 0:
            raise ValueError(
                f"expected class-major centers of shape (num_classes * {k}, D), got "
                f"{tuple(weights.shape)}"
            )
        if k == 1:
            zero = weights.sum() * 0  # keeps the graph (and a zero gradient) for K = 1
            return {"loss": {"losses": zero, "indices": None, "reduction_type": "already_reduced"}}
        num_classes = weights.shape[0] // k
        # float32 (float64 stays float64) with autocast off: a float16 / bfloat16 Gram matrix would
        # lose the small distances between nearby centers.
        dtype = proxy_math.compute_dtype(weights.dtype)
        with proxy_math.autocast_disabled(weights.device.type):
            centers = weights.reshape(num_classes, k, -1).to(dtype)
            # Gram matrix of the raw centers, normalised afterwards: cos = g_st / (|w_s| |w_t|).
            # No normalised (C K, D) copy of the centers is made, so the extra memory is O(C K^2)
            # besides the gradient itself, and the work one batched (C, K, K) product.
            gram = _ClassGram.apply(centers)  # (C, K, K)
            norms = gram.diagonal(dim1=1, dim2=2).clamp(min=1e-24).sqrt()  # F.normalize's eps^2
            rows, cols = torch.triu_indices(k, k, offset=1, device=weights.device)
            sims = gram[:, rows, cols] / (norms[:, rows] * norms[:, cols])  # (C, K (K-1) / 2)
            dist = torch.sqrt((2 - 2 * sims).clamp(min=0) + self.eps)
        if self.collect_stats:
            with torch.no_grad():
                self.same_class_center_sim = sims.mean().item()
        loss = dist.sum() / (num_classes * k * (k - 1))
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
