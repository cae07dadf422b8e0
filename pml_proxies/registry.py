"""The registry of losses: for every loss of the package and the PML baselines it is compared
with, its class, the papers' default arguments (per data set where the papers differ) and its
hyper-parameter search space, in one place.

    >>> import pml_proxies
    >>> loss = pml_proxies.create_loss("mpa", num_classes=100, embedding_size=128, dataset="sop")
    >>> loss.centers_per_class  # the MPA paper's K on SOP (10 elsewhere)
    2

The benchmark (``pml_proxies.benchmark``: its losses, ``--list-losses`` and the tuner's search
spaces) and the tests of ``powerful_benchmarker_configs/`` read this module. Adding a loss is one
:class:`LossSpec` in :data:`LOSSES`. Importing this module loads neither torch nor the losses:
a loss's class is imported when the loss is built.
"""

from __future__ import annotations

import importlib
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: search-space name of the learning rate of a loss's own parameters (proxies, centers)
PROXY_LR = "proxy_lr"
#: search-space names of a miner's arguments are ``miner.<argument>``
MINER_PREFIX = "miner."
#: kinds of a search range: uniform, log-uniform, integer
RANGE_KINDS = ("float", "log", "int")


def check_range(low: float, high: float, kind: str, where: str) -> None:
    """Raise ``ValueError`` (starting with ``where``) unless ``[low, high]`` is a valid range of
    ``kind`` (one of :data:`RANGE_KINDS`): finite, ordered, positive for ``log``, integer bounds
    for ``int``."""
    if kind not in RANGE_KINDS:
        raise ValueError(f"{where}: kind must be float, log or int, got {kind!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{where}: low and high must be finite, got [{low:g}, {high:g}]")
    if not low <= high:
        raise ValueError(f"{where}: low ({low:g}) must be <= high ({high:g})")
    if kind == "log" and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low:g}")
    if kind == "int" and (low != math.floor(low) or high != math.floor(high)):
        raise ValueError(f"{where}: an int range needs integer bounds, got [{low:g}, {high:g}]")


@dataclass(frozen=True)
class SearchRange:
    """One searched hyper-parameter as plain data: ``[low, high]`` (inclusive) of ``kind``
    ``"float"`` (uniform), ``"log"`` (log-uniform) or ``"int"`` (integers)."""

    low: float
    high: float
    kind: str = "float"

    def __post_init__(self) -> None:
        check_range(self.low, self.high, self.kind, "search range")


@dataclass(frozen=True)
class LossSpec:
    """One loss of the registry.

    Attributes:
        name: registry name (``create_loss``, the benchmark's command line).
        target: ``"module:ClassName"`` of the loss, imported lazily.
        kwargs: the papers' default keyword arguments (besides ``num_classes`` and
            ``embedding_size``); the class's own defaults apply to the others.
        source: the papers and values behind the defaults (listings and the table of
            docs/benchmark.md).
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
        dataset_kwargs: data set name -> the keyword arguments the papers use on it instead of
            ``kwargs`` (applied over ``kwargs``).
        space: the hyper-parameter search space, name -> range, in search order: the loss's
            arguments, ``miner.<argument>`` for its miner's, :data:`PROXY_LR` for the learning
            rate of its parameters (absolute). Empty: not searched (trained with its defaults).
        mlrc_config: the file of ``powerful_benchmarker_configs/config_loss_and_miners/`` that
            holds the same search space for powerful-benchmarker, or ``None``.
        mlrc_rename: ``(argument in that file, argument here)`` pairs where the names differ.
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
    dataset_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    space: dict[str, SearchRange] = field(default_factory=dict)
    mlrc_config: str | None = None
    mlrc_rename: tuple[tuple[str, str], ...] = ()

    @property
    def class_name(self) -> str:
        """The loss class's name (``"MultiProxyAnchorLoss"``)."""
        return self.target.partition(":")[2]


