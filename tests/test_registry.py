"""The library registry of losses (pml_proxies.registry): create_loss for every loss, its papers'
defaults per data set, its errors, and the consistency of the registry's data."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning.losses import (
    MultiSimilarityLoss,
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
)
from pytorch_metric_learning.miners import MultiSimilarityMiner

import pml_proxies
from pml_proxies import registry
from pml_proxies.datasets.factory import DATASET_NAMES
from pml_proxies.losses import (
    AllPairsMultiProxyAnchorLoss,
    DataWiseMultiProxyAnchorLoss,
    MultiProxyAnchorLoss,
    ProxyISALoss,
    VCPALoss,
)
from pml_proxies.regularizers import IntraClassCenterRegularizer

ROOT = Path(__file__).resolve().parents[1]
C, D = 5, 8

# The papers' numbers, written by hand (the table of docs/benchmark.md): what each loss is built
# with by direct construction, per data set, independent of the registry's data.
_MPA = dict(centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1, weight_reg_weight=0.2)
_VCPA_CARS = dict(temperature=0.001)
_VCPA_SOP = dict(temperature=0.001, newton_steps=0)
PAPERS = {
    "mpa": (MultiProxyAnchorLoss, _MPA, {"sop": dict(centers_per_class=2)}),
    "mpa_dw": (DataWiseMultiProxyAnchorLoss, _MPA, {"sop": dict(centers_per_class=2)}),
    "mpa_ap": (AllPairsMultiProxyAnchorLoss, _MPA, {"sop": dict(centers_per_class=2)}),
    "proxy_isa": (
        ProxyISALoss,
        dict(collect_stats=True),
        {"cars196": dict(sensitivity=0.4), "inshop": dict(sensitivity=0.1)},
    ),
    "vcpa": (VCPALoss, {}, {"cars196": _VCPA_CARS, "sop": _VCPA_SOP, "inshop": _VCPA_SOP}),
    "vcpa_damped": (
        VCPALoss,
        dict(newton_damping=0.25),
        {"cars196": _VCPA_CARS, "sop": _VCPA_CARS, "inshop": _VCPA_CARS},
    ),
    "proxy_anchor": (ProxyAnchorLoss, dict(margin=0.1, alpha=32), {}),
    "soft_triple": (
        SoftTripleLoss,
        dict(centers_per_class=10, la=20, gamma=0.1, margin=0.01, weight_reg_weight=0.2),
        {},
    ),
    "proxy_nca": (ProxyNCALoss, dict(softmax_scale=1), {}),
    "multi_similarity": (MultiSimilarityLoss, dict(alpha=2, beta=50, base=1.0), {}),
    "normalized_softmax": (NormalizedSoftmaxLoss, dict(temperature=0.05), {}),
}


def _direct(name: str, dataset: str | None) -> torch.nn.Module:
    cls, kwargs, per_dataset = PAPERS[name]
    kwargs = {**kwargs, **per_dataset.get(dataset or "", {})}
    if name == "soft_triple":  # its center regulariser (MPA's eq. 3, as the registry builds it)
        kwargs["weight_regularizer"] = IntraClassCenterRegularizer(kwargs["centers_per_class"])
    if name == "multi_similarity":
        return cls(**kwargs)
    return cls(num_classes=C, embedding_size=D, **kwargs)


def _scalars(module: torch.nn.Module) -> dict:
    """The hyper-parameters a loss keeps as plain attributes (and its regulariser's type)."""
    out = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str))}
    out["regularizer"] = type(getattr(module, "weight_regularizer", None)).__name__
    return out


def test_every_registry_loss_has_its_papers_numbers_here():
    assert list(PAPERS) == pml_proxies.list_losses() == list(registry.LOSSES)


