"""The math every loss of the package shares (one home for each formula), the helpers for
torch.distributed, and the argument checks of the public constructors."""

from . import distributed, proxy_math, validation

__all__ = ["distributed", "proxy_math", "validation"]