def _soft_triple_regularizer(kwargs: dict[str, Any]) -> dict[str, Any]:
    """SoftTriple's center regulariser (paper eq. 10) is MPA's eq. 3: use the O(C K^2 D)
    implementation of this package instead of PML's ``SparseCentersRegularizer`` (O((CK)^2))."""
    from .regularizers import IntraClassCenterRegularizer

    kwargs = dict(kwargs)
    tau = kwargs.pop("tau", 0.2)
    # explicit overrides (e.g. --loss-param soft_triple.weight_reg_weight=0.5) win
    if "weight_regularizer" not in kwargs:
        kwargs["weight_regularizer"] = IntraClassCenterRegularizer(kwargs["centers_per_class"])
    kwargs.setdefault("weight_reg_weight", tau)
    return kwargs


# MLRC's search space of the learning rate of a loss's parameters (RMSprop lr of
# config_optimizers/proxy_lr_bayes_opt.yaml, as powerful-benchmarker's own bayes_opt configs)
_PROXY_LR_SPACE = {PROXY_LR: SearchRange(1e-6, 1.0, "log")}
_ALPHA_MARGIN_SPACE = {"alpha": SearchRange(1, 128, "log"), "margin": SearchRange(0, 0.5)}

_MPA = dict(centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1, weight_reg_weight=0.2)
_MPA_SOURCE = (
    "Saeki et al., MPA family (K=10, gamma=0.1, delta=0.1, tau=0.2; alpha=32 as Proxy-Anchor)"
)
# MPA paper: K = 2 on SOP
_MPA_DATASETS = {"sop": {"centers_per_class": 2}}
# centers_per_class stays fixed at the paper's K
_MPA_SPACE = {
    **_ALPHA_MARGIN_SPACE,
    "gamma": SearchRange(0.01, 1, "log"),
    "weight_reg_weight": SearchRange(0, 1),
    **_PROXY_LR_SPACE,
}
_VCPA_SOURCE = "VCPA paper (alpha=32, delta=0.1, tau=0.01, M=10 Newton steps)"
# the Newton steps update VCPA's proxies: no optimizer, no proxy_lr
_VCPA_SPACE = {
    "margin": SearchRange(0, 0.5),
    "alpha": SearchRange(1, 128, "log"),
    "temperature": SearchRange(1e-4, 1, "log"),
}

