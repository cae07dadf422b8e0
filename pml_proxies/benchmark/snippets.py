"""The settings of a run as code to paste: each loss's constructor call, its ``create_loss``
form, its miner and optimiser settings (the reports' "Settings to paste" sections), and the
records of ``best_params.json``.

Both forms are built from the run's :class:`~pml_proxies.benchmark.spec.RunSpec` exactly as
training builds the loss (:func:`pml_proxies.registry.build_loss`): the class call gets the
arguments the class got (after the registry's builder, e.g. SoftTriple's regulariser), the
``create_loss`` call the registry's (every default written out, so it does not depend on the data
set's defaults). Values are written with ``repr`` (floats round-trip exactly), so executing a
snippet builds a loss equal to the run's.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registry import get_spec

if TYPE_CHECKING:
    from .spec import RunSpec

#: a call longer than this is written one argument per line
LINE = 88


class _Unwritable(ValueError):
    """A value that cannot be written as code."""


def _public_path(obj: Any) -> tuple[str, str]:
    """``(module, name)`` of class or function ``obj``, the shortest parent module that exports
    it (``pml_proxies.regularizers`` rather than its defining submodule)."""
    module, name = obj.__module__, obj.__qualname__
    parts = module.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(prefix), name, None) is obj:
                return prefix, name
        except ImportError:
            continue
    return module, name


def _code(value: Any, imports: set[str]) -> str:
    """``value`` as a Python expression; an object as a call of its class with the arguments
    read back from its attributes of the same names (its imports added to ``imports``).

    Raises:
        _Unwritable: an object whose constructor arguments cannot be read back.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
    if isinstance(value, (list, tuple)):
        items = ", ".join(_code(v, imports) for v in value)
        return (
            f"[{items}]"
            if isinstance(value, list)
            else f"({items}{',' if len(value) == 1 else ''})"
        )
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{_code(k, imports)}: {_code(v, imports)}" for k, v in value.items())
            + "}"
        )
    cls = type(value)
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        raise _Unwritable(repr(value)) from None
    args = {}
    for p in params:
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(value, p.name):
            if p.default is p.empty:
                raise _Unwritable(f"{cls.__name__}.{p.name}")
            continue
        attr = getattr(value, p.name)
        if p.default is p.empty or attr != p.default:
            args[p.name] = _code(attr, imports)
    module, name = _public_path(cls)
    imports.add(f"from {module} import {name}")
    return _call(name, args)


def _call(callee: str, args: Mapping[str, str], prefix: str = "") -> str:
    """``prefix + callee(k=v, ...)`` of written arguments, one per line when long."""
    one = f"{prefix}{callee}({', '.join(f'{k}={v}' for k, v in args.items())})"
    if len(one) <= LINE or not args:
        return one
    return "\n".join([f"{prefix}{callee}(", *(f"    {k}={v}," for k, v in args.items()), ")"])


@dataclass(frozen=True)
class LossSettings:
    """One run's loss settings, as :func:`loss_settings` resolves them.

    Attributes:
        loss: registry name.
        class_path: ``"module.ClassName"`` of the loss.
        num_classes, embedding_size: the run's (training classes, embedding dimension).
        kwargs: the registry's keyword arguments (defaults written out, overrides applied):
            ``create_loss(loss, num_classes, embedding_size, **kwargs)`` rebuilds the loss.
        class_kwargs: what the class itself got (the registry's builder applied).
        miner: ``(class path, keyword arguments)`` of its miner, or ``None``.
        optimizer, lr, weight_decay: the run's optimiser, the network's learning rate and the
            weight decay.
        loss_lr: the learning rate of the loss's own parameters (proxies), ``None`` for a loss
            with no trained parameters (none, or updated otherwise: VCPA's Newton steps).
    """

    loss: str
    class_path: str
    num_classes: int
    embedding_size: int
    kwargs: dict[str, Any]
    class_kwargs: dict[str, Any]
    miner: tuple[str, dict[str, Any]] | None
    optimizer: str
    lr: float
    weight_decay: float
    loss_lr: float | None


def loss_settings(spec: RunSpec, num_classes: int) -> LossSettings:
    """The settings of ``spec``'s loss with ``num_classes`` training classes (builds the loss
    once, to tell whether it has trained parameters)."""
    from ..registry import build_loss

    registry = get_spec(spec.loss)
    kwargs = dict(spec.loss_kwargs)
    miner_overrides = kwargs.pop("miner_kwargs", {})
    class_kwargs = registry.builder(dict(kwargs)) if registry.builder else dict(kwargs)
    miner = None
    if registry.miner is not None:
        miner = (registry.miner.replace(":", "."), {**registry.miner_kwargs, **miner_overrides})
    config = spec.config
    loss, _ = build_loss(spec.loss, num_classes, config.embedding_size, config.dataset,
                         dict(spec.loss_overrides))  # fmt: skip
    trained = any(p.requires_grad for p in loss.parameters())
    return LossSettings(
        loss=spec.loss,
        class_path=registry.target.replace(":", "."),
        num_classes=int(num_classes),
        embedding_size=int(config.embedding_size),
        kwargs=kwargs,
        class_kwargs=class_kwargs,
        miner=miner,
        optimizer=config.optimizer,
        lr=spec.trunk.lr,
        weight_decay=config.weight_decay,
        loss_lr=spec.trunk.lr * spec.proxy_lr_mult if trained else None,
    )


