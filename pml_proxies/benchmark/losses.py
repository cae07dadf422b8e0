"""Registry of the losses the benchmark compares, with their papers' default hyper-parameters.

Every entry builds ``(loss, miner)`` from ``(num_classes, embedding_size)``. Losses of this
package that may not exist yet (e.g. while they are being written) are imported lazily by name:
asking for one that is missing raises a clear ``ValueError``.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..functional.validation import check_bool, check_int, check_real

#: Dataset-specific defaults from the papers (applied before user overrides).
DATASET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # MPA paper: K = 2 on SOP.
    "mpa": {"sop": {"centers_per_class": 2}},
    "mpa_dw": {"sop": {"centers_per_class": 2}},
    "mpa_ap": {"sop": {"centers_per_class": 2}},
    # Proxy-ISA authors' commands: k = 0.4 on Cars-196, 0.1 on In-Shop.
    "proxy_isa": {"cars196": {"sensitivity": 0.4}, "inshop": {"sensitivity": 0.1}},
    # VCPA paper: tau = 0.01 on CUB, 0.001 on Cars, SOP, In-Shop; no Newton steps on SOP / In-Shop.
    "vcpa": {
        "cars196": {"temperature": 0.001},
        "sop": {"temperature": 0.001, "newton_steps": 0},
        "inshop": {"temperature": 0.001, "newton_steps": 0},
    },
    # the paper's temperatures; Newton steps stay on (damping needs them)
    "vcpa_damped": {
        "cars196": {"temperature": 0.001},
        "sop": {"temperature": 0.001},
        "inshop": {"temperature": 0.001},
    },
}


@dataclass(frozen=True)
class LossSpec:
    """One loss of the benchmark.

    Attributes:
        name: registry name (command line).
        target: ``"module:ClassName"`` of the loss, imported lazily.
        kwargs: the papers' default keyword arguments (besides ``num_classes`` and
            ``embedding_size``).
        source: where the defaults come from (documented in the table of docs/benchmark.md).
        proxy_based: whether the loss takes ``num_classes`` / ``embedding_size`` and owns
            learnable parameters.
        miner: ``"module:ClassName"`` of its miner, or ``None``.
        miner_kwargs: the miner's keyword arguments.
        builder: optional hook ``(kwargs) -> kwargs`` to add objects (regularisers) at build time.
        extra_params: arguments the ``builder`` consumes (not the class's), with their types.
        integer_params: integer arguments of a class without type annotations (PML's); its
            other numeric arguments are real numbers.
        variant_of: for a variant of a paper's loss that this package adds (not in any paper),
            the registry name of the paper's loss; ``None`` for the papers' own losses.
    """

    name: str
    target: str
    kwargs: dict[str, Any]
    source: str
    proxy_based: bool = True
    miner: str | None = None
    miner_kwargs: dict[str, Any] = field(default_factory=dict)
    builder: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    extra_params: dict[str, type] = field(default_factory=dict)
    integer_params: tuple[str, ...] = ()
    variant_of: str | None = None


def _soft_triple_regularizer(kwargs: dict[str, Any]) -> dict[str, Any]:
    """SoftTriple's center regulariser (paper eq. 10) is MPA's eq. 3: use the O(C K^2 D)
    implementation of this package instead of PML's ``SparseCentersRegularizer`` (O((CK)^2))."""
    from ..regularizers import IntraClassCenterRegularizer

    kwargs = dict(kwargs)
    tau = kwargs.pop("tau", 0.2)
    # explicit overrides (e.g. --loss-param soft_triple.weight_reg_weight=0.5) win
    if "weight_regularizer" not in kwargs:
        kwargs["weight_regularizer"] = IntraClassCenterRegularizer(kwargs["centers_per_class"])
    kwargs.setdefault("weight_reg_weight", tau)
    return kwargs


_MPA = dict(centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1, weight_reg_weight=0.2)
_MPA_SOURCE = (
    "Saeki et al., MPA family (K=10, gamma=0.1, delta=0.1, tau=0.2; alpha=32 as Proxy-Anchor)"
)

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec("mpa", "pml_proxies.losses:MultiProxyAnchorLoss", _MPA, _MPA_SOURCE),
        LossSpec("mpa_dw", "pml_proxies.losses:DataWiseMultiProxyAnchorLoss", _MPA, _MPA_SOURCE),
        LossSpec("mpa_ap", "pml_proxies.losses:AllPairsMultiProxyAnchorLoss", _MPA, _MPA_SOURCE),
        LossSpec(
            "proxy_isa",
            "pml_proxies.losses:ProxyISALoss",
            # its statistics (effective numbers, memory fill, weights) go to record-keeper
            {"collect_stats": True},
            "Proxy-ISA paper / authors' code (alpha=32, delta=0.1, V=100, h=0.15, k=0.9, "
            "lambda=0.1, tau=1.5, T=55000; memory from epoch 3, filter from epoch 4)",
        ),
        LossSpec(
            "vcpa",
            "pml_proxies.losses:VCPALoss",
            {},
            "VCPA paper (alpha=32, delta=0.1, tau=0.01, M=10 Newton steps)",
        ),
        LossSpec(
            "vcpa_damped",
            "pml_proxies.losses:VCPALoss",
            {"newton_damping": 0.25},
            "this package's variant, not the paper's: VCPA with damped Newton steps (eta=0.25; "
            "otherwise the paper's defaults alpha=32, delta=0.1, tau=0.01, M=10)",
            variant_of="vcpa",
        ),
        LossSpec(
            "proxy_anchor",
            "pytorch_metric_learning.losses:ProxyAnchorLoss",
            dict(margin=0.1, alpha=32),
            "Kim et al. 2020, Proxy Anchor Loss (alpha=32, delta=0.1)",
        ),
        LossSpec(
            "soft_triple",
            "pytorch_metric_learning.losses:SoftTripleLoss",
            dict(centers_per_class=10, la=20, gamma=0.1, margin=0.01, tau=0.2),
            "Qian et al. 2019, SoftTriple (K=10, lambda=20, gamma=0.1, delta=0.01, "
            "center regulariser tau=0.2)",
            builder=_soft_triple_regularizer,
            extra_params={"tau": float},
            integer_params=("centers_per_class",),
        ),
        LossSpec(
            "proxy_nca",
            "pytorch_metric_learning.losses:ProxyNCALoss",
            dict(softmax_scale=1),
            "Movshovitz-Attias et al. 2017, No Fuss DML (no temperature: softmax_scale=1)",
        ),
        LossSpec(
            "multi_similarity",
            "pytorch_metric_learning.losses:MultiSimilarityLoss",
            dict(alpha=2, beta=50, base=1.0),
            "Wang et al. 2019, Multi-Similarity (alpha=2, beta=50, lambda=1; miner epsilon=0.1)",
            proxy_based=False,
            miner="pytorch_metric_learning.miners:MultiSimilarityMiner",
            miner_kwargs=dict(epsilon=0.1),
        ),
        LossSpec(
            "normalized_softmax",
            "pytorch_metric_learning.losses:NormalizedSoftmaxLoss",
            dict(temperature=0.05),
            "Zhai & Wu 2019, Classification is a Strong Baseline (temperature=0.05)",
        ),
    ]
}

LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def _import(target: str):
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no {attr}: check the installed version") from None


def _spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
    return LOSSES[name]


def loss_kwargs(name: str, dataset: str | None = None, overrides: dict | None = None) -> dict:
    """The keyword arguments used for ``name``: paper defaults, then dataset defaults, then
    ``overrides``."""
    _spec(name)
    kwargs = dict(LOSSES[name].kwargs)
    kwargs.update(DATASET_DEFAULTS.get(name, {}).get(dataset or "", {}))
    kwargs.update(overrides or {})
    return kwargs


#: constructor arguments the benchmark sets itself (never overridable)
_RESERVED = frozenset({"self", "num_classes", "embedding_size", "mat_based_loss"})
_ANY = object  # an argument of no simple type (objects such as regularisers): taken as given


def _param_kind(spec: LossSpec, param: inspect.Parameter, hints: dict) -> Any:
    """The accepted type of one constructor argument: ``int``, ``float``, ``bool``, ``str``
    (optionally ``(type, None)`` when ``None`` is accepted too) or ``_ANY``."""
    hint = hints.get(param.name)
    if hint is not None:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        base = args[0] if optional and len(args) == 1 else hint
        if base in (int, float, bool, str):
            return (base, None) if optional else base
        return _ANY
    default = param.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return int if param.name in spec.integer_params else float
    return _ANY  # unannotated strings are sentinels (MPA's weight_regularizer="default")


def loss_parameters(name: str) -> dict[str, Any]:
    """Every overridable constructor argument of loss ``name`` with its accepted type (see
    :func:`_param_kind`): the class's own arguments and, while an ``__init__`` forwards
    ``**kwargs``, those of its base classes (PML's mixins: ``weight_reg_weight``, ...)."""
    spec = _spec(name)
    cls = _import(spec.target)
    out: dict[str, Any] = dict(spec.extra_params)
    if spec.miner is not None:  # the miner's arguments, {"miner_kwargs": {...}} (tuning)
        out["miner_kwargs"] = _ANY
    for klass in cls.__mro__:
        if klass in (torch.nn.Module, object):
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to defaults
            hints = {}
        forwards = False
        for p in inspect.signature(init).parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in _RESERVED:
                out.setdefault(p.name, _param_kind(spec, p, hints))
        if not forwards:
            break
    return out


