"""Configuration of a benchmark (one protocol shared by every loss)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .models import TRUNK_DEFAULTS

#: Fields that do not change results: they may differ between a run and its resumption.
NON_PROTOCOL_FIELDS = (
    "losses",
    "seeds",
    "workers",
    "threads",
    "device",
    "output",
    "progress",
    "root",
    "download",
    "command",
    "map_method",
    "map_samples",
    "loss_params",
)


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on. ``None`` means "the trunk's default"
    (:data:`~pml_proxies.benchmark.models.TRUNK_DEFAULTS`)."""

    dataset: str = "digits"
    losses: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output: str = "benchmark_results"
    root: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)
    download: bool = False
    # model
    trunk: str = "small_cnn"
    pretrained: bool | None = None
    pooling: str = "avg"
    embedding_size: int = 512
    image_size: int | None = None
    # data / sampling
    val_fraction: float = 0.2
    split_seed: int = 0
    max_train_classes: int | None = None
    batch_size: int = 32
    m_per_class: int = 4
    # schedule
    epochs: int = 10
    iterations_per_epoch: int = 30
    eval_every: int = 1
    primary_metric: str = "mean_average_precision_at_r"
    # optimisation
    optimizer: str = "adamw"
    lr: float | None = None
    proxy_lr_mult: float = 100.0
    weight_decay: float = 1e-4
    lr_decay_epochs: int = 0
    lr_decay_gamma: float = 0.5
    warmup_epochs: int | None = None
    freeze_bn: bool | None = None
    grad_clip: float = 0.0
    loss_params: dict[str, dict] = field(default_factory=dict)
    # evaluation
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ndcg_ks: list[int] = field(default_factory=lambda: [10])
    eval_batch_size: int = 256
    # execution
    device: str = "cpu"
    workers: int = 0
    threads: int | None = None
    log_freq: int = 10
    progress: bool = True
    map_method: str = "pca"
    map_samples: int = 1000
    command: str = ""

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

        return int(dataset_class(self.dataset).default_image_size)

    @property
    def threads_or_default(self) -> int | None:
        """CPU threads of torch: 1 for the small CNN on CPU (its tiny ops only lose from
        threading, badly so on a shared machine), torch's default otherwise."""
        if self.threads is not None:
            return self.threads
        if self.trunk == "small_cnn" and str(self.device).startswith("cpu"):
            return 1
        return None

    @property
    def channels(self) -> int | None:
        """3 (ImageNet-normalised RGB) for pretrained trunks, else the dataset's default."""
        return None if self.trunk == "small_cnn" else 3

    def __post_init__(self) -> None:
        if self.pretrained is None and self.trunk in TRUNK_DEFAULTS:
            self.pretrained = TRUNK_DEFAULTS[self.trunk]["pretrained"]

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings."""
        if self.trunk not in TRUNK_DEFAULTS:
            raise ValueError(f"unknown trunk {self.trunk!r}; choose from {sorted(TRUNK_DEFAULTS)}")
        for name, lo in (
            ("epochs", 1),
            ("iterations_per_epoch", 1),
            ("batch_size", 2),
            ("m_per_class", 1),
            ("embedding_size", 1),
            ("eval_every", 1),
            ("log_freq", 1),
            ("workers", 0),
        ):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.batch_size % self.m_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of m_per_class "
                f"({self.m_per_class})"
            )
        if self.proxy_lr_mult <= 0:
            raise ValueError(f"proxy_lr_mult must be > 0, got {self.proxy_lr_mult}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.map_method not in ("pca", "tsne"):
            raise ValueError(f"map_method must be 'pca' or 'tsne', got {self.map_method!r}")
        metric_names = {"precision_at_1", "r_precision", "mean_average_precision_at_r"}
        metric_names |= {f"recall_at_{k}" for k in self.recall_ks}
        metric_names |= {f"ndcg_at_{k}" for k in self.ndcg_ks}
        if self.primary_metric not in metric_names:
            raise ValueError(
                f"primary_metric {self.primary_metric!r} is not computed; choose from "
                f"{sorted(metric_names)}"
            )

    # ------------------------------------------------------------- identity
    def protocol(self) -> dict:
        """The settings that define the protocol (everything that changes results)."""
        d = asdict(self)
        for k in NON_PROTOCOL_FIELDS:
            d.pop(k, None)
        return d

    def fingerprint(self, loss_name: str | None = None) -> str:
        """Hash of the protocol (and of ``loss_name``'s parameter overrides): a finished run
        is reused on resumption only if its fingerprint matches."""
        d = self.protocol()
        if loss_name is not None:
            d["loss"] = loss_name
            d["loss_params"] = self.loss_params.get(loss_name, {})
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
