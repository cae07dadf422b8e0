"""Multi Proxy Anchor (MPA) loss."""

from __future__ import annotations

from ..functional import proxy_math
from .base_multi_proxy_loss import BaseMultiProxyLoss


class MultiProxyAnchorLoss(BaseMultiProxyLoss):
    """Multi Proxy Anchor loss (Saeki et al., "Multi Proxy Anchor Family Loss for Several Types of
    Gradients", eq. 6-7).

    Proxy-Anchor on pooled class similarities ``S(x, c)`` of ``K`` centers per class::

        L = 1/|C+| sum_{c in C+} log(1 + sum_{x in X_c+} exp(-alpha (S(x,c) - delta)))
          + 1/C    sum_{c}       log(1 + sum_{x in X_c-} exp( alpha (S(x,c) + delta)))
          + tau R

    ``X_c-`` is taken over all classes (docs/mpa.md, "Decisions"), so that ``K = 1`` is
    exactly PML's ``ProxyAnchorLoss``. PML miners' ``indices_tuple`` weight samples as in
    ``ProxyAnchorLoss``.

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

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` in ``[0, C)``; output a scalar.
    """

    def compute_proxy_loss(self, embeddings, labels, indices_tuple):
        sims = self.get_logits(embeddings)
        pos_mask, _ = proxy_math.class_masks(labels, self.num_classes)
        pos_term, neg_term = proxy_math.proxy_anchor_terms(
            sims,
            pos_mask,
            self.alpha,
            self.margin,
            miner_weights=self.miner_weights(indices_tuple, labels, sims.dtype),
        )
        loss_dict = self.proxy_anchor_loss_dict(
            pos_term, neg_term, pos_mask.any(dim=0).sum(), self.num_classes
        )
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]