def _type_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return f"{_type_name(kind[0])} or None"
    return {int: "an integer", float: "a real number", bool: "True or False", str: "a string"}[kind]


def convert_loss_params(name: str, overrides: dict | None) -> dict:
    """``overrides`` of loss ``name`` checked and converted by the loss constructor's signature:
    integers for integer arguments, floats for real ones, booleans, strings, ``None`` where the
    argument accepts it; objects for arguments of no simple type are passed as given.

    Raises:
        ValueError: an unknown argument, or a value of the wrong type (the message names the loss,
            the argument and the accepted type).
    """
    accepted = loss_parameters(name)
    out = {}
    for arg, value in (overrides or {}).items():
        if arg not in accepted:
            raise ValueError(
                f"loss {name!r} has no argument {arg!r}; its arguments: {', '.join(sorted(accepted))}"
            )
        kind = accepted[arg]
        if kind is _ANY:
            out[arg] = value
            continue
        if isinstance(kind, tuple):
            if value is None:
                out[arg] = None
                continue
            base = kind[0]
        else:
            base = kind
        label = f"loss {name!r} argument {arg!r}"
        try:
            if base is int:
                if isinstance(value, float):
                    raise TypeError
                out[arg] = check_int(label, value)
            elif base is float:
                out[arg] = check_real(label, value)
            elif base is bool:
                out[arg] = check_bool(label, value)
            else:
                if not isinstance(value, str):
                    raise TypeError
                out[arg] = value
        except (TypeError, ValueError):
            raise ValueError(
                f"loss {name!r} argument {arg!r} expects {_type_name(kind)}, got {value!r}"
            ) from None
    return out


def effective_kwargs(name: str, dataset: str | None = None, overrides: dict | None = None) -> dict:
    """Every constructor argument the loss ``name`` gets, defaults of its class included (for
    reports): the class signature's defaults updated with :func:`loss_kwargs`."""
    kwargs = loss_kwargs(name, dataset, overrides)
    try:
        cls = _import(LOSSES[name].target)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ValueError, ImportError, TypeError):
        return kwargs
    skip = {"self", "num_classes", "embedding_size"}
    out = {
        p.name: p.default
        for p in params
        if p.name not in skip
        and p.default is not inspect.Parameter.empty
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    out.update(kwargs)
    return out


def build_loss(
    name: str,
    num_classes: int,
    embedding_size: int,
    dataset: str | None = None,
    overrides: dict | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Build ``(loss, miner)`` for registry name ``name``.

    Raises:
        ValueError: unknown name, a loss that is not available, or bad keyword arguments.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
    cls = _import(spec.target)
    kwargs = loss_kwargs(name, dataset, overrides)
    # overrides of the miner's arguments (hyper-parameter search): {"miner_kwargs": {...}}
    miner_kwargs = {**spec.miner_kwargs, **kwargs.pop("miner_kwargs", {})}
    if spec.builder is not None:
        kwargs = spec.builder(kwargs)
    try:
        if spec.proxy_based:
            loss = cls(num_classes=num_classes, embedding_size=embedding_size, **kwargs)
        else:
            loss = cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad keyword arguments for loss {name!r}: {e}") from e
    miner = None
    if spec.miner is not None:
        miner = _import(spec.miner)(**miner_kwargs)
    return loss, miner


def get_proxies(loss: torch.nn.Module, num_classes: int):
    """Learned proxies of ``loss`` for plots: ``(proxies (N, D), proxy_labels (N,), std or None)``
    as numpy arrays, or ``None`` when the loss has no proxies. ``std`` is a per-proxy scalar
    uncertainty (VCPA's ``proxy_uncertainty``, supplement eq. 30, when present)."""
    weight = None
    for attr in ("proxies", "fc", "W"):
        w = getattr(loss, attr, None)
        if isinstance(w, torch.Tensor):
            weight = w.detach()
            break
    if weight is None:
        return None
    if weight.dim() != 2:
        return None
    if attr in ("fc", "W"):  # PML stores these as (D, C*K)
        weight = weight.t()
    if weight.shape[0] % num_classes != 0:
        return None
    per_class = weight.shape[0] // num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    std = None
    unc = getattr(loss, "proxy_uncertainty", None) or getattr(loss, "uncertainty", None)
    if callable(unc):
        try:
            std = unc().detach().float().cpu().numpy().ravel()
            if std.shape[0] != weight.shape[0]:
                std = None
        except Exception:  # noqa: BLE001 - plots only; a missing uncertainty is not fatal
            std = None
    return weight.float().cpu().numpy(), labels.numpy(), std
