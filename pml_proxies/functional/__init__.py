"""The math every loss of the package shares (one home for each formula), VCPA's closed-form
Newton steps (:mod:`.vcpa_math`), the helpers for torch.distributed, and the argument checks of
the public constructors."""

from . import distributed, proxy_math, validation, vcpa_math

__all__ = ["distributed", "proxy_math", "validation", "vcpa_math"]