@pytest.mark.parametrize("dataset", [None, "cub200", "cars196", "sop", "inshop", "omniglot"])
@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_create_loss_equals_direct_construction_with_the_papers_numbers(name, dataset):
    torch.manual_seed(0)
    built = pml_proxies.create_loss(name, C, D, dataset=dataset)
    torch.manual_seed(0)
    direct = _direct(name, dataset)
    assert type(built) is type(direct)
    assert _scalars(built) == _scalars(direct)
    # same class, arguments and seed: the same initialisation ops in the same order
    built_state, direct_state = built.state_dict(), direct.state_dict()
    assert list(built_state) == list(direct_state)
    for key, value in built_state.items():
        assert torch.equal(value, direct_state[key]), key


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_create_loss_forward_backward(name, dtype):
    torch.manual_seed(0)
    loss = pml_proxies.create_loss(name, C, D).to(dtype)
    miner = pml_proxies.create_miner(name)
    assert (miner is not None) == (registry.LOSSES[name].miner is not None)
    if hasattr(loss, "set_epoch"):
        loss.set_epoch(1)
    labels = torch.arange(C).repeat_interleave(4)
    emb = torch.randn(len(labels), D, dtype=dtype, requires_grad=True)
    value = loss(emb, labels, miner(emb, labels) if miner is not None else None)
    assert value.dim() == 0 and value.dtype == dtype and torch.isfinite(value)
    value.backward()
    assert emb.grad is not None and emb.grad.dtype == dtype
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_overrides_win_over_paper_and_dataset_defaults_and_are_converted():
    loss = pml_proxies.create_loss("mpa", C, D, dataset="sop", centers_per_class=3, alpha=16)
    assert loss.centers_per_class == 3
    assert loss.alpha == 16.0 and isinstance(loss.alpha, float)  # a real argument
    assert pml_proxies.create_loss("mpa", C, D).centers_per_class == 10
    # SoftTriple's tau is its regulariser's weight; an explicit weight wins
    assert pml_proxies.create_loss("soft_triple", C, D, tau=0.3).weight_reg_weight == 0.3
    loss = pml_proxies.create_loss("soft_triple", C, D, weight_reg_weight=0.5)
    assert loss.weight_reg_weight == 0.5
    assert pml_proxies.create_loss("vcpa", C, D, dataset="sop", newton_steps=2).newton_steps == 2
    miner = pml_proxies.create_miner("multi_similarity", epsilon=0.3)
    assert isinstance(miner, MultiSimilarityMiner) and miner.epsilon == 0.3
    assert pml_proxies.create_miner("mpa") is None


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("nope", C, D), {}, r"unknown loss 'nope'; choose from mpa, mpa_dw, .*normalized_softmax"),
        (("mpa", C, D), {"not_an_arg": 1}, r"loss 'mpa' has no argument 'not_an_arg'"),
        (("mpa", C, D), {"alpha": "big"}, r"'alpha' expects a real number"),
        (("mpa", C, D), {"centers_per_class": 2.5}, r"'centers_per_class' expects an integer"),
        (("mpa", 0, D), {}, r"num_classes must be an integer >= 1"),
        (("mpa", "5", D), {}, r"num_classes must be an integer"),
        (("mpa", True, D), {}, r"num_classes must be an integer"),
        (("mpa", C, 2.5), {}, r"embedding_size must be an integer"),
        (("mpa", C, -1), {}, r"embedding_size must be an integer >= 1"),
        (("mpa", C, D, "cars"), {}, r"dataset must be None .* or one of .*cars196"),
        (("multi_similarity", C, D), {"miner_kwargs": {}}, r"miner_kwargs .* create_miner"),
    ],
)
def test_create_loss_errors_name_the_argument(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pml_proxies.create_loss(*args, **kwargs)


def test_create_miner_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        pml_proxies.create_miner("nope")
    with pytest.raises(ValueError, match="'mpa' has no miner"):
        pml_proxies.create_miner("mpa", epsilon=0.1)
    with pytest.raises(ValueError, match="bad keyword arguments for the miner"):
        pml_proxies.create_miner("multi_similarity", not_an_arg=1)


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_registry_data_is_consistent(name):
    spec = registry.LOSSES[name]
    assert spec.name == name
    accepted = registry.loss_parameters(name)
    for key in spec.kwargs:
        assert key in accepted, key
    for dataset, kwargs in spec.dataset_kwargs.items():
        assert dataset in DATASET_NAMES, dataset
        assert set(kwargs) <= set(accepted), (dataset, kwargs)
    for key in spec.space:
        if key == registry.PROXY_LR:
            assert spec.proxy_based  # a learning rate needs trainable parameters
        elif key.startswith(registry.MINER_PREFIX):
            assert spec.miner is not None
        else:
            assert key in accepted, key
    assert spec.variant_of is None or registry.LOSSES[spec.variant_of].variant_of is None
    assert list(registry.search_space(name)) == list(spec.space)


@pytest.mark.parametrize(
    "low, high, kind, message",
    [
        (1, 0, "float", "must be <="),
        (0, 1, "log", "log range needs low > 0"),
        (0.5, 2, "int", "int range needs integer bounds"),
        (0, float("inf"), "float", "finite"),
        (0, 1, "cubic", "kind must be float, log or int"),
    ],
)
def test_search_range_refuses_bad_ranges(low, high, kind, message):
    with pytest.raises(ValueError, match=message):
        registry.SearchRange(low, high, kind)


def test_loss_table_markdown_has_one_row_per_loss():
    lines = registry.loss_table_markdown().splitlines()
    assert lines[0].startswith("| Loss | Class |") and len(lines) == 2 + len(registry.LOSSES)
    for line, spec in zip(lines[2:], registry.LOSSES.values()):
        assert line.startswith(f"| `{spec.name}` |") and spec.class_name in line
        assert spec.source in line
        for dataset in spec.dataset_kwargs:
            assert f"{dataset}: " in line
    row = next(line for line in lines if line.startswith("| `multi_similarity`"))
    assert "PML `MultiSimilarityMiner` (epsilon=0.1)" in row


def test_docstring_examples():
    result = doctest.testmod(registry)
    assert result.attempted >= 2 and result.failed == 0


def test_registry_import_is_cheap():
    """``import pml_proxies`` and listing the losses load neither torch nor the losses."""
    code = (
        "import sys, pml_proxies\n"
        "names = pml_proxies.list_losses()\n"
        "assert 'mpa' in names, names\n"
        "heavy = [m for m in ('torch', 'pytorch_metric_learning', 'pml_proxies.losses')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_benchmark_losses_are_the_registry():
    from pml_proxies.benchmark import losses as bench

    assert bench.LOSSES is registry.LOSSES and bench.LOSS_NAMES == registry.LOSS_NAMES
    assert bench.build_loss is registry.build_loss
    assert bench.DATASET_DEFAULTS == {
        n: s.dataset_kwargs for n, s in registry.LOSSES.items() if s.dataset_kwargs
    }


def test_the_docs_loss_table_is_the_registrys():
    """docs/benchmark.md holds a copy of the generated table (a static site cannot run code):
    regenerate it with ``loss_table_markdown()`` when a loss or a default changes."""
    from pathlib import Path

    from pml_proxies.registry import loss_table_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "benchmark.md").read_text()
    table = page.split("<!-- registry table: start -->\n")[1].split(
        "\n<!-- registry table: end -->"
    )[0]
    assert table == loss_table_markdown().strip()
