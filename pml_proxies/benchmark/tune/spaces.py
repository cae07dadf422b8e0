"""Search spaces of the tuned benchmark: the library registry's (:mod:`pml_proxies.registry`,
:attr:`~pml_proxies.registry.LossSpec.space`), or those of an MLRC configs folder.

Each registry space mirrors the YAML file of
``powerful_benchmarker_configs/config_loss_and_miners/`` named by its
:attr:`~pml_proxies.registry.LossSpec.mlrc_config` (the tests check that they agree), so that
powerful-benchmarker searches the same ranges. Given a configs folder (``--configs`` or
``$PML_PROXIES_MLRC_CONFIGS``), the spaces are read from its YAML files instead: every
``~BAYESIAN~`` / ``~LOG_BAYESIAN~`` / ``~INT_BAYESIAN~`` range (loss kwargs, nested kwargs, miner
kwargs) becomes a :class:`SpaceEntry`; the YAML's other keys are fixed settings of the MLRC
experiments (embedding size, centers per class, ...) and are left to the benchmark's protocol and
the registry's paper defaults. A loss whose YAML says
``Use with --config_optimizers [..., proxy_lr_bayes_opt]`` also gets the proxy learning rate of
``config_optimizers/proxy_lr_bayes_opt.yaml`` (an absolute lr, entry ``proxy_lr``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...functional.validation import check_real
from ...registry import MINER_PREFIX, PROXY_LR, check_range
from ..losses import LOSS_NAMES, LOSSES

#: environment variable naming the ``powerful_benchmarker_configs`` folder
CONFIGS_ENV = "PML_PROXIES_MLRC_CONFIGS"
CONFIGS_DIRNAME = "powerful_benchmarker_configs"
PROXY_LR_YAML = "config_optimizers/proxy_lr_bayes_opt.yaml"
#: source of the entries of the registry's spaces
REGISTRY_SOURCE = "registry"

_MARKERS = {"~BAYESIAN~": "float", "~LOG_BAYESIAN~": "log", "~INT_BAYESIAN~": "int"}
_OPTIMIZERS_COMMENT = re.compile(r"--config_optimizers\s*\[([^\]]*)\]")


@dataclass(frozen=True)
class LossConfig:
    """How one registry loss reads its MLRC config.

    Attributes:
        yaml: file name in ``config_loss_and_miners/``.
        loss_class: the class key under ``loss_funcs~OVERRIDE~.metric_loss``.
        rename: YAML kwarg path (dotted for nested kwargs) -> registry kwarg name, where they
            differ; miner kwargs are named ``miner.<kwarg>``.
    """

    yaml: str
    loss_class: str
    rename: tuple[tuple[str, str], ...] = ()


#: registry name -> its MLRC config, or ``None`` for "no space" (a view of the registry's
#: :attr:`~pml_proxies.registry.LossSpec.mlrc_config` and ``mlrc_rename``).
LOSS_CONFIGS: dict[str, LossConfig | None] = {
    name: (
        LossConfig(spec.mlrc_config, spec.class_name, spec.mlrc_rename)
        if spec.mlrc_config is not None
        else None
    )
    for name, spec in LOSSES.items()
}


@dataclass(frozen=True)
class SpaceEntry:
    """One searched hyper-parameter.

    Attributes:
        name: registry kwarg of the loss, ``miner.<kwarg>`` for its miner, or ``proxy_lr``
            (absolute learning rate of the loss's parameters).
        low, high: the range (inclusive).
        kind: ``"float"`` (uniform), ``"log"`` (log-uniform) or ``"int"``.
        source: where the range comes from (``"<yaml>:<key>"`` or ``"--space"``).
    """

    name: str
    low: float
    high: float
    kind: str = "float"
    source: str = ""

    @property
    def log(self) -> bool:
        return self.kind == "log"

    def describe(self) -> str:
        scale = {"log": "log", "int": "int", "float": "uniform"}[self.kind]
        return f"{self.name} in [{self.low:g}, {self.high:g}] ({scale}; {self.source})"


# ------------------------------------------------------------------ finding the configs
def configs_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The ``powerful_benchmarker_configs`` folder: ``explicit``, else ``$PML_PROXIES_MLRC_CONFIGS``,
    else the one beside the ``pml_proxies`` package (a source checkout or an editable install).

    Raises:
        FileNotFoundError: none found (e.g. a wheel install: pass ``--configs``).
    """
    candidates = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get(CONFIGS_ENV):
        candidates.append(Path(os.environ[CONFIGS_ENV]))
    else:
        candidates.append(Path(__file__).resolve().parents[3] / CONFIGS_DIRNAME)
    for path in candidates:
        if (path / "config_loss_and_miners").is_dir():
            return path
    raise FileNotFoundError(
        f"no {CONFIGS_DIRNAME}/ folder with config_loss_and_miners/ at {candidates[0]}; the "
        f"search spaces live in the repository's {CONFIGS_DIRNAME}/ (not in the wheel): pass "
        f"--configs DIR or set {CONFIGS_ENV}"
    )


def _load_yaml(path: Path) -> tuple[dict, str]:
    import yaml

    text = path.read_text()
    return yaml.safe_load(text) or {}, text


# ------------------------------------------------------------------ parsing the ranges
def _ranges(node: Any, prefix: str = "") -> list[tuple[str, str, list]]:
    """Every ``(dotted path, kind, [low, high])`` under ``node`` (a YAML mapping)."""
    out: list[tuple[str, str, list]] = []
    if not isinstance(node, dict):
        return out
    for key, value in node.items():
        key = str(key)
        marker = next((m for m in _MARKERS if key.endswith(m)), None)
        if marker is not None:
            name = key[: -len(marker)]
            if not (isinstance(value, list) and len(value) == 2):
                raise ValueError(f"{prefix}{key}: a range must be [low, high], got {value!r}")
            out.append((prefix + name, _MARKERS[marker], value))
        elif isinstance(value, dict):
            out.extend(_ranges(value, f"{prefix}{key}."))
    return out


def _entry(name: str, kind: str, bounds: list, source: str) -> SpaceEntry:
    low = check_real(f"{source} low", bounds[0])
    high = check_real(f"{source} high", bounds[1])
    return make_entry(name, low, high, kind, source)


def make_entry(name: str, low: float, high: float, kind: str, source: str) -> SpaceEntry:
    """A checked :class:`SpaceEntry` (``ValueError`` naming ``source`` when the range is bad)."""
    check_range(low, high, kind, source)
    return SpaceEntry(name, float(low), float(high), kind, source)


def uses_proxy_lr_space(yaml_text: str) -> bool:
    """Whether a loss YAML's ``Use with --config_optimizers [...]`` comment lists
    ``proxy_lr_bayes_opt`` (the loss's parameters are trained by an optimizer)."""
    match = _OPTIMIZERS_COMMENT.search(yaml_text)
    return match is not None and "proxy_lr_bayes_opt" in match.group(1)


def loss_space(name: str, configs: str | os.PathLike | None = None) -> list[SpaceEntry]:
    """The search space of registry loss ``name`` (empty for a loss without one): the
    registry's, or, with a configs folder (``configs``, else ``$PML_PROXIES_MLRC_CONFIGS``), the
    one of its MLRC config there (empty for a loss with no MLRC config).

    Raises:
        ValueError: unknown loss, a YAML without the mapped class, or a YAML range the mapping
            table cannot place.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
    if configs is None and not os.environ.get(CONFIGS_ENV):
        return [
            make_entry(key, r.low, r.high, r.kind, REGISTRY_SOURCE)
            for key, r in LOSSES[name].space.items()
        ]
    cfg = LOSS_CONFIGS.get(name)
    if cfg is None:
        return []
    root = configs_dir(configs)
    doc, text = _load_yaml(root / "config_loss_and_miners" / cfg.yaml)
    losses = (doc.get("loss_funcs~OVERRIDE~") or {}).get("metric_loss") or {}
    if cfg.loss_class not in losses:
        raise ValueError(f"{cfg.yaml}: no {cfg.loss_class} under loss_funcs~OVERRIDE~.metric_loss")
    rename = dict(cfg.rename)
    entries = []
    for path, kind, bounds in _ranges(losses[cfg.loss_class]):
        entries.append(_entry(rename.get(path, path), kind, bounds, f"{cfg.yaml}:{path}"))
    for miner in ((doc.get("mining_funcs~OVERRIDE~") or {}).values()) or []:
        for miner_class, kwargs in (miner or {}).items():
            for path, kind, bounds in _ranges(kwargs):
                key = MINER_PREFIX + path
                if LOSSES[name].miner is None:
                    raise ValueError(f"{cfg.yaml}: {miner_class} ranges but {name} has no miner")
                entries.append(_entry(rename.get(key, key), kind, bounds, f"{cfg.yaml}:{key}"))
    if uses_proxy_lr_space(text):
        opt, _ = _load_yaml(root / PROXY_LR_YAML)
        found = _ranges(opt)
        if len(found) != 1 or not found[0][0].endswith(".lr"):
            raise ValueError(f"{PROXY_LR_YAML}: expected exactly one lr range, got {found}")
        _, kind, bounds = found[0]
        entries.append(_entry(PROXY_LR, kind, bounds, PROXY_LR_YAML))
    return entries


def parse_space_overrides(items: list[str] | None) -> dict[str, dict[str, SpaceEntry]]:
    """``["mpa.margin=0:0.3", "vcpa.temperature=1e-4:1e-1:log"]`` -> ``{loss: {arg: entry}}``.

    The optional third field is ``log``, ``int`` or ``float`` (default).
    """
    out: dict[str, dict[str, SpaceEntry]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        loss, dot, arg = key.strip().partition(".")
        parts = value.split(":")
        if not sep or not dot or not arg or len(parts) not in (2, 3):
            raise ValueError(f"--space expects LOSS.ARG=low:high[:log|int], got {item!r}")
        if loss not in LOSSES:
            raise ValueError(f"--space {item!r}: unknown loss {loss!r}")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"--space {item!r}: low and high must be numbers") from None
        # no third field: keep the YAML's scale (e.g. log for alpha), uniform for a new entry
        kind = parts[2] if len(parts) == 3 else ""
        make_entry(arg, low, high, kind or "float", f"--space {item}")
        out.setdefault(loss, {})[arg] = SpaceEntry(arg, low, high, kind, f"--space {item}")
    return out


def resolve_spaces(
    losses: list[str],
    overrides: dict[str, dict[str, SpaceEntry]] | None = None,
    configs: str | os.PathLike | None = None,
) -> dict[str, list[SpaceEntry]]:
    """Per loss: its YAML space, with ``--space`` overrides replacing (or adding) entries.

    An override of ``proxy_lr`` for a loss without trainable parameters, and one naming an
    argument the loss does not have (or with a range of the wrong type, e.g. a real range for an
    integer argument) are refused (``ValueError``): every trial would fail.
    """
    overrides = overrides or {}
    for loss in overrides:
        if loss not in losses:
            raise ValueError(f"--space names {loss!r}, which is not among the tuned losses")
    out = {}
    for loss in losses:
        entries = {e.name: e for e in loss_space(loss, configs)}
        for arg, entry in overrides.get(loss, {}).items():
            if arg == PROXY_LR and not LOSSES[loss].proxy_based:
                raise ValueError(f"--space {loss}.{PROXY_LR}: {loss} has no trainable parameters")
            old = entries.get(arg)
            kind = entry.kind or (old.kind if old is not None else "float")
            entries[arg] = make_entry(arg, entry.low, entry.high, kind, entry.source)
            _check_loss_argument(loss, entries[arg])
        out[loss] = list(entries.values())
    return out


def _check_loss_argument(loss: str, entry: SpaceEntry) -> None:
    """Refuse an entry the loss's constructor would refuse at every trial (checked with the
    range's midpoint, through the benchmark's ``--loss-param`` check); miner arguments are
    passed as given."""
    from ..losses import convert_loss_params

    mid = (entry.low + entry.high) / 2
    loss_kwargs, _ = split_params({entry.name: round(mid) if entry.kind == "int" else mid})
    try:
        convert_loss_params(loss, loss_kwargs)
    except ValueError as e:
        raise ValueError(f"{entry.source}: {e}") from None


def format_spaces(spaces: dict[str, list[SpaceEntry]]) -> str:
    """Readable listing of ``spaces`` (``--list-spaces``)."""
    lines = []
    for loss, entries in spaces.items():
        cfg = LOSS_CONFIGS.get(loss)
        if not entries:
            why = "no MLRC config" if cfg is None else "no range in its config"
            lines.append(f"{loss}: no space ({why}: trained with its paper defaults)")
            continue
        lines.append(f"{loss}: ({cfg.yaml if cfg else '--space only'})")
        lines.extend(f"    {e.describe()}" for e in entries)
    return "\n".join(lines)


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """Trial params -> (registry overrides of the loss, with miner kwargs under
    ``miner_kwargs``; absolute proxy lr or ``None``)."""
    loss_kwargs: dict[str, Any] = {}
    miner_kwargs: dict[str, Any] = {}
    proxy_lr = None
    for key, value in params.items():
        if key == PROXY_LR:
            proxy_lr = float(value)
        elif key.startswith(MINER_PREFIX):
            miner_kwargs[key[len(MINER_PREFIX) :]] = value
        else:
            loss_kwargs[key] = value
    if miner_kwargs:
        loss_kwargs["miner_kwargs"] = miner_kwargs
    return loss_kwargs, proxy_lr