#: Every loss of the registry by name, in listing order.
LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec(
            "mpa",
            "pml_proxies.losses:MultiProxyAnchorLoss",
            _MPA,
            _MPA_SOURCE,
            dataset_kwargs=_MPA_DATASETS,
            space=_MPA_SPACE,
            mlrc_config="mpa.yaml",
        ),
        LossSpec(
            "mpa_dw",
            "pml_proxies.losses:DataWiseMultiProxyAnchorLoss",
            _MPA,
            _MPA_SOURCE,
            dataset_kwargs=_MPA_DATASETS,
            space=_MPA_SPACE,
            mlrc_config="mpa_dw.yaml",
        ),
        LossSpec(
            "mpa_ap",
            "pml_proxies.losses:AllPairsMultiProxyAnchorLoss",
            _MPA,
            _MPA_SOURCE,
            dataset_kwargs=_MPA_DATASETS,
            space=_MPA_SPACE,
            mlrc_config="mpa_ap.yaml",
        ),
        LossSpec(
            "proxy_isa",
            "pml_proxies.losses:ProxyISALoss",
            # its statistics (effective numbers, memory fill, weights) go to record-keeper
            {"collect_stats": True},
            "Proxy-ISA paper / authors' code (alpha=32, delta=0.1, V=100, h=0.15, k=0.9, "
            "lambda=0.1, tau=1.5, T=55000; memory from epoch 3, filter from epoch 4)",
            # the authors' commands: k = 0.4 on Cars-196, 0.1 on In-Shop
            dataset_kwargs={"cars196": {"sensitivity": 0.4}, "inshop": {"sensitivity": 0.1}},
            space={
                "margin": SearchRange(0, 0.5),
                "alpha": SearchRange(1, 128, "log"),
                "hardness_scale": SearchRange(0.01, 1),
                "sensitivity": SearchRange(0.05, 1),
                "search_margin": SearchRange(0, 0.5),
                "decay_timing": SearchRange(0.5, 3),
                **_PROXY_LR_SPACE,
            },
            mlrc_config="proxy_isa.yaml",
        ),
        LossSpec(
            "vcpa",
            "pml_proxies.losses:VCPALoss",
            {},
            _VCPA_SOURCE,
            # tau = 0.01 on CUB, 0.001 on Cars, SOP, In-Shop; no Newton steps on SOP / In-Shop
            dataset_kwargs={
                "cars196": {"temperature": 0.001},
                "sop": {"temperature": 0.001, "newton_steps": 0},
                "inshop": {"temperature": 0.001, "newton_steps": 0},
            },
            space=_VCPA_SPACE,
            mlrc_config="vcpa.yaml",
        ),
        LossSpec(
            "vcpa_damped",
            "pml_proxies.losses:VCPALoss",
            {"newton_damping": 0.25},
            "this package's variant, not the paper's: VCPA with damped Newton steps (eta=0.25; "
            "otherwise the paper's defaults alpha=32, delta=0.1, tau=0.01, M=10)",
            variant_of="vcpa",
            # the paper's temperatures; Newton steps stay on (damping needs them)
            dataset_kwargs={
                "cars196": {"temperature": 0.001},
                "sop": {"temperature": 0.001},
                "inshop": {"temperature": 0.001},
            },
            # the paper's VCPA space; newton_damping stays fixed
            space=_VCPA_SPACE,
            mlrc_config="vcpa.yaml",
        ),
        LossSpec(
            "proxy_anchor",
            "pytorch_metric_learning.losses:ProxyAnchorLoss",
            dict(margin=0.1, alpha=32),
            "Kim et al. 2020, Proxy Anchor Loss (alpha=32, delta=0.1)",
            space={
                "alpha": SearchRange(1, 128, "log"),
                "margin": SearchRange(0, 0.5),
                **_PROXY_LR_SPACE,
            },
            mlrc_config="proxy_anchor.yaml",
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
            space={
                "la": SearchRange(1, 100, "log"),
                "gamma": SearchRange(0.01, 1, "log"),
                "margin": SearchRange(0, 0.5),
                "tau": SearchRange(0, 1),
                **_PROXY_LR_SPACE,
            },
            mlrc_config="soft_triple.yaml",
            # the registry's tau is MLRC's regulariser weight (the builder's weight_reg_weight)
            mlrc_rename=(("weight_reg_weight", "tau"),),
        ),
        LossSpec(
            "proxy_nca",
            "pytorch_metric_learning.losses:ProxyNCALoss",
            dict(softmax_scale=1),
            "Movshovitz-Attias et al. 2017, No Fuss DML (no temperature: softmax_scale=1)",
            space={"softmax_scale": SearchRange(1, 100, "log"), **_PROXY_LR_SPACE},
            mlrc_config="proxy_nca.yaml",
        ),
        LossSpec(
            "multi_similarity",
            "pytorch_metric_learning.losses:MultiSimilarityLoss",
            dict(alpha=2, beta=50, base=1.0),
            "Wang et al. 2019, Multi-Similarity (alpha=2, beta=50, lambda=1; miner epsilon=0.1)",
            proxy_based=False,
            miner="pytorch_metric_learning.miners:MultiSimilarityMiner",
            miner_kwargs=dict(epsilon=0.1),
            space={
                "alpha": SearchRange(0.01, 100, "log"),
                "beta": SearchRange(0.01, 100, "log"),
                "base": SearchRange(0, 1),
                MINER_PREFIX + "epsilon": SearchRange(0, 1),
            },
            mlrc_config="multi_similarity_miner.yaml",
        ),
        LossSpec(
            "normalized_softmax",
            "pytorch_metric_learning.losses:NormalizedSoftmaxLoss",
            dict(temperature=0.05),
            "Zhai & Wu 2019, Classification is a Strong Baseline (temperature=0.05)",
            # no MLRC config: tuned with its paper default only (reported as such)
        ),
    ]
}

