"""Weight regularisers (PML ``BaseRegularizer`` subclasses)."""

from .intra_class_center_regularizer import IntraClassCenterRegularizer

__all__ = ["IntraClassCenterRegularizer"]
