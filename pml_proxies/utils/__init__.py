from . import proxy_math

__all__ = ["proxy_math"]