#: The registry's loss names, in listing order.
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def list_losses() -> list[str]:
    """The names :func:`create_loss` accepts, in listing order."""
    return list(LOSSES)


def get_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of loss ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return spec


def import_target(target: str) -> Any:
    """The object named by ``"module:attribute"``.

    Raises:
        ValueError: the module has no such attribute (e.g. an older installed version).
    """
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no {attr}: check the installed version") from None


def loss_kwargs(name: str, dataset: str | None = None, overrides: dict | None = None) -> dict:
    """The keyword arguments used for ``name``: paper defaults, then dataset defaults, then
    ``overrides``."""
    spec = get_spec(name)
    kwargs = dict(spec.kwargs)
    kwargs.update(spec.dataset_kwargs.get(dataset or "", {}))
    kwargs.update(overrides or {})
    return kwargs


def search_space(name: str) -> dict[str, SearchRange]:
    """The search space of loss ``name`` (:attr:`LossSpec.space`; empty: not searched)."""
    return dict(get_spec(name).space)


#: constructor arguments the registry sets itself (never overridable)
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
    import torch

    spec = get_spec(name)
    cls = import_target(spec.target)
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


def _convert(kind: Any, label: str, value: Any) -> Any:
    """``value`` converted to ``kind`` (see :func:`_param_kind`); ``TypeError`` / ``ValueError``
    when it is not one."""
    from .functional.validation import check_bool, check_int, check_real

    if kind is _ANY:
        return value
    if isinstance(kind, tuple):
        if value is None:
            return None
        kind = kind[0]
    if kind is int:
        if isinstance(value, float):
            raise TypeError
        return check_int(label, value)
    if kind is float:
        return check_real(label, value)
    if kind is bool:
        return check_bool(label, value)
    if not isinstance(value, str):
        raise TypeError
    return value


def convert_loss_params(name: str, overrides: Mapping[str, Any] | None) -> dict:
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
                f"loss {name!r} has no argument {arg!r}; "
                f"its arguments: {', '.join(sorted(accepted))}"
            )
        try:
            out[arg] = _convert(accepted[arg], f"loss {name!r} argument {arg!r}", value)
        except (TypeError, ValueError):
            raise ValueError(
                f"loss {name!r} argument {arg!r} expects {_type_name(accepted[arg])}, got {value!r}"
            ) from None
    return out


def effective_kwargs(name: str, dataset: str | None = None, overrides: dict | None = None) -> dict:
    """Every constructor argument the loss ``name`` gets, defaults of its class included (for
    reports): the class signature's defaults updated with :func:`loss_kwargs`."""
    kwargs = loss_kwargs(name, dataset, overrides)
    try:
        cls = import_target(LOSSES[name].target)
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
    """Build ``(loss, miner)`` for registry name ``name`` from :func:`loss_kwargs` (the overrides
    are passed as given: :func:`convert_loss_params` checks them; ``{"miner_kwargs": {...}}``
    updates the miner's arguments).

    Raises:
        ValueError: unknown name, a loss that is not available, or bad keyword arguments.
    """
    spec = get_spec(name)
    cls = import_target(spec.target)
    kwargs = loss_kwargs(name, dataset, overrides)
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
        miner = import_target(spec.miner)(**miner_kwargs)
    return loss, miner