def _split(path: str) -> tuple[str, str]:
    module, _, name = path.rpartition(".")
    return module, name


def _optimizer_comment(s: LossSettings) -> str:
    loss_lr = (
        f", {s.loss_lr!r} for the loss's parameters (proxy lr)"
        if s.loss_lr is not None
        else " (the loss has no parameters trained by the optimiser)"
    )
    return (
        f"# optimiser: {s.optimizer}, lr {s.lr!r} for the network{loss_lr}, "
        f"weight decay {s.weight_decay!r}"
    )


def class_snippet(s: LossSettings) -> str:
    """Executable code that builds the loss (``loss = ClassName(...)``) and its miner
    (``miner = ...``) with the run's arguments, with its imports; the optimiser settings as a
    comment. A loss whose class got an object that cannot be written falls back to
    :func:`create_loss_snippet`."""
    imports: set[str] = set()
    base = {"num_classes": repr(s.num_classes), "embedding_size": repr(s.embedding_size)}
    try:
        args = {**(base if get_spec(s.loss).proxy_based else {}),
                **{k: _code(v, imports) for k, v in s.class_kwargs.items()}}  # fmt: skip
        miner_args = (
            None if s.miner is None else {k: _code(v, imports) for k, v in s.miner[1].items()}
        )
    except _Unwritable:
        return create_loss_snippet(s)
    module, name = _split(s.class_path)
    imports.add(f"from {module} import {name}")
    lines = [_call(name, args, "loss = ")]
    if s.miner is not None and miner_args is not None:
        miner_module, miner_name = _split(s.miner[0])
        imports.add(f"from {miner_module} import {miner_name}")
        lines.append(_call(miner_name, miner_args, "miner = "))
    return "\n".join([*sorted(imports), "", *lines, _optimizer_comment(s)])


def create_loss_snippet(s: LossSettings) -> str:
    """Executable code that builds the loss with ``pml_proxies.create_loss`` (and its miner
    with ``create_miner``) with the run's arguments; the optimiser settings as a comment."""
    imports: set[str] = set()
    kwargs = _code(s.kwargs, imports)
    call = (
        f'loss = pml_proxies.create_loss("{s.loss}", num_classes={s.num_classes!r}, '
        f"embedding_size={s.embedding_size!r}, **{kwargs})"
    )
    lines = [call]
    if s.miner is not None:
        lines.append(
            f'miner = pml_proxies.create_miner("{s.loss}", **{_code(s.miner[1], imports)})'
        )
    return "\n".join([*sorted(imports | {"import pml_proxies"}), "", *lines, _optimizer_comment(s)])


def snippets_markdown(settings: list[LossSettings], achieved: Mapping[str, str]) -> str:
    """The "settings to paste" section's body: per loss, what it achieved (``achieved[loss]``,
    a sentence) and its two snippets as fenced Python blocks."""
    out = [
        "Each block builds the loss (and its miner) with the settings of its run(s) and is "
        "executable as it stands; `num_classes` is the number of training classes here, "
        "replace it with yours. The same settings are in `best_params.json`.",
        "",
    ]
    for s in settings:
        out += [f"### {s.loss}", ""]
        if achieved.get(s.loss):
            out += [achieved[s.loss], ""]
        out += ["```python", class_snippet(s), "```", "", "```python", create_loss_snippet(s),
                "```", ""]  # fmt: skip
    return "\n".join(out).rstrip() + "\n"


def best_params_record(
    s: LossSettings, metrics: list[dict[str, Any]], searched: list[str] | None = None
) -> dict[str, Any]:
    """One loss's record of ``best_params.json``: its name, class, sizes, the registry's
    keyword arguments (``kwargs``: ``create_loss(loss, num_classes, embedding_size,
    **kwargs)``), its miner, the optimiser settings, the searched hyper-parameters (tuning) and
    ``metrics`` (each ``{"name", "split", "value", ...}``: what the settings achieved, where),
    with the two snippets."""
    return {
        "loss": s.loss,
        "class": s.class_path,
        "num_classes": s.num_classes,
        "embedding_size": s.embedding_size,
        "kwargs": s.kwargs,
        "miner": None if s.miner is None else {"class": s.miner[0], "kwargs": s.miner[1]},
        "optimizer": {
            "name": s.optimizer,
            "lr": s.lr,
            "loss_lr": s.loss_lr,
            "weight_decay": s.weight_decay,
        },  # fmt: skip
        "searched": searched,
        "metrics": metrics,
        "snippet": class_snippet(s),
        "create_loss": create_loss_snippet(s),
    }


__all__ = [
    "LossSettings",
    "loss_settings",
    "class_snippet",
    "create_loss_snippet",
    "snippets_markdown",
    "best_params_record",
]
