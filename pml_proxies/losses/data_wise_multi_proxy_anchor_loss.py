"""Data-wise Multi Proxy Anchor (MPA-DW) loss."""

from __future__ import annotations

from ..functional import proxy_math
from .base_multi_proxy_loss import BaseMultiProxyLoss


class DataWiseMultiProxyAnchorLoss(BaseMultiProxyLoss):
    """Data-wise Multi Proxy Anchor loss, MPA-DW (Saeki et al., eq. 12-13).

    One term per sample instead of one per class::

        L = 1/B sum_i [ log(1 + exp(-alpha (S(x_i, y_i) - delta)))
                      + log(1 + sum_{c != y_i} exp(alpha (S(x_i, c) + delta))) ] + tau R

    PML miners' ``indices_tuple`` weight the per-sample losses (as PML's ``SoftTripleLoss``).

    Args:
        num_classes: number of classes ``C``.
        embedding_size: embedding dimension ``D``.
        centers_per_class: ``K`` (10).
        alpha: scale (32).
        margin: ``delta`` (0.1).
        gamma: softmax pooling temperature (0.1).
        pooling: ``"softmax"``, ``"max"`` or ``"mean"``.
        weight_regularizer: center regulariser (default: eq. 3; ``None`` disables it).
        weight_reg_weight: ``tau`` (0.2).
        **kwargs: PML keyword arguments.
    """

    def compute_proxy_loss(self, embeddings, labels, indices_tuple):
        sims = self.get_logits(embeddings)
        pos_mask, neg_mask = proxy_math.class_masks(labels, self.num_classes)
        pos_logits = self.alpha * (self.margin - sims)
        neg_logits = self.alpha * (sims + self.margin)
        losses = proxy_math.log1p_sum_exp(pos_logits, pos_mask, dim=1) + proxy_math.log1p_sum_exp(
            neg_logits, neg_mask, dim=1
        )
        return self.element_loss_dict(losses, self.miner_weights(indices_tuple, labels, sims.dtype))
