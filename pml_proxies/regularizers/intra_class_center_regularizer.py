"""The MPA paper's intra-class center regulariser (eq. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.regularizers import BaseRegularizer


class IntraClassCenterRegularizer(BaseRegularizer):
    """Pulls the ``K`` centers of each class together (MPA paper eq. 3, SoftTriple's regulariser).

    ``R = sum_c sum_{t<s} sqrt(2 - 2 <w_ct, w_cs>) / (C K (K - 1))`` on L2-normalised centers:
    half the mean distance between two centers of the same class (the same value as PML's
    ``SparseCentersRegularizer``). The MPA losses add ``tau R`` with ``tau = 0.2``
    (``weight_reg_weight``), which lets redundant centers merge.

    Unlike PML's ``SparseCentersRegularizer``, which builds ``(C K)^2`` matrices, this works class by
    class with a batched ``(C, K, K)`` Gram matrix: ``O(C K^2 D)`` time and ``O(C K^2)`` memory, so
    it runs at Stanford Online Products scale (C = 11,318). It is 0 for ``K = 1``.

    The rows it receives must be class-major: rows ``c*K .. c*K + K - 1`` are the centers of class
    ``c`` (the layout of this package's losses and of PML's ``SoftTripleLoss.fc.t()``).

    Args:
        centers_per_class: ``K``.
        eps: added inside the square root, whose gradient is infinite at identical centers
            (SPEC decision).
        **kwargs: PML ``BaseRegularizer`` keyword arguments.
    """

    def __init__(self, centers_per_class: int, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(centers_per_class) < 1:
            raise ValueError(f"centers_per_class must be >= 1, got {centers_per_class}")
        self.centers_per_class = int(centers_per_class)
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
        zero = weights.sum() * 0
        if k == 1:
            return {"loss": {"losses": zero, "indices": None, "reduction_type": "already_reduced"}}
        num_classes = weights.shape[0] // k
        centers = F.normalize(weights, p=2, dim=1).view(num_classes, k, -1)
        gram = torch.bmm(centers, centers.transpose(1, 2))  # (C, K, K)
        rows, cols = torch.triu_indices(k, k, offset=1, device=weights.device)
        sims = gram[:, rows, cols]  # (C, K (K-1) / 2)
        dist = torch.sqrt((2 - 2 * sims).clamp(min=0) + self.eps)
        if self.collect_stats:
            with torch.no_grad():
                self.same_class_center_sim = sims.mean().item()
        loss = dist.sum() / (num_classes * k * (k - 1))
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