def _check_dataset(dataset: str | None) -> None:
    if dataset is None:
        return
    from .datasets.factory import DATASET_NAMES

    if dataset not in DATASET_NAMES:
        raise ValueError(
            f"dataset must be None (the general defaults) or one of {', '.join(DATASET_NAMES)}, "
            f"got {dataset!r}"
        )


def _check_size(name: str, value: Any) -> int:
    from .functional.validation import check_int

    try:
        return check_int(name, value, low=1)
    except TypeError as e:
        raise ValueError(str(e)) from None


def create_loss(
    name: str,
    num_classes: int,
    embedding_size: int,
    dataset: str | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """The loss ``name`` with the papers' default arguments, those of ``dataset`` where the papers
    differ, then ``overrides``.

    Args:
        name: a registry name (:func:`list_losses`).
        num_classes: number of training classes (the losses that own proxies need it).
        embedding_size: dimension of the embeddings.
        dataset: the data set's name for its papers' defaults (e.g. ``"sop"``), or ``None`` for
            the general defaults (the papers' CUB-200 ones).
        **overrides: constructor arguments of the loss replacing the defaults (checked and
            converted by its signature; SoftTriple's ``tau`` is its regulariser's weight).

    Returns:
        the loss module (the miner of a loss that uses one: :func:`create_miner`).

    Raises:
        ValueError: an unknown name or data set, ``num_classes`` / ``embedding_size`` not a
            positive integer, an unknown override or one of the wrong type (the message names the
            argument).

    Example:
        >>> import pml_proxies
        >>> loss = pml_proxies.create_loss("proxy_anchor", 10, 64, margin=0.2)
        >>> (loss.alpha, loss.margin)
        (32, 0.2)
    """
    get_spec(name)
    num_classes = _check_size("num_classes", num_classes)
    embedding_size = _check_size("embedding_size", embedding_size)
    _check_dataset(dataset)
    if "miner_kwargs" in overrides:
        raise ValueError("miner_kwargs is not a loss argument: pass the miner's to create_miner")
    kwargs = convert_loss_params(name, overrides)
    loss, _ = build_loss(name, num_classes, embedding_size, dataset, kwargs)
    return loss


def create_miner(name: str, **overrides: Any) -> torch.nn.Module | None:
    """The miner that loss ``name`` is used with (its paper's arguments, then ``overrides``), or
    ``None`` for a loss without one.

    Raises:
        ValueError: an unknown name, overrides for a loss without a miner, or an unknown override.
    """
    spec = get_spec(name)
    if spec.miner is None:
        if overrides:
            raise ValueError(f"loss {name!r} has no miner: no arguments to override")
        return None
    cls = import_target(spec.miner)
    try:
        return cls(**{**spec.miner_kwargs, **overrides})
    except TypeError as e:
        raise ValueError(f"bad keyword arguments for the miner of loss {name!r}: {e}") from e


def _class_label(target: str) -> str:
    module, _, attr = target.partition(":")
    if module.startswith("pytorch_metric_learning."):
        return f"PML `{attr}`"
    return f"`{module}.{attr}`"


def _fmt_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def loss_table_markdown() -> str:
    """The registry as a Markdown table: name, class (and miner), the papers and default values
    (:attr:`LossSpec.source`), and the per-data-set arguments (the table of docs/benchmark.md)."""
    lines = [
        "| Loss | Class | Papers and defaults | Per data set |",
        "| --- | --- | --- | --- |",
    ]
    for spec in LOSSES.values():
        cls = _class_label(spec.target)
        if spec.miner is not None:
            cls += f" + {_class_label(spec.miner)} ({_fmt_kwargs(spec.miner_kwargs)})"
        per_dataset = "; ".join(f"{d}: {_fmt_kwargs(kw)}" for d, kw in spec.dataset_kwargs.items())
        lines.append(f"| `{spec.name}` | {cls} | {spec.source} | {per_dataset or '-'} |")
    return "\n".join(lines)
