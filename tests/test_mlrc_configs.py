"""powerful_benchmarker_configs/: every YAML parses and names only classes that exist.

Runs in the core environment (yaml + PML + this package); the classes of powerful-benchmarker
itself (split managers, aggregators, ...) are checked only where it is installed.
"""

import importlib
import inspect
import os
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "powerful_benchmarker_configs"
YAMLS = sorted(CONFIGS.rglob("*.yaml"))
MODIFIER = re.compile(r"~(OVERRIDE|APPLY|SWAP|DELETE|BAYESIAN|LOG_BAYESIAN|INT_BAYESIAN)~\d*$")
# where powerful-benchmarker looks up each config key's classes (besides its own modules)
KEY_KINDS = {
    "loss_funcs": "loss",
    "mining_funcs": "miner",
    "weight_regularizer": "regularizer",
    "sampler": "sampler",
    "tester": "tester",
    "accuracy_calculator": "accuracy_calculator",
    "trainer": "trainer",
    "hook_container": "hook_container",
    "dataset": "dataset",
    "split_manager": "split_manager",
    "aggregator": "aggregator",
    "ensemble": "ensemble",
    "optimizers": "optimizer",
    "models": "model",
}


def strip(key):
    return MODIFIER.sub("", str(key))


def modules_for(kind):
    import torch
    from pytorch_metric_learning import losses, miners, regularizers, samplers, testers, trainers
    from pytorch_metric_learning.utils import accuracy_calculator, logging_presets

    import pml_proxies.losses
    import pml_proxies.mlrc
    import pml_proxies.regularizers

    table = {
        "loss": [losses, pml_proxies.losses],
        "miner": [miners],
        "regularizer": [regularizers, pml_proxies.regularizers],
        "sampler": [samplers],
        "tester": [testers],
        "accuracy_calculator": [accuracy_calculator],
        "trainer": [trainers],
        "hook_container": [logging_presets],
        "optimizer": [torch.optim],
        "model": [pml_proxies.mlrc],
        "dataset": [pml_proxies.mlrc],
    }
    mods = list(table.get(kind, []))
    pb_names = {
        "dataset": "datasets",
        "split_manager": "split_managers",
        "aggregator": "aggregators",
        "ensemble": "ensembles",
        "model": "architectures.misc_models",
    }
    if kind in pb_names:
        try:
            mods.append(importlib.import_module(f"powerful_benchmarker.{pb_names[kind]}"))
        except ImportError:
            return None  # checked only where powerful-benchmarker is installed
    return mods


def class_specs(node, kind=None, path=()):
    """Yield (kind, class name, kwargs, path) for every ``{ClassName: {kwargs}}`` spec."""
    if not isinstance(node, dict):
        return
    for raw_key, value in node.items():
        key = strip(raw_key)
        if kind is not None:
            yield kind, key, value or {}, path + (key,)
            for sub_key, sub_value in (value or {}).items():
                sub = strip(sub_key)
                if sub in KEY_KINDS and isinstance(sub_value, dict):
                    yield from class_specs(sub_value, KEY_KINDS[sub], path + (key, sub))
        elif key in ("loss_funcs", "mining_funcs", "optimizers", "models"):
            for name, spec in (value or {}).items():
                yield from class_specs(spec, KEY_KINDS[key], path + (key, strip(name)))
        elif key in KEY_KINDS and isinstance(value, dict):
            yield from class_specs(value, KEY_KINDS[key], path + (key,))


def test_config_tree_is_complete():
    names = {p.relative_to(CONFIGS).as_posix() for p in YAMLS}
    for loss in ["mpa", "mpa_dw", "mpa_ap", "proxy_isa", "vcpa", "proxy_anchor"]:
        assert f"config_loss_and_miners/{loss}.yaml" in names
        assert f"config_loss_and_miners/{loss}_fixed.yaml" in names
    for baseline in ["contrastive", "proxy_nca", "multi_similarity_miner", "soft_triple"]:
        assert f"config_loss_and_miners/{baseline}.yaml" in names
    for dataset in ["cub200", "cars196", "sop"]:
        assert f"config_dataset/{dataset}.yaml" in names
        assert f"config_general/{dataset}.yaml" in names
    assert "config_eval/default.yaml" in names
    assert "config_optimizers/proxy_lr_bayes_opt.yaml" in names


def test_every_registry_loss_config_exists():
    from pml_proxies.registry import LOSSES

    names = {p.relative_to(CONFIGS).as_posix() for p in YAMLS}
    for spec in LOSSES.values():
        if spec.mlrc_config is not None:
            assert f"config_loss_and_miners/{spec.mlrc_config}" in names, spec.name


