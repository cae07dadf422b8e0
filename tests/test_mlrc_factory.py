"""Every loss config of powerful_benchmarker_configs/ builds through powerful-benchmarker's own loss
and miner factories (with the launcher's registrations and shims) and trains one step.

Skipped where powerful-benchmarker is not installed (the core environment).
"""

import math
import os
from pathlib import Path

import pytest

if os.environ.get("PML_PROXIES_REQUIRE_MLRC"):
    import powerful_benchmarker  # noqa: F401
else:
    pytest.importorskip("powerful_benchmarker")

import torch  # noqa: E402
import yaml  # noqa: E402

from pml_proxies.mlrc import launcher, shims  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "powerful_benchmarker_configs"
LOSS_CONFIGS = sorted((CONFIGS / "config_loss_and_miners").glob("*.yaml"))
SEARCH = ("~LOG_BAYESIAN~", "~INT_BAYESIAN~", "~BAYESIAN~")


def resolve(node):
    """Drop the ~OVERRIDE~ markers and put each search range's midpoint (geometric on log
    scales) in its place, as one Bayesian-optimisation trial would."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        key = str(key).replace("~OVERRIDE~", "")
        for keyword in SEARCH:
            if key.endswith(keyword):
                low, high = value
                if keyword == "~LOG_BAYESIAN~":
                    value = math.sqrt(low * high)
                elif keyword == "~INT_BAYESIAN~":
                    value = (low + high) // 2
                else:
                    value = (low + high) / 2
                key = key[: -len(keyword)]
                break
        out[key] = resolve(value)
    return out


@pytest.fixture(scope="module")
def getter(tmp_path_factory):
    from powerful_benchmarker.runners.single_experiment_runner import SingleExperimentRunner

    shims.apply()
    runner = SingleExperimentRunner(root_config_folder=str(tmp_path_factory.mktemp("cfg")))
    launcher.register_pml_proxies(runner)
    return runner.pytorch_getter


@pytest.mark.parametrize("path", LOSS_CONFIGS, ids=[p.stem for p in LOSS_CONFIGS])
def test_loss_config_builds_and_trains_one_step(getter, path):
    from powerful_benchmarker.factories import LossFactory, MinerFactory

    config = resolve(yaml.safe_load(path.read_text()))
    num_classes, batch = 6, 24
    loss_funcs = LossFactory(getter=getter).create(
        named_specs=config["loss_funcs"], kwargs={"num_classes": num_classes}
    )
    miners = MinerFactory(getter=getter).create(named_specs=config["mining_funcs"])
    loss = loss_funcs["metric_loss"]
    regularizer = getattr(loss, "weight_regularizer", None)
    if regularizer is not None:
        # the launcher hands the loss's class count and centers per class to the regulariser
        mask = getattr(regularizer, "same_class_mask", None)  # PML's SparseCentersRegularizer
        if mask is not None:
            rows = loss.num_classes * loss.centers_per_class
            assert tuple(mask.shape) == (rows, rows)
        elif hasattr(regularizer, "centers_per_class"):  # IntraClassCenterRegularizer
            assert regularizer.centers_per_class == loss.centers_per_class

    torch.manual_seed(0)
    embeddings = torch.randn(batch, 128, requires_grad=True)
    labels = torch.arange(batch) % num_classes
    loss.train()
    if hasattr(loss, "set_epoch"):
        loss.set_epoch(1)
    indices_tuple = None
    if "tuple_miner" in miners:
        indices_tuple = miners["tuple_miner"](embeddings, labels)
    value = loss(embeddings, labels, indices_tuple)
    value.backward()
    assert torch.isfinite(value)
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()


def test_merged_config_folder_lays_ours_over_the_packaged_one(tmp_path):
    merged = launcher.merge_config_folders(
        [launcher.packaged_configs_folder(), launcher.default_configs_folder()], tmp_path
    )
    eval_config = yaml.safe_load((merged / "config_eval" / "default.yaml").read_text())
    calc = eval_config["tester"]["GlobalEmbeddingSpaceTester"]["accuracy_calculator"]
    assert calc["AccuracyCalculator"]["k"] == "max_bin_count"  # ours replaced the packaged file
    assert (merged / "config_foldernames.yaml").is_file()  # packaged files are kept
    assert (merged / "config_optimizers" / "with_metric_loss_optimizer_bayes_opt.yaml").is_file()
    assert (merged / "config_loss_and_miners" / "mpa.yaml").is_file()
