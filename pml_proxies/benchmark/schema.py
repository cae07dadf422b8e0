"""Checks of the JSON files of an output folder against their schema.

A schema is written as Python type hints, next to the code that writes the file: a
:class:`~typing.TypedDict` or a ``{field: hint}`` dict for an object with required fields (other
fields are allowed), ``list[X]``, ``dict[str, X]``, unions (``X | None``), ``int``, ``float`` (any
JSON number), ``str``, ``bool`` and :data:`~typing.Any`. :func:`schema_problem` names the first
field that does not match.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          list: "a list", dict: "an object", type(None): "null"}  # fmt: skip


def _is_object_schema(hint: Any) -> bool:
    return isinstance(hint, dict) or typing.is_typeddict(hint)


def _describe(hint: Any) -> str:
    """``"an integer or null"`` for ``int | None``."""
    if _is_object_schema(hint):
        return "an object"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    return _NAMES.get(origin or hint, str(hint))


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields(hint: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """``(field -> hint, required fields)`` of an object schema."""
    if isinstance(hint, dict):
        return hint, frozenset(hint)
    return typing.get_type_hints(hint), hint.__required_keys__


def schema_problem(value: Any, hint: Any, where: str = "") -> str | None:
    """``None`` if ``value`` (parsed JSON) matches ``hint``, else the first mismatch, naming the
    field by its path in the file (``where`` prefixes it), e.g. ``'test.precision_at_1' is
    "high", expected a number`` or ``'best_epoch' is missing``."""
    name = f"'{where}'" if where else "the file"
    if hint is Any:
        return None
    if _is_object_schema(hint):
        if not isinstance(value, dict):
            return f"{name} is {_show(value)}, expected an object"
        hints, required = _fields(hint)
        missing = [f"'{where}.{k}'" if where else f"'{k}'" for k in hints
                   if k in required and k not in value]  # fmt: skip
        if missing:
            return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
        for key, sub in hints.items():
            if key in value:
                problem = schema_problem(value[key], sub, f"{where}.{key}" if where else key)
                if problem is not None:
                    return problem
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if any(schema_problem(value, h, where) is None for h in args):
            return None
        problems = [schema_problem(value, h, where) for h in args]
        # a container of the right kind with a bad item: name that item
        deep = [p for p in problems if p is not None and not p.startswith(f"{name} is ")]
        return deep[0] if deep else f"{name} is {_show(value)}, expected {_describe(hint)}"
    kind = origin or hint
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind in (bool, str, list, dict, type(None)):
        ok = isinstance(value, kind)
    else:
        raise TypeError(f"unsupported schema type {hint!r}")
    if not ok:
        return f"{name} is {_show(value)}, expected {_describe(hint)}"
    if kind is list and args:
        for i, item in enumerate(value):
            problem = schema_problem(item, args[0], f"{where}[{i}]")
            if problem is not None:
                return problem
    if kind is dict and args:
        for key, item in value.items():
            problem = schema_problem(item, args[1], f"{where}.{key}" if where else key)
            if problem is not None:
                return problem
    return None


__all__ = ["schema_problem"]