def _registry_loss_configs():
    """(registry name, YAML path) of each paper's loss of the registry: its search config and
    its paper-defaults config ``*_fixed.yaml`` where there is one (variants share the paper's)."""
    from pml_proxies.registry import LOSSES

    out = []
    for spec in LOSSES.values():
        if spec.mlrc_config is None or spec.variant_of is not None:
            continue
        search = CONFIGS / "config_loss_and_miners" / spec.mlrc_config
        fixed = search.with_name(f"{search.stem}_fixed.yaml")
        out += [(spec.name, p) for p in (search, fixed) if p.is_file()]
    return out


@pytest.mark.parametrize(
    "name, path", _registry_loss_configs(), ids=[p.name for _, p in _registry_loss_configs()]
)
def test_fixed_loss_settings_are_the_registry_defaults(name, path):
    """Every fixed scalar argument of a loss's MLRC config (the paper's defaults in
    ``*_fixed.yaml``, the settings a search keeps fixed) is the registry's default for that loss
    (CUB-200's; the configs' comments say how to set the other data sets')."""
    from pml_proxies.registry import LOSSES, effective_kwargs

    spec = LOSSES[name]
    kwargs = yaml.safe_load(path.read_text())["loss_funcs~OVERRIDE~"]["metric_loss"]
    defaults = effective_kwargs(name)
    rename = dict(spec.mlrc_rename)
    checked = []
    for key, value in kwargs[spec.class_name].items():
        key = str(key)
        if MODIFIER.search(key) or isinstance(value, dict) or key == "embedding_size":
            continue  # ranges, objects (regularisers), the protocol's embedding size
        arg = rename.get(key, key)
        assert arg in defaults and defaults[arg] == value, (path.name, key, value)
        checked.append(arg)
    assert checked or not path.stem.endswith("_fixed"), f"{path.name} fixes no argument"


@pytest.mark.parametrize("path", YAMLS, ids=[p.relative_to(CONFIGS).as_posix() for p in YAMLS])
def test_yaml_names_existing_classes_with_valid_arguments(path):
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict) and config, f"{path} is empty"
    for kind, name, kwargs, where in class_specs(config):
        modules = modules_for(kind)
        if modules is None:
            continue
        cls = next((getattr(m, name) for m in modules if hasattr(m, name)), None)
        assert cls is not None, f"{path.name}: {'/'.join(where)} names unknown {kind} {name}"
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()) and kind != "loss":
            continue
        accepted = set(params)
        # PML losses take their base classes' keyword arguments through **kwargs
        for base in inspect.getmro(cls)[1:]:
            if "__init__" in vars(base):
                accepted |= set(inspect.signature(base.__init__).parameters)
        for arg in kwargs:
            arg = strip(arg)
            assert arg in accepted, f"{path.name}: {name} has no argument {arg!r}"


@pytest.mark.parametrize("path", YAMLS, ids=[p.relative_to(CONFIGS).as_posix() for p in YAMLS])
def test_search_spaces_are_valid_ranges(path):
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if str(key).endswith(("~BAYESIAN~", "~LOG_BAYESIAN~", "~INT_BAYESIAN~")):
                    assert isinstance(value, list) and len(value) == 2, (path.name, key)
                    low, high = value
                    assert low < high, (path.name, key)
                    if "~LOG_" in key:
                        assert low > 0, (path.name, key)
                else:
                    walk(value)

    walk(yaml.safe_load(path.read_text()))


def test_proxy_learning_rate_search_space_is_mlrc():
    config = yaml.safe_load((CONFIGS / "config_optimizers/proxy_lr_bayes_opt.yaml").read_text())
    rms = config["optimizers"]["metric_loss_optimizer"]["RMSprop"]
    assert rms["lr~LOG_BAYESIAN~"] == [1e-6, 1]


def test_eval_config_uses_max_bin_count():
    config = yaml.safe_load((CONFIGS / "config_eval/default.yaml").read_text())
    calc = config["tester"]["GlobalEmbeddingSpaceTester"]["accuracy_calculator"]
    assert calc["AccuracyCalculator"]["k"] == "max_bin_count"


def test_core_package_does_not_import_powerful_benchmarker():
    import subprocess
    import sys

    code = (
        "import sys, pml_proxies, pml_proxies.mlrc, pml_proxies.mlrc.launcher, "
        "pml_proxies.mlrc.report, pml_proxies.mlrc.shims\n"
        "assert 'powerful_benchmarker' not in sys.modules\n"
        "assert 'ax' not in sys.modules"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
