"""Configuration of a benchmark (one protocol shared by every loss).

:class:`BenchmarkConfig` is the one source of truth of the benchmark's settings: each field's
metadata (:func:`~pml_proxies.benchmark.options.option`) holds its command-line help, option
group and parser, its check and whether it is part of the protocol; the command lines
(:mod:`~pml_proxies.benchmark.cli`, ``tune``) are derived from it. A config is immutable and
validated when it is built: a bad value raises :class:`ConfigError` naming the field.
:func:`config_from_args` makes the config of a parsed command line.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass, fields
from typing import Any

from .options import ConfigError, check_fields, given_values, non_protocol_fields, option
from .options import field_default as field_default  # noqa: F401 - re-exported
from .recipes import (
    BENCHMARK_IMAGE_SIZES,
    FEATURE_TRUNKS,
    POOLING_NAMES,
    SMALL_TRUNKS,
    TRUNK_DEFAULTS,
)

#: default equivalence margin of the report's verdicts, in the report's units (metric x100)
DEFAULT_EQUIVALENCE_MARGIN = 1.0
#: version of the computation behind the protocol's settings, recorded in ``protocol.json``: a
#: change that alters what a run computes with the same settings bumps it, so that folders of
#: earlier runs are refused as another protocol. 2: images transformed in batches on tensors
#: (float resampling instead of PIL's uint8 one), the small CNN channels_last with
#: BatchNorm folded into the convolutions in evaluation.
PIPELINE_VERSION = 2
#: default seeds. Ten: on the default protocol another CPU's rounding (or another torch kernel
#: choice) changes a run about as much as another seed does, and with five seeds a verdict near
#: the threshold flipped between "worse" and "inconclusive" on a repeat under AVX2 kernels (8 of
#: 10 verdicts the same); with ten every verdict held (docs/results.md, "Verdicts on another
#: machine").
DEFAULT_SEEDS = tuple(range(10))

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
#: Recall@k cut-offs where ``--recall-ks`` is not given: each data set's convention (the
#: Proxy-Anchor / MPA tables), else :data:`DEFAULT_RECALL_KS`
RECALL_KS_CONVENTIONS = {
    "cub200": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}
DEFAULT_RECALL_KS = (1, 2, 4, 8)


def default_recall_ks(dataset: str) -> list[int]:
    """The Recall@k cut-offs of ``dataset`` when none are given (:data:`RECALL_KS_CONVENTIONS`)."""
    return list(RECALL_KS_CONVENTIONS.get(dataset, DEFAULT_RECALL_KS))


#: transforms a user's images may take (``--dataset-arg transforms=NAME``)
IMAGE_TRANSFORM_SETS = ("natural", "omniglot")
#: the named set whose transforms ``natural`` means (CUB-200's: those of every natural-image set)
NATURAL_IMAGE_SET = "cub200"
MAP_METHODS = ("pca", "tsne")
#: input pixels per batch of the small CNN's embedding passes (:attr:`BenchmarkConfig.
#: eval_batch_images`): 128 images of 32 x 32, the batch it embeds fastest on this project's
#: CPU; at 64 px 32 images embed in 0.7 ms an image against 1.3 ms in batches of 128, at 224 px
#: 8 images in 13 ms against 21 ms (CPU time with the page faults of maps over glibc's 32 MB
#: mmap threshold; ``benchmarks/speed_main.py --parts eval-batch``)
SMALL_CNN_EVAL_PIXELS = 128 * 32 * 32
#: the fewest images per batch of those passes: from 8 images on, the small CNN's embeddings
#: were bit-identical whatever the batch on this project's CPU (oneDNN picks other kernels for
#: smaller batches, which round differently)
MIN_EVAL_BATCH = 8


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _device_default() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------- option text parsers
def _int_list(text: str) -> list[int]:
    """``"1,2 4"`` -> ``[1, 2, 4]``."""
    return [int(t) for t in text.replace(",", " ").split()]


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _parse_losses(text: str) -> list[str]:
    """``--losses``: ``"mpa,vcpa"`` -> ``["mpa", "vcpa"]``; ``"all"``: every loss."""
    from .losses import LOSS_NAMES, LOSSES

    if text.strip() == "all":
        return list(LOSS_NAMES)
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise ConfigError("losses", f"name at least one loss; choose from {', '.join(LOSS_NAMES)}")
    if "" in names:
        raise ConfigError("losses", f"an empty name in {text!r}")
    for n in names:
        if n not in LOSSES:
            raise ConfigError("losses", f"unknown loss {n!r}; choose from {', '.join(LOSS_NAMES)}")
    return names


def _parse_dataset_args(items: list[str]) -> dict:
    """``--dataset-arg``: ``["variant=small"]`` -> ``{"variant": "small"}`` (values as Python
    literals where they are one)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("dataset_kwargs", f"expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _literal(value)
    return out


def _parse_loss_params(items: list[str]) -> dict[str, dict]:
    """``["mpa.centers_per_class=2", ...]`` -> ``{"mpa": {"centers_per_class": 2}}`` (values as
    Python literals; their types are checked against the loss's constructor later)."""
    from .losses import LOSS_NAMES, LOSSES

    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        loss, dot, arg = key.partition(".")
        if not sep or not dot or not arg.strip():
            raise ConfigError("loss_params", f"expects LOSS.ARG=VALUE, got {item!r}")
        loss = loss.strip()
        if loss not in LOSSES:
            raise ConfigError(
                "loss_params", f"unknown loss {loss!r}; choose from {', '.join(LOSS_NAMES)}"
            )
        out.setdefault(loss, {})[arg.strip()] = _literal(value)
    return out


# ----------------------------------------------------------------- per-field checks
# the package's shared checks, imported on use (importing them loads torch; --help does not)
def check_int(name: str, value, **kw):
    from ..functional.validation import check_int

    return check_int(name, value, **kw)


def check_real(name: str, value, **kw):
    from ..functional.validation import check_real

    return check_real(name, value, **kw)


def check_choice(name: str, value, choices):
    from ..functional.validation import check_choice

    return check_choice(name, value, choices)


def check_bool(name: str, value):
    from ..functional.validation import check_bool

    return check_bool(name, value)


def _positive_int(low: int):
    return lambda name, v: check_int(name, v, low=low)


def _optional(check):
    return lambda name, v: None if v is None else check(name, v)


def _choice(choices):
    return lambda name, v: check_choice(name, v, choices)


def _int_list_check(name: str, values) -> None:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    for v in values:
        check_int(name, v, low=1)


def _seeds_check(name: str, values) -> None:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must name at least one seed, got {values!r}")
    for v in values:
        check_int(name, v, low=0)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct, got {list(values)}")


def _losses_check(name: str, values) -> None:
    from .losses import LOSS_NAMES

    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of loss names, got {values!r}")
    for v in values:
        check_choice(name, v, LOSS_NAMES)
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise ValueError(
            f"{name} names {', '.join(repeated)} more than once (use --seeds for repeats)"
        )


#: prefixes of a user's own data (``--dataset csv:PATH``, ``folder:PATH``, ``features:PATH``)
USER_DATA_PREFIXES = ("csv:", "folder:", "features:")


def is_user_data(dataset: str) -> bool:
    """Whether ``dataset`` names a user's own data (:data:`USER_DATA_PREFIXES`)."""
    return isinstance(dataset, str) and dataset.startswith(USER_DATA_PREFIXES)


def _dataset_check(name: str, value) -> None:
    from ..datasets import DATASET_NAMES

    if is_user_data(value):
        kind, _, path = value.partition(":")
        if not path.strip():
            raise ValueError(f"{name} {value!r}: give a path after {kind + ':'!r}")
        return
    if value not in DATASET_NAMES:
        raise ValueError(
            f"{name} must be one of {', '.join(DATASET_NAMES)}, or csv:PATH (an OML "
            f"dataframe), folder:PATH (an image folder), features:PATH.npz (frozen features); "
            f"got {value!r}"
        )


def _fraction_check(name: str, value) -> None:
    check_real(name, value, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)


def _optional_str(name: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {value!r}")


def _val_fraction_check(name: str, value) -> None:
    check_real(name, value, low=0.0, high=1.0, high_inclusive=False)


def _device_check(name: str, value) -> None:
    import torch

    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be cpu, cuda, cuda:N or auto, got {value!r}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} must be cpu, cuda, cuda:N or auto, got {value!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {value!r} needs CUDA, which is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} {value!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif device.type != "cpu":
        raise ValueError(f"{name} must be cpu, cuda, cuda:N or auto, got {value!r}")


def _nonneg_real(name: str, value) -> None:
    check_real(name, value, low=0.0)


def _positive_real(name: str, value) -> None:
    check_real(name, value, low=0.0, low_inclusive=False)


def _dict_check(name: str, value) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")


def _loss_params_check(name: str, value) -> None:
    from .losses import LOSS_NAMES

    _dict_check(name, value)
    for loss, params in value.items():
        check_choice(name, loss, LOSS_NAMES)
        if not isinstance(params, dict):
            raise ValueError(f"{name}[{loss!r}] must be a dict, got {type(params).__name__}")


# ----------------------------------------------------------------- the config
@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything a benchmark run depends on. ``None`` means "the trunk's default"
    (:data:`~pml_proxies.benchmark.models.TRUNK_DEFAULTS`) or "the data set's default"; the
    ``*_or_default`` properties give the values used. Validated on construction
    (:class:`ConfigError`); use :func:`dataclasses.replace` to derive a variant. Fields with
    ``protocol=False`` (:data:`NON_PROTOCOL_FIELDS`) do not change results."""

    dataset: str = option(
        "omniglot",
        "data set: omniglot (bundled small background sets, offline), digits, cub200, cars196, "
        "sop, inshop; or your own data: csv:PATH (an OML retrieval dataframe), folder:PATH (an "
        "image folder), features:PATH.npz (frozen features, with --trunk linear or mlp)",
        type=str,
        check=_dataset_check,
    )
    losses: list[str] = option(
        [], "comma-separated loss names, or 'all' (every available loss)", metavar="NAMES",
        convert=_parse_losses, cli_default="all", check=_losses_check, protocol=False,
    )  # fmt: skip
    seeds: list[int] = option(
        list(DEFAULT_SEEDS),
        "seeds, e.g. '0,1,2'",
        type=_int_list,
        default_text=",".join(map(str, DEFAULT_SEEDS)),
        check=_seeds_check,
        protocol=False,
    )
    output: str = option(
        "benchmark_results",
        "output folder (resumable; holds runs of one protocol)",
        default_text="benchmark_results (--quick: benchmark_results/quick)",
        protocol=False,
    )
    root: str | None = option(
        None, "data folder", default_text="$PML_PROXIES_DATA, else ~/.cache/pml-proxies/data",
        protocol=False,
    )  # fmt: skip
    dataset_kwargs: dict = option(
        {},
        "extra argument of the data set class, KEY=VALUE, e.g. variant=full for Omniglot; for "
        "csv: and folder: data, transforms=NAME: the augmentation and image defaults of a "
        "named set, natural (the default: CUB/Cars/SOP/In-Shop's) or omniglot (repeatable)",
        flag="--dataset-arg",
        action="append",
        metavar="KEY=VALUE",
        convert=_parse_dataset_args,
        default_text="none",
        check=_dict_check,
    )
    download: bool = option(False, "allow downloading the data set", check=check_bool,
                            protocol=False)  # fmt: skip
    # model
    trunk: str = option("small_cnn", "trunk network", "model", choices=tuple(TRUNK_DEFAULTS),
                        check=_choice(tuple(TRUNK_DEFAULTS)))  # fmt: skip
    pretrained: bool | None = option(
        None, "ImageNet weights", "model", action=argparse.BooleanOptionalAction,
        default_text="yes for every trunk but small_cnn", check=_optional(check_bool),
    )  # fmt: skip
    pooling: str = option("avg", "global pooling of the trunk's feature map", "model",
                          choices=POOLING_NAMES, check=_choice(POOLING_NAMES))  # fmt: skip
    embedding_size: int = option(512, "embedding dimension (linear embedder)", "model", type=int,
                                 check=_positive_int(1))  # fmt: skip
    image_size: int | None = option(
        None, "image side in pixels", "model", type=int,
        default_text="32 omniglot with small_cnn, else the data set's: 8 digits, 64 omniglot, "
        "224 natural images",
        check=_optional(_positive_int(1)),
    )  # fmt: skip
    # data / sampling
    val_fraction: float = option(
        0.2,
        "fraction of the training classes held out for model selection (0: none, select the "
        "last epoch)",
        "data and sampling",
        type=float,
        check=_val_fraction_check,
    )
    split_seed: int = option(
        0, "seed of the class draws: the validation classes, and a folder: data set's test "
        "classes", "data and sampling", type=int, check=_positive_int(0),
    )  # fmt: skip
    # a user's own data (csv:, folder:, features:): in the protocol of such data only
    test_fraction: float = option(
        0.5, "folder: data without train/ and test/ subfolders: fraction of the classes drawn "
        "(with --split-seed) as test classes", "your data", type=float, check=_fraction_check,
    )  # fmt: skip
    skip_corrupt_images: bool = option(
        False, "csv: and folder: data: skip the images that cannot be decoded (counted in the "
        "report) instead of refusing the data", "your data", check=check_bool,
    )  # fmt: skip
    allow_shared_classes: bool = option(
        False, "accept train and validation rows that share labels (a split by image, not by "
        "class): the evaluation is then not class-disjoint, as the report says", "your data",
        check=check_bool,
    )  # fmt: skip
    mlp_width: int = option(512, "hidden width of --trunk mlp (frozen features)", "your data",
                            type=int, check=_positive_int(1))  # fmt: skip
    data_fingerprint: str | None = option(
        None, "fingerprint of a user's data (table content and image sizes and times, or the "
        "features file's hash)", cli=False, check=_optional_str,
    )  # fmt: skip
    class_split: dict | None = option(
        None, "the class split of a user's data (class and image counts, skipped images, "
        "hash of the split)", cli=False, check=_optional(_dict_check),
    )  # fmt: skip
    max_train_classes: int | None = option(
        None, "use only the first N training-split classes", "data and sampling", type=int,
        default_text="all", check=_optional(_positive_int(2)),
    )  # fmt: skip
    batch_size: int = option(32, "batch size (a multiple of --m-per-class)", "data and sampling",
                             type=int, check=_positive_int(2))  # fmt: skip
    m_per_class: int = option(4, "images per class in a batch (MPerClassSampler m)",
                              "data and sampling", type=int, check=_positive_int(1))  # fmt: skip
    # schedule
    epochs: int = option(8, "epochs", "schedule", type=int, default_text="8; --quick 2",
                         check=_positive_int(1))  # fmt: skip
    iterations_per_epoch: int = option(
        40, "iterations (batches) per epoch", "schedule", type=int, default_text="40; --quick 4",
        check=_positive_int(1),
    )  # fmt: skip
    eval_every: int = option(1, "validate every N epochs (and after the last)", "schedule",
                             type=int, check=_positive_int(1))  # fmt: skip
    primary_metric: str = option(  # checked against the metrics computed (validate)
        "mean_average_precision_at_r", "validation metric of model selection", "schedule", type=str
    )
    # optimisation
    optimizer: str = option("adamw", "optimizer", "optimisation", choices=OPTIMIZERS,
                            check=_choice(OPTIMIZERS))  # fmt: skip
    lr: float | None = option(
        None, "trunk and embedder learning rate", "optimisation", type=float,
        default_text="the trunk's: 1e-3 small_cnn, 1e-4 pretrained trunks",
        check=_optional(_positive_real),
    )  # fmt: skip
    proxy_lr_mult: float = option(
        100.0, "learning-rate multiplier of the loss parameters (proxies)", "optimisation",
        type=float, check=_positive_real,
    )  # fmt: skip
    weight_decay: float = option(1e-4, "weight decay of every parameter group", "optimisation",
                                 type=float, check=_nonneg_real)  # fmt: skip
    lr_decay_epochs: int = option(0, "step-decay period in epochs (0: no decay)", "optimisation",
                                  type=int, check=_positive_int(0))  # fmt: skip
    lr_decay_gamma: float = option(0.5, "step-decay factor", "optimisation", type=float,
                                   check=_positive_real)  # fmt: skip
    warmup_epochs: int | None = option(
        None, "first epochs with a frozen trunk", "optimisation", type=int,
        default_text="the trunk's: 0 small_cnn, 1 pretrained trunks",
        check=_optional(_positive_int(0)),
    )  # fmt: skip
    freeze_bn: bool | None = option(
        None, "freeze the trunk's BatchNorm layers", "optimisation",
        action=argparse.BooleanOptionalAction, default_text="yes for pretrained trunks",
        check=_optional(check_bool),
    )  # fmt: skip
    grad_clip: float = option(0.0, "maximum gradient norm (0: no clipping)", "optimisation",
                              type=float, check=_nonneg_real)  # fmt: skip
    loss_params: dict[str, dict] = option(
        {},
        "override a loss hyper-parameter, LOSS.ARG=VALUE, checked against the loss's constructor "
        "(repeatable)",
        "optimisation",
        flag="--loss-param",
        action="append",
        metavar="LOSS.ARG=VALUE",
        convert=_parse_loss_params,
        default_text="the papers' values (--list-losses)",
        check=_loss_params_check,
        protocol=False,  # in each loss's own fingerprint (fingerprint)
    )
    # evaluation
    recall_ks: list[int] = option(  # None: the data set's convention (__post_init__)
        None, "k of Recall@k", "evaluation and execution", type=_int_list,
        default_text="the data set's convention: 1,10,100,1000 sop, 1,10,20,30,40,50 inshop, "
        "else 1,2,4,8", check=_int_list_check,
    )  # fmt: skip
    ndcg_ks: list[int] = option([10], "k of nDCG@k", "evaluation and execution", type=_int_list,
                                default_text="10", check=_int_list_check)  # fmt: skip
    eval_batch_size: int = option(128, "batch size of the embedding passes (the small CNN's: "
                                  "at most 128 x 32 x 32 input pixels, at least 8 images)",
                                  "evaluation and execution", type=int,
                                  check=_positive_int(1))  # fmt: skip
    # execution
    device: str = option(
        "auto", "cpu, cuda, cuda:1, ... or auto", "evaluation and execution", type=str,
        default_text="auto: cuda if available, else cpu", check=_device_check, protocol=False,
    )  # fmt: skip
    workers: int = option(0, "DataLoader worker processes", "evaluation and execution", type=int,
                          check=_positive_int(0), protocol=False)  # fmt: skip
    threads: int | None = option(
        None, "torch CPU threads", "evaluation and execution", type=int,
        default_text="1 for small_cnn, linear and mlp on CPU, else torch's",
        check=_optional(_positive_int(1)),
        protocol=False,
    )  # fmt: skip
    jobs: int | None = option(
        None, "parallel runs: worker processes that each train one (loss, seed) run at a time "
        "(results do not depend on it)", "evaluation and execution", type=int,
        default_text="small_cnn, linear and mlp on CPU: CPU cores // threads, at most the runs "
        "to train; else 1",
        check=_optional(_positive_int(1)), protocol=False,
    )  # fmt: skip
    log_freq: int = option(10, "record-keeper logging period in iterations",
                           "evaluation and execution", type=int,
                           check=_positive_int(1))  # fmt: skip
    progress: bool = option(
        True,
        "no progress display",
        flag="--no-progress",
        action="store_false",
        default_text="tqdm bars on a terminal, else a line when a run finishes, and at most "
        "every 30 s when something else changed",
        check=check_bool,
        protocol=False,
    )
    save_models: bool = option(
        False,
        "keep each run's selected model in its run folder (model.pt: the network's and the "
        "loss's state dicts; model.json: the run's resolved specification), for "
        "pml_proxies.benchmark.load_model(run_folder); a finished run without one is trained "
        "again",
        "evaluation and execution",
        check=check_bool,
        protocol=False,
    )
    map_method: str = option("pca", "2-D projection of the embedding maps",
                             "evaluation and execution", choices=MAP_METHODS, flag="--map",
                             check=_choice(MAP_METHODS), protocol=False)  # fmt: skip
    map_samples: int = option(1000, "points per embedding map", "evaluation and execution",
                              type=int, default_text="1000; --quick 300",
                              check=_positive_int(1), protocol=False)  # fmt: skip
    # report
    equivalence_margin: float = option(
        DEFAULT_EQUIVALENCE_MARGIN,
        "equivalence margin of the report's verdicts against proxy_anchor, in points of the "
        "metric x100 as the report prints it (1.0: one MAP@R point): a loss is 'equivalent' when "
        "two one-sided tests show its seed-paired difference lies within ±margin; a report "
        "setting, not part of the protocol (the report command may change it)",
        "report",
        type=float,
        check=_positive_real,
        protocol=False,
    )
    pipeline_version: int = option(
        PIPELINE_VERSION, "version of the computation behind these settings", cli=False
    )
    command: str = option("", "the command line that made this config", cli=False, protocol=False)

    # ------------------------------------------------------------- trunk defaults
    def _trunk_default(self, key: str):
        return TRUNK_DEFAULTS[self.trunk][key]

    @property
    def lr_or_default(self) -> float:
        return self.lr if self.lr is not None else self._trunk_default("lr")

    @property
    def warmup_epochs_or_default(self) -> int:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return self._trunk_default("warmup_epochs")

    @property
    def freeze_bn_or_default(self) -> bool:
        return self.freeze_bn if self.freeze_bn is not None else self._trunk_default("freeze_bn")

    @property
    def image_size_or_default(self) -> int:
        if self.image_size is not None:
            return self.image_size
        from ..datasets import dataset_class

        return int(dataset_class(self.image_set).default_image_size)

    @property
    def eval_batch_images(self) -> int:
        """Images per batch of the embedding passes: ``eval_batch_size``, and for the small CNN
        at most :data:`SMALL_CNN_EVAL_PIXELS` input pixels (at least :data:`MIN_EVAL_BATCH`
        images), so that its feature maps stay in the CPU's caches: 128 images at 32 px (the
        benchmark's Omniglot), 32 at 64 px, 8 at 224 px."""
        if self.trunk != "small_cnn":
            return self.eval_batch_size
        side = self.image_size_or_default
        fitting = max(MIN_EVAL_BATCH, SMALL_CNN_EVAL_PIXELS // (side * side))
        return min(self.eval_batch_size, fitting)

    @property
    def is_user_data(self) -> bool:
        """Whether the data set is a user's own (``csv:``, ``folder:``, ``features:``)."""
        return is_user_data(self.dataset)

    @property
    def is_features(self) -> bool:
        """Whether the data set is frozen features (``features:PATH``)."""
        return self.dataset.startswith("features:")

    @property
    def image_set(self) -> str:
        """The named data set whose transforms and image defaults (side, channels) apply: the
        data set itself, or for a user's images the ``transforms`` data-set argument
        (``natural``, the default, means CUB-200's: the natural-image transforms)."""
        if not self.is_user_data:
            return self.dataset
        if self.is_features:
            return self.dataset
        name = self.dataset_kwargs.get("transforms", "natural")
        return NATURAL_IMAGE_SET if name == "natural" else name

    @property
    def threads_or_default(self) -> int | None:
        """CPU threads of torch: 1 for the small CNN on CPU (its tiny ops only lose from
        threading, badly so on a shared machine), torch's default otherwise."""
        if self.threads is not None:
            return self.threads
        if self.trunk in SMALL_TRUNKS and str(self.device).startswith("cpu"):
            return 1
        return None

    def jobs_for(self, runs: int) -> int:
        """Worker processes for ``runs`` runs to train: ``jobs`` if given (at most ``runs``);
        by default, for the small CNN on CPU, as many as the CPU cores hold at
        :attr:`threads_or_default` threads each (at least 1, at most ``runs``); 1 otherwise
        (a pretrained trunk uses every core in one run, and parallel runs on one GPU only
        compete for it)."""
        if self.jobs is not None:
            return max(1, min(self.jobs, runs))
        if self.trunk not in SMALL_TRUNKS or not str(self.device).startswith("cpu"):
            return 1
        threads = self.threads_or_default or 1
        return max(1, min(available_cores() // threads, runs))

    @property
    def channels(self) -> int:
        """Input channels: 3 (ImageNet-normalised RGB) for pretrained-style trunks, else the
        data set's default (1 for digits and Omniglot)."""
        if self.trunk != "small_cnn":
            return 3
        from ..datasets import dataset_class

        return int(dataset_class(self.image_set).default_channels)

    def __post_init__(self) -> None:
        if self.device == "auto":
            object.__setattr__(self, "device", _device_default())
        if self.recall_ks is None:  # the data set's convention
            object.__setattr__(self, "recall_ks", default_recall_ks(self.dataset))
        self.validate()
        self._check_user_data_settings()
        if self.image_size is None and (self.image_set, self.trunk) in BENCHMARK_IMAGE_SIZES:
            object.__setattr__(
                self, "image_size", BENCHMARK_IMAGE_SIZES[self.image_set, self.trunk]
            )
        if self.pretrained is None and self.trunk in TRUNK_DEFAULTS:
            object.__setattr__(self, "pretrained", TRUNK_DEFAULTS[self.trunk]["pretrained"])
        if self.is_user_data:  # read and check the data (once per process): its fingerprint
            from .userdata import user_data

            data = user_data(self)
            object.__setattr__(self, "data_fingerprint", data.fingerprint)
            object.__setattr__(self, "class_split", data.class_split)
        else:
            object.__setattr__(self, "data_fingerprint", None)
            object.__setattr__(self, "class_split", None)

    def _check_user_data_settings(self) -> None:
        """The settings that only a user's data takes, and the trunk that suits the input."""
        if not self.is_user_data:
            for name in ("test_fraction", "skip_corrupt_images", "allow_shared_classes"):
                if getattr(self, name) != field_default(_FIELDS[name]):
                    raise ConfigError(
                        name, f"only for your own data (csv:, folder:, features:), not "
                        f"--dataset {self.dataset}"
                    )  # fmt: skip
            return
        kind = self.dataset.partition(":")[0]
        if kind != "folder" and self.test_fraction != field_default(_FIELDS["test_fraction"]):
            raise ConfigError("test_fraction", "only for folder: data (a dataframe or a "
                              "features file says which rows are test rows)")  # fmt: skip
        allowed = () if self.is_features else ("transforms",)
        unknown = sorted(set(self.dataset_kwargs) - set(allowed))
        if unknown:
            raise ConfigError(
                "dataset_kwargs", f"{kind}: data takes no {', '.join(map(repr, unknown))} "
                f"argument (it takes: {', '.join(allowed) or 'none'})"
            )  # fmt: skip
        transforms = self.dataset_kwargs.get("transforms", "natural")
        if transforms not in IMAGE_TRANSFORM_SETS:
            raise ConfigError("dataset_kwargs", f"transforms must be one of "
                              f"{', '.join(IMAGE_TRANSFORM_SETS)}, got {transforms!r}")  # fmt: skip
        if self.is_features and self.trunk not in FEATURE_TRUNKS:
            raise ConfigError("trunk", f"features: data are vectors: choose a head on them, "
                              f"{' or '.join(FEATURE_TRUNKS)}, not {self.trunk}")  # fmt: skip
        if not self.is_features and self.trunk in FEATURE_TRUNKS:
            raise ConfigError("trunk", f"{self.trunk} is a head on frozen features "
                              f"(--dataset features:PATH), not an image trunk")  # fmt: skip
        if self.is_features and self.skip_corrupt_images:
            raise ConfigError("skip_corrupt_images", "features: data holds no image")

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError`` naming the field) on a bad setting."""
        check_fields(self)  # each field's own check (its metadata)
        if self.batch_size % self.m_per_class:
            raise ConfigError(
                "batch_size",
                f"must be a multiple of m_per_class ({self.m_per_class}), got {self.batch_size}",
            )
        from .metrics import benchmark_metrics

        names = [m.name for m in benchmark_metrics(self.recall_ks, self.ndcg_ks)]
        if self.primary_metric not in names:
            raise ConfigError(
                "primary_metric", f"{self.primary_metric!r} is not computed; choose from {names}"
            )

    # ------------------------------------------------------------- identity
    def protocol(self) -> dict:
        """The settings that define the protocol (everything that changes results); the
        settings of a user's data (:data:`USER_DATA_FIELDS`) only for such data (the protocol
        of a named data set is what it was before they existed)."""
        d = asdict(self)
        for k in NON_PROTOCOL_FIELDS:
            d.pop(k, None)
        if not self.is_user_data:
            for k in USER_DATA_FIELDS:
                d.pop(k, None)
        return d

    def fingerprint(self, loss_name: str | None = None) -> str:
        """Hash of the protocol (and of ``loss_name``'s parameter overrides): a finished run
        is reused on resumption only if its fingerprint matches."""
        return protocol_fingerprint(
            self.protocol(),
            loss_name,
            self.loss_params.get(loss_name, {}) if loss_name is not None else None,
        )


#: Fields that do not change results (``protocol=False`` in their metadata): they may differ
#: between a run and its resumption.
NON_PROTOCOL_FIELDS = non_protocol_fields(BenchmarkConfig)
#: Protocol fields of a user's data: recorded only for ``csv:``, ``folder:`` and ``features:``
#: data (absent from the protocol of a named data set, as in folders written before them).
USER_DATA_FIELDS = (
    "test_fraction", "skip_corrupt_images", "allow_shared_classes", "mlp_width",
    "data_fingerprint", "class_split",
)  # fmt: skip
_FIELDS = {f.name: f for f in fields(BenchmarkConfig)}


def config_record(config: BenchmarkConfig) -> dict:
    """The config as saved in ``config.json``."""
    return asdict(config)


def protocol_fingerprint(protocol: dict, loss_name: str | None, loss_params: dict | None) -> str:
    """The one fingerprint function: hash of ``protocol`` (+ the loss name and its overrides)."""
    d = dict(protocol)
    if loss_name is not None:
        d["loss"] = loss_name
        d["loss_params"] = loss_params or {}
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: the command that started the command line, where it is not ``pml-proxies-benchmark`` (set
#: by ``.ci/main`` to ``bash .ci/main``): the report shows the command as the user typed it
COMMAND_ENV = "PML_PROXIES_COMMAND"


def typed_command(argv: list[str], subcommand: str | None = None) -> str:
    """The command line of ``argv`` as typed (shell-quoted): ``$PML_PROXIES_COMMAND`` (else
    ``pml-proxies-benchmark``), then ``subcommand`` (e.g. ``tune``) and the arguments."""
    program = os.environ.get(COMMAND_ENV, "").strip() or "pml-proxies-benchmark"
    return " ".join([program, *([subcommand] if subcommand else []), *map(shlex.quote, argv)])


def config_fields() -> tuple:
    """The dataclass fields of :class:`BenchmarkConfig` (with their command-line metadata)."""
    return fields(BenchmarkConfig)


# ----------------------------------------------------------------- from the command line
#: ``--quick``: a smoke test of the whole pipeline (tests / CI); explicit options still win.
QUICK: dict[str, Any] = dict(
    epochs=2,
    iterations_per_epoch=4,
    seeds=[0],
    map_samples=300,
    output="benchmark_results/quick",
)


def quick_help(output: str) -> str:
    """The help of ``--quick`` in a command whose ``--quick`` output folder is ``output``."""
    seeds = ",".join(map(str, QUICK["seeds"]))
    return (
        f"smoke test: {QUICK['epochs']} epochs x {QUICK['iterations_per_epoch']} iterations, "
        f"seed {seeds}, {QUICK['map_samples']} map points, output {output} (explicit options "
        "still win)"
    )


@dataclass(frozen=True)
class CommonOptions:
    """The options, beside :class:`BenchmarkConfig`'s, of every command that trains or reports
    (``run``, ``report``, ``tune``)."""

    quick: bool = option(False, quick_help(QUICK["output"]))
    nproc_per_node: int | None = option(
        None,
        "train each run with DistributedDataParallel on N processes (one per GPU; gloo on "
        "CPU): the command runs itself under torch.distributed.run (the same as running it "
        "under torchrun); the global batch is --batch-size; not with --jobs > 1",
        type=int,
        metavar="N",
        default_text="1",
    )  # checked with the config: distributed.check_nproc
    debug: bool = option(False, "show Python tracebacks of errors")


def config_from_args(
    args: argparse.Namespace, argv: list[str], command: str | None = None
) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed ``args`` (``ConfigError`` on a bad value): the
    options typed, over :data:`QUICK` with ``--quick``, over the defaults. ``command``: the
    command line to record (default: ``argv`` as typed, :func:`typed_command`)."""
    values: dict[str, Any] = dict(QUICK) if getattr(args, "quick", False) else {}
    values.update(given_values(args, BenchmarkConfig))
    values["command"] = typed_command(argv) if command is None else command
    return BenchmarkConfig(**values)
