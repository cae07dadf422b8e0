"""``pml-proxies-benchmark embed``: images to a features file (frozen features of a trunk).

``embed --dataset DATA --trunk efficientnet_lite0 --output feats.npz`` passes every image of
``DATA`` (a built-in data set, both its splits; ``csv:PATH``; ``folder:PATH``) through the
trunk and its global pooling with the trunk's evaluation transform, in batches under
``torch.inference_mode()``, and writes the pooled features (not normalised) in the format of
:mod:`pml_proxies.datasets.features`, which ``--dataset features:FILE`` reads:

* rows: a dataframe's or image folder's rows in its order, with its labels, splits, query and
  gallery flags and categories; a built-in set's train images (split ``train``), then its test
  images (split ``validation``, each both query and gallery, or the set's own query and gallery
  lists where it has them, as In-Shop), the test labels after the train labels (class-disjoint).
* what made them (:data:`RECORD_ARRAYS`, one 0-d array each; :func:`read_embed_record`): the
  trunk, its pooling and whether pretrained, the SHA-256 of its weights, the image side and the
  transform, the input as typed and its fingerprint
  (:func:`~pml_proxies.datasets.fingerprint.data_fingerprint` for ``csv:`` / ``folder:``; for a
  built-in set the SHA-256 of its identity: its files' hashes where it has files, as the bundled
  Omniglot's zips, and of its classes, labels and images or image paths), the package's and
  torch's versions, the device and the command line.

The file is written atomically (a temporary file in the output's folder, then ``os.replace``):
an interrupted or failed embed leaves no file, partial or temporary. An existing file is kept
unless ``--force``. The zip members carry a fixed date, so that the same features give the same
bytes (and the same fingerprint when a benchmark reads the file again).

The options are :class:`EmbedOptions`' fields (:func:`~pml_proxies.benchmark.options.option`);
every bad value, input or output path is a usage error (exit code 2) before any image is read.
Nothing here imports torch at import time (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import secrets
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import (
    _device_check,
    _device_default,
    _dict_check,
    _optional,
    _parse_dataset_args,
    _positive_int,
    check_bool,
    typed_command,
)
from .options import ConfigError, add_options, check_fields, given_values, option, option_name
from .recipes import (
    BENCHMARK_IMAGE_SIZES,
    FEATURE_TRUNKS,
    POOLING_NAMES,
    TRUNK_DEFAULTS,
    TRUNK_NAMES,
)

if TYPE_CHECKING:
    from torch import nn

    from ..datasets.base import BaseDataset

#: the trunks that embed images (not the heads on feature vectors, ``FEATURE_TRUNKS``)
IMAGE_TRUNKS = tuple(t for t in TRUNK_NAMES if t not in FEATURE_TRUNKS)
#: image side of the pretrained trunks (their ImageNet training resolution)
PRETRAINED_IMAGE_SIZE = 224
#: the recording arrays of a features file written by embed, beside the data's
RECORD_ARRAYS = (
    "trunk", "pretrained", "pooling", "weights_sha256", "image_size", "transform", "dataset",
    "data_fingerprint", "data_identity", "package_version", "torch_version", "device", "command",
)  # fmt: skip
#: date of every zip member of a features file (the zip format's earliest): same bytes each time
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

INPUT, TRUNK, EXECUTION = "input and output", "trunk", "execution"


# ----------------------------------------------------------------- option checks
def _dataset_check(name: str, value: Any) -> None:
    """A built-in data set, ``csv:FILE`` or ``folder:FOLDER`` that exists (not ``features:``)."""
    from ..datasets import DATASET_NAMES

    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    kind, colon, path = value.partition(":")
    if colon and kind == "features":
        raise ValueError(f"{value!r} is already features: embed reads images (csv:, folder: or "
                         f"one of {', '.join(DATASET_NAMES)})")  # fmt: skip
    if colon and kind in ("csv", "folder"):
        where = Path(path).expanduser()
        if not path:
            raise ValueError(f"give a path after '{kind}:'")
        if kind == "csv" and not where.is_file():
            raise ValueError(f"dataframe {where} does not exist")
        if kind == "folder" and not where.is_dir():
            raise ValueError(f"image folder {where} does not exist")
        return
    if value not in DATASET_NAMES:
        raise ValueError(
            f"must be csv:FILE, folder:FOLDER or one of {', '.join(DATASET_NAMES)}; got {value!r}"
        )


def _trunk_check(name: str, value: Any) -> None:
    if value not in IMAGE_TRUNKS:
        raise ValueError(f"must be one of {', '.join(IMAGE_TRUNKS)}; got {value!r}")


def _pooling_check(name: str, value: Any) -> None:
    if value not in POOLING_NAMES:
        raise ValueError(f"must be one of {', '.join(POOLING_NAMES)}; got {value!r}")


def _output_check(name: str, value: Any) -> None:
    """A ``.npz`` path in a writable folder that exists (whether it may be overwritten is
    :meth:`EmbedOptions.validate`'s)."""
    if value is None:
        raise ValueError("is required: the features file to write, e.g. --output feats.npz")
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a file path, got {value!r}")
    path = Path(value).expanduser()
    if path.suffix != ".npz":
        raise ValueError(f"must end in .npz (a features file), got {value!r}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"folder {folder} is not writable")


# ----------------------------------------------------------------- the options
@dataclass(frozen=True)
class EmbedOptions:
    """The options of ``embed`` (module docstring). ``None`` means the trunk's default
    (:meth:`pretrained_or_default`, :meth:`image_size_or_default`). Checked on construction:
    :class:`~pml_proxies.benchmark.options.ConfigError` naming the field."""

    dataset: str = option(
        "omniglot",
        "images to embed: a built-in data set (omniglot: the bundled small set offline, digits, "
        "cub200, cars196, sop, inshop: both splits), csv:FILE (an OML retrieval dataframe) or "
        "folder:FOLDER (an image folder)",
        INPUT, type=str, check=_dataset_check,
    )  # fmt: skip
    output: str | None = option(
        None, "the features file to write (.npz, in a folder that exists)", INPUT, type=str,
        default_text="none: required", check=_output_check,
    )  # fmt: skip
    force: bool = option(False, "overwrite --output if it exists", INPUT, check=check_bool)
    root: str | None = option(
        None, "data folder (csv: where relative image paths start)", INPUT,
        default_text="$PML_PROXIES_DATA, else ~/.cache/pml-proxies/data; csv: the CSV's folder",
    )  # fmt: skip
    dataset_kwargs: dict = option(
        {},
        "extra argument of the data set, KEY=VALUE, e.g. variant=full for Omniglot, "
        "test_fraction=0.5 or seed=1 for a folder without train/ and test/ (repeatable)",
        INPUT, flag="--dataset-arg", action="append", metavar="KEY=VALUE",
        convert=_parse_dataset_args, default_text="none", check=_dict_check,
    )  # fmt: skip
    download: bool = option(False, "allow downloading the data set", INPUT, check=check_bool)
    trunk: str = option("efficientnet_lite0", "trunk network", TRUNK, choices=IMAGE_TRUNKS,
                        check=_trunk_check)  # fmt: skip
    pretrained: bool | None = option(
        None, "ImageNet weights", TRUNK, action=argparse.BooleanOptionalAction,
        default_text="yes for every trunk but small_cnn", check=_optional(check_bool),
    )  # fmt: skip
    pooling: str = option("avg", "global pooling of the trunk's feature map", TRUNK,
                          choices=POOLING_NAMES, check=_pooling_check)  # fmt: skip
    image_size: int | None = option(
        None, "image side in pixels", TRUNK, type=int,
        default_text=f"{PRETRAINED_IMAGE_SIZE} for the pretrained trunks; small_cnn: the "
        "benchmark's side for the data set (32 omniglot, 8 digits, 224 natural images)",
        check=_optional(_positive_int(1)),
    )  # fmt: skip
    seed: int = option(0, "seed of the weights of a trunk without pretrained weights", TRUNK,
                       type=int, check=_positive_int(0))  # fmt: skip
    batch_size: int = option(128, "images per inference batch", EXECUTION, type=int,
                             check=_positive_int(1))  # fmt: skip
    device: str = option("auto", "cpu, cuda, cuda:1, ... or auto", EXECUTION, type=str,
                         default_text="auto: cuda if available, else cpu",
                         check=_device_check)  # fmt: skip
    threads: int | None = option(None, "torch CPU threads", EXECUTION, type=int,
                                 default_text="torch's",
                                 check=_optional(_positive_int(1)))  # fmt: skip
    workers: int = option(0, "DataLoader worker processes decoding the images", EXECUTION,
                          type=int, check=_positive_int(0))  # fmt: skip
    progress: bool = option(
        True, "no progress display", EXECUTION, flag="--no-progress", action="store_false",
        default_text="a bar on a terminal, else a line at most every 30 s", check=check_bool,
    )  # fmt: skip
    debug: bool = option(False, "show Python tracebacks of errors", EXECUTION)
    command: str = option("", "the command line, recorded in the file", cli=False)

    def __post_init__(self) -> None:
        if self.device == "auto":
            object.__setattr__(self, "device", _device_default())
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` (naming the field) on a bad setting or output path."""
        check_fields(self)
        output = self.output_path
        if output.exists() and not self.force:
            raise ConfigError("output", f"{output} exists; --force (force=True) overwrites it")

    @property
    def output_path(self) -> Path:
        return Path(str(self.output)).expanduser()

    @property
    def pretrained_or_default(self) -> bool:
        if self.pretrained is not None:
            return self.pretrained
        return bool(TRUNK_DEFAULTS[self.trunk]["pretrained"])

    @property
    def image_size_or_default(self) -> int:
        """``image_size``, else :data:`PRETRAINED_IMAGE_SIZE` for every trunk but the small
        CNN, else the side the benchmark gives the small CNN on this data set."""
        if self.image_size is not None:
            return self.image_size
        if self.trunk != "small_cnn":
            return PRETRAINED_IMAGE_SIZE
        if (self.dataset, self.trunk) in BENCHMARK_IMAGE_SIZES:
            return BENCHMARK_IMAGE_SIZES[self.dataset, self.trunk]
        from ..datasets import dataset_class

        return int(dataset_class(self.dataset).default_image_size)

    @property
    def channels(self) -> int:
        """Input channels, as the benchmark's: 3 (ImageNet-normalised RGB) for the pretrained
        trunks' architectures, else the data set's default (1 for digits and Omniglot)."""
        if self.trunk != "small_cnn":
            return 3
        from ..datasets import dataset_class

        return int(dataset_class(self.dataset).default_channels)


# ----------------------------------------------------------------- the trunk
def build_feature_model(options: EmbedOptions) -> nn.Module:
    """The trunk and its global pooling in evaluation mode on ``options.device``, its
    convolution weights ``channels_last``; a trunk without pretrained weights is initialised
    under ``torch.manual_seed(options.seed)`` (torch's global generator is left as it was).

    Raises:
        ConfigError: (field ``trunk``) the trunk's package is not installed.
    """
    import torch
    from torch import nn

    from .models import GlobalPool, build_trunk

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        try:
            trunk = build_trunk(
                options.trunk,
                options.channels,
                options.image_size_or_default,
                options.pretrained_or_default,
            )
        except ImportError as e:
            raise ConfigError("trunk", str(e)) from e
    model = nn.Sequential(trunk, GlobalPool(options.pooling)).eval()
    # channels_last: the convolutions run NHWC, 1.6x faster for EfficientNet-Lite0 on a CPU
    # (Module.to's memory_format: documented, absent from torch's type stubs)
    to: Any = model.to
    return to(options.device, memory_format=torch.channels_last)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 (hex) of a module's state: every entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------- the images
@dataclass(frozen=True)
class Part:
    """One split of the input: its data set and where its images go in the file."""

    dataset: BaseDataset
    rows: np.ndarray  # the file's rows of the data set's images, in its order
    labels: np.ndarray  # the file's label of each image
    split: str  # "train" / "validation"
    is_query: np.ndarray
    is_gallery: np.ndarray
    categories: list[str] | None


def eval_transform(options: EmbedOptions):
    """The trunk's evaluation transform (:func:`~pml_proxies.datasets.get_transforms`, as the
    benchmark's): deterministic, at :meth:`EmbedOptions.image_size_or_default`, ImageNet
    normalisation for 3 channels."""
    from ..datasets import get_transforms

    return get_transforms(
        options.dataset,
        train=False,
        image_size=options.image_size_or_default,
        channels=options.channels,
    )


def load_parts(options: EmbedOptions, transform) -> list[Part]:
    """The input's two splits (train, then test / validation) with the file's rows and fields
    (module docstring).

    Raises:
        ConfigError: (field ``dataset``) the data cannot be read: missing files, a dataframe or
            folder that does not follow the format (the message names the column and lines).
    """
    from ..datasets import dataset_class, get_dataset

    kw = dict(options.dataset_kwargs)
    try:
        if "progress" in inspect.signature(dataset_class(options.dataset).__init__).parameters:
            kw.setdefault("progress", options.progress)
        datasets = [
            get_dataset(
                options.dataset,
                split,
                root=options.root,
                transform=transform,
                download=options.download,
                **kw,
            )
            for split in ("train", "test")
        ]
    except (OSError, ValueError, TypeError) as e:  # missing files, format errors, bad kwargs
        raise ConfigError("dataset", str(e)) from e
    return _parts(*datasets)


def _parts(train: BaseDataset, test: BaseDataset) -> list[Part]:
    from ..datasets.dataframe import RetrievalDataset

    if isinstance(train, RetrievalDataset) and isinstance(test, RetrievalDataset):
        table = train.table  # a dataframe / image folder: its own rows, labels and flags
        return [
            Part(
                ds,
                ds.rows,
                table.labels[ds.rows],
                split,
                table.is_query[ds.rows],
                table.is_gallery[ds.rows],
                _categories(ds),
            )
            for ds, split in ((train, "train"), (test, "validation"))
        ]
    n, none = len(train), np.zeros(len(train), dtype=bool)
    is_query, is_gallery = query_gallery(test)
    return [
        Part(train, np.arange(n), train.labels, "train", none, none, _categories(train)),
        Part(
            test,
            n + np.arange(len(test)),
            test.labels + train.num_classes,
            "validation",
            is_query,
            is_gallery,
            _categories(test),
        ),
    ]


def query_gallery(test: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(is_query, is_gallery)`` of a built-in test split: its own lists where it has them
    (In-Shop's ``is_query``: the other images are its gallery), else every image both."""
    n = len(test)
    is_query = getattr(test, "is_query", None)
    if is_query is None:
        return np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    is_query = np.asarray(is_query, dtype=bool)
    is_gallery = getattr(test, "is_gallery", None)
    return is_query, ~is_query if is_gallery is None else np.asarray(is_gallery, dtype=bool)


def _categories(ds: Any) -> list[str] | None:
    categories = getattr(ds, "categories", None)
    return None if categories is None else [str(c) for c in categories]


def data_identity(name: str, parts: Sequence[Part]) -> tuple[str, dict]:
    """``(fingerprint, identity)`` of the input. A user's data: its
    :func:`~pml_proxies.datasets.fingerprint.data_fingerprint`. A built-in set: the SHA-256 of
    its identity, which holds its name (variant and source where it has them), its files' SHA-256
    (the Omniglot zips) and a SHA-256 of each split's classes, labels and images (in memory) or
    image paths (relative to the data root)."""
    from ..datasets.fingerprint import data_fingerprint, file_sha256

    first = parts[0].dataset
    fingerprint = data_fingerprint(first)
    if fingerprint is not None:
        return fingerprint, {"dataset": name, "fingerprint": fingerprint}
    identity: dict[str, Any] = {"dataset": name}
    for attr in ("variant", "source"):
        if isinstance(getattr(first, attr, None), str):
            identity[attr] = getattr(first, attr)
    files = sorted({Path(f) for p in parts for f in getattr(p.dataset, "files", ())})
    if files:
        identity["files"] = {f.name: file_sha256(f) for f in files}
    digest = hashlib.sha256()
    for part in parts:
        ds: Any = part.dataset
        content = {"split": part.split, "classes": ds.classes, "labels": ds.labels.tolist()}
        images = getattr(ds, "images", None)
        if isinstance(images, np.ndarray):
            content["images"] = f"{images.dtype}{images.shape}"
        else:
            root = getattr(ds, "root", None)
            paths = getattr(ds, "paths", [])
            content["paths"] = [os.path.relpath(p, root) if root else str(p) for p in paths]
        digest.update(json.dumps(content, sort_keys=True).encode())
        if isinstance(images, np.ndarray):
            digest.update(np.ascontiguousarray(images).tobytes())
    identity["content_sha256"] = digest.hexdigest()
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), identity


# ----------------------------------------------------------------- inference
@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` in the block (unchanged for ``None``)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_features(
    model: nn.Module, datasets: Sequence[Any], options: EmbedOptions
) -> list[np.ndarray]:
    """float32 features (one ``N_i x F`` array per data set) of ``model`` on ``datasets``, in
    their order, batches of ``options.batch_size`` under ``torch.inference_mode()``, one
    progress bar for all."""
    import torch
    from torch.utils.data import DataLoader

    from .interrupt import check as check_interrupt
    from .progress import progress_bar

    device = torch.device(options.device)
    loaders = [
        DataLoader(ds, batch_size=options.batch_size, shuffle=False, num_workers=options.workers)
        for ds in datasets
    ]
    chunks: list[list[np.ndarray]] = [[] for _ in datasets]
    total = sum(len(loader) for loader in loaders)
    bar = progress_bar(_batches(loaders), "embed", enabled=options.progress, total=total)
    with torch_threads(options.threads), torch.inference_mode():
        for index, images in bar:
            check_interrupt()
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            features = model(images).float()
            chunks[index].append(features.cpu().numpy())
    return [np.concatenate(c).astype(np.float32, copy=False) for c in chunks]


def _batches(loaders: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    for index, loader in enumerate(loaders):
        for images, _ in loader:
            yield index, images


# ----------------------------------------------------------------- the file
def features_arrays(parts: Sequence[Part], features: Sequence[np.ndarray]) -> dict[str, Any]:
    """The data arrays of a features file (:mod:`pml_proxies.datasets.features`) from the parts
    and their features, each part's images at its rows."""
    n = sum(len(p.rows) for p in parts)
    width = features[0].shape[1]
    arrays: dict[str, Any] = {
        "features": np.empty((n, width), np.float32),
        "labels": np.empty(n, np.int64),
        "split": np.empty(n, dtype="<U10"),
        "is_query": np.zeros(n, dtype=bool),
        "is_gallery": np.zeros(n, dtype=bool),
    }
    for part, values in zip(parts, features):
        arrays["features"][part.rows] = values
        arrays["labels"][part.rows] = part.labels
        arrays["split"][part.rows] = part.split
        arrays["is_query"][part.rows] = part.is_query
        arrays["is_gallery"][part.rows] = part.is_gallery
    if all(p.categories is not None for p in parts):
        category = np.empty(n, dtype=object)
        for part in parts:
            category[part.rows] = part.categories
        arrays["category"] = category.astype(str)
    return arrays


def write_npz_atomic(path: Path, arrays: Mapping[str, Any], overwrite: bool = False) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` (what :func:`numpy.load` reads) at ``path``,
    atomically: into a temporary file beside it, synced, then renamed over ``path``; on any
    failure (Ctrl-C included) the temporary file is removed and ``path`` is unchanged. The zip
    members carry :data:`ZIP_DATE`, so equal arrays give equal bytes.

    Raises:
        FileExistsError: ``path`` exists and not ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; --force (force=True) overwrites it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, value in arrays.items():
                    info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
                    with z.open(info, "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_embed_record(path: str | os.PathLike) -> dict[str, Any]:
    """What made a features file written by embed (:data:`RECORD_ARRAYS` present in it, as
    Python values; ``data_identity`` as a dict)."""
    with np.load(Path(path).expanduser(), allow_pickle=False) as data:
        record = {k: data[k].item() for k in RECORD_ARRAYS if k in data.files}
    if "data_identity" in record:
        record["data_identity"] = json.loads(record["data_identity"])
    return record


# ----------------------------------------------------------------- embed
def embed(options: EmbedOptions) -> dict[str, Any]:
    """Write the features file of ``options`` (module docstring); returns its record
    (:func:`read_embed_record`'s) with ``rows`` and ``width`` added.

    Raises:
        ConfigError: a trunk that cannot be built or an input that cannot be read (naming the
            field), before any image is embedded.
    """
    import torch

    import pml_proxies

    model = build_feature_model(options)
    transform = eval_transform(options)
    parts = load_parts(options, transform)
    fingerprint, identity = data_identity(options.dataset, parts)
    features = compute_features(model, [p.dataset for p in parts], options)
    arrays = features_arrays(parts, features)
    record = {
        "trunk": options.trunk,
        "pretrained": options.pretrained_or_default,
        "pooling": options.pooling,
        "weights_sha256": weights_sha256(model),
        "image_size": options.image_size_or_default,
        "transform": repr(transform),
        "dataset": options.dataset,
        "data_fingerprint": fingerprint,
        "data_identity": json.dumps(identity, sort_keys=True),
        "package_version": pml_proxies.__version__,
        "torch_version": torch.__version__,
        "device": torch.device(options.device).type,
        "command": options.command,
    }
    write_npz_atomic(options.output_path, {**arrays, **record}, overwrite=options.force)
    n, width = arrays["features"].shape
    return {**record, "data_identity": identity, "rows": int(n), "width": int(width)}


# ----------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``embed``'s options (:class:`EmbedOptions`' fields)."""
    parser.description = (
        "Write a features file (--dataset features:FILE reads it): every image of --dataset "
        "(both splits) through the trunk and its global pooling with the trunk's evaluation "
        "transform, batched, without gradients; the trunk, its weights' hash, the transform and "
        "the input's fingerprint are recorded in the file. The write is atomic: an interrupted "
        "embed leaves no file."
    )
    add_options(parser, EmbedOptions)


def run(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``embed`` with parsed ``args`` (``argv``: the words after ``embed``; ``parser``: for
    usage errors, exit code 2). Other failures: one ``error:`` line, exit code 1; Ctrl-C: 130."""
    from .interrupt import catching_interrupts

    debug = bool(getattr(args, "debug", False))
    try:
        values = given_values(args, EmbedOptions)
        options = EmbedOptions(**values, command=typed_command(argv, "embed"))
        with catching_interrupts():
            record = embed(options)
    except ConfigError as e:
        parser.error(f"argument {option_name(e.field, EmbedOptions)}: {e.message}")
    except KeyboardInterrupt:
        print("interrupted: no file written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1
    print(
        f"{options.output_path}: {record['rows']} x {record['width']} features of "
        f"{options.dataset} by {options.trunk} ({options.image_size_or_default} px); read it "
        f"with --dataset features:{options.output_path}"
    )
    return 0
