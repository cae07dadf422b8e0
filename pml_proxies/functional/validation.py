"""Argument checks shared by every public constructor of the package, and the check of a tensor
loaded into a loss's state.

Each argument helper checks one argument, returns it converted (``int`` for integer arguments,
``float`` for real ones) and raises a clear error naming the argument, the value and what is
accepted: ``TypeError`` for a value of the wrong type, ``ValueError`` for a value out of range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch


def _describe_range(
    low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool
) -> str:
    if low is not None and high is not None:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        return f"in {left}{low}, {high}{right}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high}"
    return "finite"


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a finite ``float`` in the given range (bounds are optional).

    Raises ``TypeError`` for a non-number (``bool`` included) and ``ValueError`` for NaN, an
    infinity or a value outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    accepted = _describe_range(low, high, low_inclusive, high_inclusive)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number {accepted}, got {value!r}")
    too_low = low is not None and (out < low or (not low_inclusive and out == low))
    too_high = high is not None and (out > high or (not high_inclusive and out == high))
    if too_low or too_high:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return out


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]``; integer-valued floats (``3.0``) are accepted,
    anything else (``2.5``, ``"3"``, ``True``) is rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        out = int(value)
    else:
        as_float = float(value)
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        out = int(as_float)
    if (low is not None and out < low) or (high is not None and out > high):
        raise ValueError(
            f"{name} must be an integer {_describe_range(low, high, True, True)}, got {value!r}"
        )
    return out


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (numpy / torch booleans included), else ``TypeError``."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ in ("bool_", "bool") and hasattr(value, "item"):
        return bool(value.item())
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_state_tensor(name: str, value: Any, current: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` can be loaded into ``current`` (a
    parameter or buffer) as a valid state: a tensor of the same shape whose values survive the
    conversion to ``current``'s dtype. For a floating ``current`` they must be finite once
    converted (a float64 ``1e300`` overflows float32); for an integer one, finite integers in
    its range (a NaN would become ``-2**63``); for a boolean one, 0 or 1."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
    if value.is_complex():
        raise ValueError(f"{name} must be real, got {value.dtype}")
    value = value.detach()
    if current.is_floating_point():
        if not bool(torch.isfinite(value.to(current.dtype)).all()):
            raise ValueError(f"{name} holds NaN or infinite values (as {current.dtype})")
        return
    if value.is_floating_point():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} holds NaN or infinite values, expected {current.dtype}")
        if not bool((value == value.trunc()).all()):
            raise ValueError(f"{name} holds non-integer values, expected {current.dtype}")
    if value.numel() == 0 or value.dtype == torch.bool:
        return
    if current.dtype == torch.bool:
        low, high = 0, 1
    else:
        info = torch.iinfo(current.dtype)
        low, high = info.min, info.max
    # Python compares an int with a float exactly (no rounding of 2**63 - 1)
    smallest, largest = value.min().item(), value.max().item()
    if smallest < low or largest > high:
        raise ValueError(
            f"{name} holds values in [{smallest:g}, {largest:g}], outside {current.dtype}'s "
            f"[{low}, {high}]"
        )
