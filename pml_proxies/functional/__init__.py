"""The math every loss of the package shares (one home for each formula), VCPA's closed-form
Newton steps (:mod:`.vcpa_math`), the per-query retrieval metrics (:mod:`.retrieval_metrics`),
the helpers for torch.distributed, and the argument checks of
the public constructors."""

from . import distributed, proxy_math, retrieval_metrics, validation, vcpa_math

__all__ = ["distributed", "proxy_math", "retrieval_metrics", "validation", "vcpa_math"]
