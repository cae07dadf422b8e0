"""One benchmark run: train one loss with one seed under the shared protocol, select the epoch on
the validation classes and evaluate it on the test classes (:func:`train_run`, which returns the
results); :func:`train_and_evaluate` stores them through the run's
:class:`~pml_proxies.benchmark.store.RunFolder`."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..functional.distributed import world
from .config import BenchmarkConfig
from .data import BenchmarkData, RelabeledSubset
from .interrupt import check as check_interrupt
from .losses import build_loss, get_proxies
from .models import EmbeddingNet, build_network, freeze_batchnorm
from .models_io import save_run_model
from .progress import progress_bar
from .spec import RunSpec, build_run_spec
from .store import (
    RESULT_FILE,
    ResultRecord,
    RunFolder,
    inspect_run,
    load_result,
    run_dir,
    run_folder,
)

if TYPE_CHECKING:
    from record_keeper import RecordKeeper

    from .distributed import DistributedRun


# ------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accuracy_calculator(spec: RunSpec):
    """``pml_proxies.AccuracyCalculator`` computing ``spec.metric_names`` (``k="max_bin_count"``
    for PML's metrics, widened for Recall@k / nDCG@k)."""
    from ..utils.accuracy_calculator import AccuracyCalculator

    config = spec.config
    return AccuracyCalculator(
        include=spec.metric_names,
        k="max_bin_count",
        device=torch.device(config.device),
        recall_ks=tuple(config.recall_ks),
        ndcg_ks=tuple(config.ndcg_ks),
    )


#: bytes of evaluation images kept in memory per data set (and process); a larger data set is
#: read through its DataLoader at every pass
EVAL_CACHE_BYTES = 256 * 2**20
_EVAL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _EvalImages:
    """The evaluation-transformed items of one data set, each computed once per process (the
    evaluation transform is deterministic: every pass sees the same tensors, batched as the
    DataLoader batches them); ``usable`` is false when the set would exceed
    :data:`EVAL_CACHE_BYTES`."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.items: dict[int, tuple[torch.Tensor, int]] = {}
        image, label = dataset[0]
        self.usable = (
            isinstance(image, torch.Tensor)
            and image.element_size() * image.nelement() * len(dataset) <= EVAL_CACHE_BYTES
        )
        if self.usable:
            self.items[0] = (image, label)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``indices``: what the DataLoader's default collate gives."""
        missing = [i for i in dict.fromkeys(indices) if i not in self.items]
        if missing:
            getitems = getattr(self.dataset, "__getitems__", None)
            fetched = getitems(missing) if getitems else [self.dataset[i] for i in missing]
            self.items.update(zip(missing, fetched))
        images, labels = zip(*(self.items[i] for i in indices))
        return torch.stack(images, 0), torch.tensor(labels)


def _eval_images(dataset, config: BenchmarkConfig) -> _EvalImages | None:
    if config.workers > 0 or len(dataset) == 0:  # workers decode in parallel: no cache
        return None
    try:
        cache = _EVAL_CACHE.get(dataset)
    except TypeError:  # not weak-referenceable
        return None
    if cache is None:
        cache = _EVAL_CACHE[dataset] = _EvalImages(dataset)
    return cache if cache.usable else None


@contextlib.contextmanager
def torch_threads(config: BenchmarkConfig) -> Iterator[None]:
    """torch's CPU threads set to ``config.threads_or_default`` inside the block (unchanged when
    that is ``None``), restored after it."""
    threads = torch.get_num_threads()
    if config.threads_or_default is not None:
        torch.set_num_threads(config.threads_or_default)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eval_batches(dataset, config: BenchmarkConfig, indices: Sequence[int] | None):
    """The evaluation batches of ``dataset`` (rows ``indices``, default all) in order: from the
    per-process cache of evaluation images when it holds the set, else from a DataLoader."""
    cache = _eval_images(dataset, config)
    if cache is None:
        subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
        yield from DataLoader(
            subset, batch_size=config.eval_batch_images, shuffle=False, num_workers=config.workers
        )
        return
    rows = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    size = config.eval_batch_images
    for start in range(0, len(rows), size):
        check_interrupt()
        yield cache.batch(rows[start : start + size])


@torch.no_grad()
def compute_embeddings(
    model, dataset, config: BenchmarkConfig, indices: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings and labels of ``dataset`` (rows ``indices``, default all; eval
    mode, no augmentation)."""
    model.eval()
    embs, labels = [], []
    for x, y in _eval_batches(dataset, config, indices):
        e = model(x.to(config.device, non_blocking=True)).float()
        embs.append(torch.nn.functional.normalize(e, dim=1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels)


@dataclass(frozen=True)
class EvalRows:
    """Which rows of a test set are queries and which gallery, and each row's category.

    Attributes:
        is_query: bool per row, the rows searched for.
        is_gallery: bool per row, the rows searched among (a row in both is left out of its own
            search).
        categories: a category name per row, or ``None``.
    """

    is_query: np.ndarray
    is_gallery: np.ndarray
    categories: np.ndarray | None = None

    @property
    def leave_one_out(self) -> bool:
        """Every row is query and gallery: each row against all the others."""
        return bool(self.is_query.all() and self.is_gallery.all())


def eval_rows(dataset) -> EvalRows | None:
    """The query / gallery roles and categories of ``dataset`` (or of the base data set of a
    :class:`~pml_proxies.benchmark.data.RelabeledSubset`, at its rows), from its attributes
    ``is_query``, ``is_gallery`` (an absent one: every row) and ``categories``; ``None`` when
    it has none of them (leave-one-out, as for the built-in sets but In-Shop)."""
    base, rows = dataset, None
    if isinstance(dataset, RelabeledSubset):
        base, rows = dataset.base, dataset.indices
    values = {k: getattr(base, k, None) for k in ("is_query", "is_gallery", "categories")}
    if all(v is None for v in values.values()):
        return None
    n = len(base)
    arrays = {
        k: np.ones(n, dtype=bool) if v is None else np.asarray(v, dtype=bool)
        for k, v in values.items()
        if k != "categories"
    }
    categories = values["categories"]
    if categories is not None:
        categories = np.asarray(categories, dtype=str)
    if rows is not None:
        arrays = {k: v[rows] for k, v in arrays.items()}
        categories = categories[rows] if categories is not None else None
    return EvalRows(arrays["is_query"], arrays["is_gallery"], categories)


def evaluate(
    model,
    dataset,
    calculator,
    config: BenchmarkConfig,
    return_embeddings=False,
    rows: EvalRows | None = None,
):
    """Retrieval metrics of ``dataset``: against itself (leave-one-out, PML convention), or with
    ``rows`` its queries against its gallery (:func:`retrieval_metrics`); with
    ``return_embeddings`` also the embeddings and labels."""
    if world()[1] > 1:  # under torchrun: each process embeds a share, rank 0's metrics
        return evaluate_sharded(model, dataset, calculator, config, return_embeddings, rows)
    emb, labels = compute_embeddings(model, dataset, config)
    acc = retrieval_metrics(calculator, emb, labels, rows)
    return (acc, emb, labels) if return_embeddings else acc


@torch.no_grad()
def evaluate_sharded(
    model,
    dataset,
    calculator,
    config: BenchmarkConfig,
    return_embeddings=False,
    rows: EvalRows | None = None,
):
    """:func:`evaluate` with several processes: each embeds its
    share of ``dataset`` (:func:`~pml_proxies.distributed.shard_indices`), the shares are
    gathered in order (every rank holds the whole set's embeddings), rank 0 computes the
    metrics and sends them to the others. Collective."""
    from .. import distributed as D

    device = torch.device(config.device)
    shard = D.shard_indices(len(dataset))
    if len(shard):
        emb, labels = compute_embeddings(model, dataset, config, shard)
    else:  # more processes than rows
        emb, labels = torch.zeros(0, config.embedding_size), torch.zeros(0, dtype=torch.long)
    emb, labels = D.gather_embeddings(emb.to(device), labels.to(device))
    emb, labels = emb.cpu(), labels.cpu()
    message = [retrieval_metrics(calculator, emb, labels, rows) if world()[0] == 0 else None]
    torch.distributed.broadcast_object_list(message, src=0)
    acc = message[0]
    return (acc, emb, labels) if return_embeddings else acc


def retrieval_metrics(
    calculator,
    emb: torch.Tensor,
    labels: torch.Tensor,
    rows: EvalRows | None = None,
    queries: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of ``emb``: without ``rows`` (or when every row is query and gallery) each
    row against all the others (leave-one-out, PML's ``ref_includes_query``); else each query
    (``rows.is_query``, and ``queries`` where given: a bool mask of the rows to average over)
    against the gallery rows (``rows.is_gallery``), a row that is both being left out of its
    own search, as OML and the In-Shop protocol do. Queries without a relevant gallery row
    count for no metric (PML's lone queries).

    The queries that are also gallery rows are searched with PML's ``ref_includes_query`` (the
    reference set their rows followed by the other gallery rows), the others with the gallery
    as reference; each metric is the mean of the two parts' means weighted by their counted
    queries: the per-query mean of one search over every query (plain means: the calculator
    must not average per class)."""
    if rows is None or (queries is None and rows.leave_one_out):
        acc = calculator.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
        return {k: float(v) for k, v in acc.items()}
    if calculator.avg_of_avgs or calculator.return_per_class:
        raise ValueError("query / gallery evaluation needs plain means over queries")
    is_query = rows.is_query if queries is None else rows.is_query & queries
    both = is_query & rows.is_gallery
    reference = np.concatenate([np.flatnonzero(both), np.flatnonzero(rows.is_gallery & ~both)])
    ref_emb, ref_labels = emb[reference], labels[reference]
    parts = []
    for part, ref_includes_query in ((both, True), (is_query & ~rows.is_gallery, False)):
        index = torch.from_numpy(np.flatnonzero(part))
        if len(index) == 0:
            continue
        query, query_labels = emb[index], labels[index]
        acc = calculator.get_accuracy(
            query, query_labels, ref_emb, ref_labels, ref_includes_query=ref_includes_query
        )
        parts.append(
            (_counted_queries(calculator, query_labels, ref_labels, ref_includes_query), acc)
        )
    return _weighted_means(parts)


def _counted_queries(calculator, query_labels, reference_labels, ref_includes_query) -> int:
    """The queries a metric of ``calculator`` averages over: those with a relevant reference
    (PML's not-lone queries)."""
    from ..utils.accuracy_calculator import label_match_counts, lone_query_labels

    fn = calculator.label_comparison_fn
    counts = label_match_counts(query_labels, reference_labels, fn)
    return int(lone_query_labels(query_labels, counts, ref_includes_query, fn)[1].sum())


def _weighted_means(parts: list[tuple[int, dict]]) -> dict[str, float]:
    """Each metric's mean over the queries of every part (``(counted queries, means)``): NaN when
    no query counts, as the calculator gives."""
    counted = [(n, acc) for n, acc in parts if n > 0]
    if len(counted) == 1:
        return {k: float(v) for k, v in counted[0][1].items()}
    names = parts[0][1] if parts else {}
    total = sum(n for n, _ in counted)
    return {k: sum(n * float(acc[k]) for n, acc in counted) / total if total else math.nan
            for k in names}  # fmt: skip


def category_metrics(
    calculator, emb: torch.Tensor, labels: torch.Tensor, rows: EvalRows
) -> dict[str, dict[str, float]]:
    """Per category of the queries (``rows.categories``, sorted): the metrics of that
    category's queries against the whole gallery (:func:`retrieval_metrics`; OML's per-category
    metrics)."""
    if rows.categories is None:
        raise ValueError("the rows have no categories")
    names = np.unique(rows.categories[rows.is_query])
    return {
        str(name): retrieval_metrics(calculator, emb, labels, rows, rows.categories == name)
        for name in names
    }


def make_optimizer(
    config: BenchmarkConfig, model: EmbeddingNet, loss, lr: float, proxy_lr_mult: float
):
    """One optimizer, three parameter groups: trunk, embedder, loss parameters (proxies) with
    ``lr * proxy_lr_mult``. The same weight decay for all groups."""
    groups = [
        {"params": list(model.trunk.parameters()), "lr": lr, "name": "trunk"},
        {"params": list(model.embedder.parameters()), "lr": lr, "name": "embedder"},
    ]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": lr * proxy_lr_mult, "name": "loss"})
    name = config.optimizer.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=config.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, weight_decay=config.weight_decay, momentum=0.9)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=config.weight_decay, momentum=0.9)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adamw, adam, rmsprop, sgd")


def _set_trunk_trainable(model: EmbeddingNet, trainable: bool) -> None:
    for p in model.trunk.parameters():
        p.requires_grad_(trainable)


def _train_mode(model: EmbeddingNet, freeze_bn: bool, trunk_frozen: bool) -> None:
    model.train()
    if trunk_frozen:
        model.trunk.eval()
    elif freeze_bn:
        freeze_batchnorm(model.trunk)


def _batch_geometry(num_classes: int, m: int, batch_size: int) -> tuple[int, int]:
    """(m, batch_size) for MPerClassSampler: batch_size a multiple of m and m * C >= batch."""
    if m * num_classes < batch_size:
        m = max(m, batch_size // num_classes)
    batch_size = min(batch_size, m * num_classes)
    batch_size -= batch_size % m
    return m, batch_size


# ------------------------------------------------------------------ one run
@dataclass
class _Run:
    """The pieces of one run, built by :func:`build_run` (mutable training state)."""

    model: EmbeddingNet
    loss: torch.nn.Module
    miner: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loader: DataLoader
    calculator: object
    record_keeper: RecordKeeper
    device: torch.device
    batch_size: int
    m_per_class: int
    num_classes: int
    iteration: int = 0
    ddp: DistributedRun | None = None  # several processes (benchmark.distributed.attach)


@dataclass
class _Selection:
    """The best validation epoch so far (model and loss state kept in memory)."""

    score: float = -math.inf
    epoch: int = 0
    model: dict | None = None
    loss: dict | None = None

    def offer(self, run: _Run, epoch: int, score: float) -> None:
        if score > self.score:
            self.score, self.epoch = score, epoch
            self.model = copy.deepcopy(run.model.state_dict())
            self.loss = copy.deepcopy(run.loss.state_dict())


def build_run(spec: RunSpec, data: BenchmarkData, out: RunFolder | Path) -> _Run:
    """Build the network, loss, optimizer, sampler, loader, accuracy calculator and
    record-keeper of ``spec`` (seeded: every loss of a seed starts from the same network); the
    record-keeper logs into the run folder ``out``
    (:class:`~pml_proxies.benchmark.store.RunFolder` or its path)."""
    from pytorch_metric_learning.utils import logging_presets

    # imported here, not at start-up: it loads PML's losses (scipy.stats and more)
    from ..distributed import DistributedMPerClassSampler

    config = spec.config
    device = torch.device(config.device)
    seed_everything(spec.seed)
    num_classes = data.train.num_classes
    model = build_network(spec.trunk.name, data.in_channels(spec.channels), spec.image_size,
                          spec.trunk.pretrained, config.pooling, config.embedding_size,
                          config.mlp_width).to(device)  # fmt: skip
    loss, miner = build_loss(
        spec.loss,
        num_classes,
        config.embedding_size,
        dataset=config.dataset,
        overrides=dict(spec.loss_overrides),
    )
    loss = loss.to(device)
    optimizer = make_optimizer(config, model, loss, spec.trunk.lr, spec.proxy_lr_mult)
    scheduler = None
    if config.lr_decay_epochs > 0:
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.lr_decay_epochs, gamma=config.lr_decay_gamma
        )
    m, batch_size = _batch_geometry(num_classes, config.m_per_class, config.batch_size)
    sampler = DistributedMPerClassSampler(  # PML's MPerClassSampler, this process's share
        data.train.labels,
        m=m,
        batch_size=batch_size,
        length_before_new_iter=batch_size * config.iterations_per_epoch,
    )
    loader = DataLoader(
        data.train,
        batch_size=sampler.local_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(spec.seed),
        persistent_workers=config.workers > 0,
    )
    folder = run_folder(out)
    record_keeper, _, _ = logging_presets.get_record_keeper(
        str(folder.logs), str(folder.tensorboard)
    )
    run = _Run(
        model=model,
        loss=loss,
        miner=miner,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        calculator=make_accuracy_calculator(spec),
        record_keeper=record_keeper,
        device=device,
        batch_size=batch_size,
        m_per_class=m,
        num_classes=num_classes,
    )
    from .distributed import attach

    return attach(run, spec)  # DDP pieces under torchrun


def fit_one_epoch(run: _Run, spec: RunSpec, epoch: int, position: int = 0) -> float:
    """Train one epoch (warm-up freezing, gradient clipping, logging); the mean batch loss."""
    config = spec.config
    set_epoch = getattr(run.loss, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)
    trunk_frozen = epoch <= spec.trunk.warmup_epochs
    _set_trunk_trainable(run.model, not trunk_frozen)
    if not trunk_frozen and spec.trunk.freeze_bn:
        freeze_batchnorm(run.model.trunk)  # re-freeze BN affine params after the warm-up
    _train_mode(run.model, spec.trunk.freeze_bn, trunk_frozen)
    network: torch.nn.Module = run.model
    loss_fn = run.loss
    if run.ddp is not None:  # under torchrun: DDP network, loss of the gathered global batch
        network, loss_fn = run.ddp.network(run), run.ddp.loss
    losses = []
    bar = progress_bar(
        run.loader,
        desc=f"{spec.loss} s{spec.seed} ep{epoch}/{config.epochs}",
        enabled=config.progress,
        position=position,
        leave=False,
    )
    for x, y in bar:
        check_interrupt()  # a Ctrl-C swallowed by a finalizer stops here
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        emb = network(x)
        indices = run.miner(emb, y) if run.miner is not None else None
        value = loss_fn(emb, y, indices)
        if not torch.isfinite(value):
            raise FloatingPointError(
                f"{spec.loss} seed {spec.seed}: non-finite loss at epoch {epoch}"
            )
        value.backward()
        if run.ddp is not None:  # the proxies' gradients, before clipping and the step
            run.ddp.sync_gradients()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                list(run.model.parameters()) + list(run.loss.parameters()), config.grad_clip
            )
        run.optimizer.step()
        run.iteration += 1
        v = float(value.detach()) / (1 if run.ddp is None else run.ddp.world_size)
        losses.append(v)
        if run.iteration % config.log_freq == 0:
            _log_iteration(run, v)
        bar.set_postfix(loss=f"{v:.4f}", refresh=False)
    if run.scheduler is not None:
        run.scheduler.step()
    return float(np.mean(losses))


def _log_iteration(run: _Run, value: float) -> None:
    rk = run.record_keeper
    rk.update_records({"total_loss": value}, run.iteration, parent_name="train")
    # the loss's recordable attributes (and its statistics where it collects them: Proxy-ISA)
    rk.update_records({"metric_loss": run.loss}, run.iteration, recursive_types=[torch.nn.Module])
    rk.update_records(
        {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)},
        run.iteration,
        parent_name="optimizer",
    )


@dataclass
class TrainedRun:
    """What :func:`train_run` returns: the run's ``result`` (schema
    :class:`~pml_proxies.benchmark.store.ResultRecord`) and its ``map_data`` (the arrays of
    ``map_data.npz``, :func:`map_arrays`; ``None`` when the test classes were not evaluated),
    the ``model`` and ``loss`` of the selected epoch and the number of training classes (what
    ``--save-models`` keeps)."""

    result: dict
    map_data: dict[str, np.ndarray] | None = None
    model: torch.nn.Module | None = None
    loss: torch.nn.Module | None = None
    num_classes: int = 0


def train_run(
    spec: RunSpec,
    data: BenchmarkData,
    folder: RunFolder,
    *,
    val_classes: Sequence | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
    evaluate_test: bool = True,
    position: int = 0,
) -> TrainedRun:
    """Train ``spec``, select its epoch on the validation classes and evaluate it on the test
    classes; the results are returned, not written (the record-keeper alone logs into
    ``folder.logs`` and ``folder.tensorboard`` as it trains).

    A plain training loop rather than PML's trainers: the protocol needs a frozen-trunk warm-up,
    gradient clipping, per-epoch model selection on held-out classes (the best epoch's weights
    kept in memory) and control over resumption, none of which PML's trainers/testers combine.

    Args:
        spec: the run (:func:`~pml_proxies.benchmark.spec.build_run_spec`).
        data: the benchmark's data (:func:`~pml_proxies.benchmark.data.load_benchmark_data`).
        folder: the run's folder (:class:`~pml_proxies.benchmark.store.RunFolder`, started).
        val_classes: which training-split classes are the validation classes, as labels of
            the training split (``data.train.original_labels`` / ``data.val.original_labels``);
            the other training-split classes are trained on (class-disjoint k-fold: a fold's
            held-out classes). ``None``: ``data``'s split.
        epoch_callback: ``epoch_callback(epoch, val_metrics)`` after each validated epoch
            (``val_metrics``: metric name -> value); it may raise to stop the run (e.g. Optuna
            pruning), the exception propagates.
        evaluate_test: evaluate the selected epoch on the test classes, and compute the map
            data when ``spec.seed`` is the first of the command's seeds (the report draws the
            maps of each loss's first seed only; :func:`map_arrays`). ``False`` (tuning trials)
            never touches the test classes: the result's ``test`` is ``None``.
        position: row of the progress bar.

    Returns:
        The :class:`TrainedRun`. Its result dict: ``loss``, ``seed``, ``best_epoch``,
        ``best_val_score``, ``train_time_s``, ``iterations``, ``batch_size``, ``m_per_class``,
        ``test`` (metrics or ``None``; the test set's queries against its gallery where it
        names them, :func:`eval_rows`, else leave-one-out), ``history`` (per-epoch train loss
        and validation metrics), ``loss_kwargs``, ``config_fingerprint``, ``command`` (the
        command line that trained it), ``world_size`` (processes that trained it: 1, or
        torchrun's, :mod:`~pml_proxies.benchmark.distributed`), and ``test_by_category``
        (category -> metrics, :func:`category_metrics`) only when the test set has categories.
    """
    if val_classes is not None:
        data = data.with_validation_classes(val_classes)
    run = build_run(spec, data, folder)
    # re-seed once everything is built: with a given seed every loss starts from the same network
    # and sees the same batches and augmentations (as long as the loss draws no random numbers)
    seed_everything(spec.seed)
    history, selection = [], _Selection()
    if spec.trunk.freeze_bn:
        freeze_batchnorm(run.model.trunk)
    start = time.time()
    epochs = spec.config.epochs
    test, by_category = None, None
    try:
        for epoch in range(1, epochs + 1):
            train_loss = fit_one_epoch(run, spec, epoch, position)
            row = {"epoch": epoch, "iteration": run.iteration, "train_loss": train_loss}
            val = None
            if len(data.val) > 0 and (epoch % spec.config.eval_every == 0 or epoch == epochs):
                val = evaluate(run.model, data.val, run.calculator, spec.config)
                row.update({f"val_{k}": v for k, v in val.items()})
                run.record_keeper.update_records(val, epoch, parent_name="accuracies_val")
                selection.offer(run, epoch, val[spec.primary_metric])
            _save_records(run, row, epoch)
            history.append(row)
            if val is not None and epoch_callback is not None:
                epoch_callback(epoch, dict(val))
        train_time = time.time() - start
        select(run, selection, epochs)
        if evaluate_test:
            rows = eval_rows(data.test)
            test, test_emb, test_labels = evaluate(
                run.model, data.test, run.calculator, spec.config, True, rows
            )
            if rows is not None and rows.categories is not None:
                by_category = category_metrics(run.calculator, test_emb, test_labels, rows)
            rk = run.record_keeper
            rk.update_records(test, selection.epoch, parent_name="accuracies_test")
            rk.save_records()
    finally:  # also when a callback stops the run
        if run.record_keeper.tensorboard_writer is not None:
            run.record_keeper.tensorboard_writer.close()
    map_data = None
    if evaluate_test and spec.seed == spec.config.seeds[0]:
        map_data = map_arrays(run.model, data, test_emb, test_labels, run.loss, spec.config,
                              run.num_classes)  # fmt: skip
    result = {
        "loss": spec.loss,
        "seed": spec.seed,
        "best_epoch": selection.epoch,
        "best_val_score": None if selection.model is None else selection.score,
        "train_time_s": train_time,
        "iterations": run.iteration,
        "batch_size": run.batch_size,
        "m_per_class": run.m_per_class,
        "test": test,
        "history": history,
        "loss_kwargs": {k: repr(v) for k, v in spec.loss_kwargs.items()},
        "config_fingerprint": spec.fingerprint,
        "command": spec.config.command,
        "world_size": world()[1],
    }
    if by_category is not None:
        result["test_by_category"] = by_category
    return TrainedRun(result, map_data, run.model, run.loss, run.num_classes)


def train_and_evaluate(
    spec: RunSpec,
    data: BenchmarkData,
    out: RunFolder | Path,
    *,
    val_classes: Sequence | None = None,
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
    evaluate_test: bool = True,
    position: int = 0,
) -> dict:
    """:func:`train_run` into the run folder ``out``
    (:class:`~pml_proxies.benchmark.store.RunFolder` or its path; emptied first), then store its
    results there (with ``--save-models`` and ``evaluate_test``, the selected model first:
    :func:`~pml_proxies.benchmark.models_io.save_run_model`; then
    :meth:`~pml_proxies.benchmark.store.RunFolder.save`: ``map_data.npz`` with
    ``evaluate_test``, then ``result.json``, which marks the run as finished). The keyword
    arguments are :func:`train_run`'s; a run stopped by ``epoch_callback`` writes no
    ``result.json``.

    Returns:
        The result dict written to ``result.json``
        (:class:`~pml_proxies.benchmark.store.ResultRecord`).
    """
    folder = run_folder(out)
    folder.start()  # an unfinished earlier attempt: start clean (records would be duplicated)
    trained = train_run(
        spec,
        data,
        folder,
        val_classes=val_classes,
        epoch_callback=epoch_callback,
        evaluate_test=evaluate_test,
        position=position,
    )
    if spec.config.save_models and evaluate_test:  # a run's model (a tuning trial keeps none)
        assert trained.model is not None and trained.loss is not None
        save_run_model(folder, spec, trained.model, trained.loss, trained.num_classes,
                       trained.result["best_epoch"], data.in_channels(spec.channels))  # fmt: skip
    folder.save(trained.result, trained.map_data)
    return trained.result


def _save_records(run: _Run, row: dict, epoch: int) -> None:
    run.record_keeper.update_records(
        {"train_loss_epoch": row["train_loss"]}, epoch, parent_name="epoch"
    )
    run.record_keeper.save_records()


def select(run: _Run, selection: _Selection, epochs: int) -> None:
    """Load the best validation epoch's weights (no validation split: keep the last epoch)."""
    if selection.model is not None:
        assert selection.loss is not None  # offer() keeps both
        run.model.load_state_dict(selection.model)
        run.loss.load_state_dict(selection.loss)
    else:
        selection.epoch = epochs


def persist(out: RunFolder | Path, result: dict) -> None:
    """Write ``result.json`` atomically: its presence marks the run as finished
    (:meth:`~pml_proxies.benchmark.store.RunFolder.save`)."""
    run_folder(out).save(result)


def train_one(
    config: BenchmarkConfig,
    data: BenchmarkData,
    loss_name: str,
    seed: int,
    output: Path,
    position: int = 0,
) -> dict:
    """Train ``loss_name`` with ``seed`` into ``run_dir(output, loss_name, seed)`` (a
    :func:`train_and_evaluate` of :func:`~pml_proxies.benchmark.spec.build_run_spec`)."""
    spec = build_run_spec(config, loss_name, seed)
    return train_and_evaluate(spec, data, run_dir(output, loss_name, seed), position=position)


def _subsample(n_total: int, n_max: int) -> np.ndarray:
    """Sorted indices of a fixed random subsample of at most ``n_max`` of ``n_total`` rows."""
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(n_total, size=min(n_total, n_max), replace=False))


def map_arrays(
    model, data, emb, labels, loss, config: BenchmarkConfig, num_classes: int
) -> dict[str, np.ndarray]:
    """The data of the 2-D map plot (stored as ``map_data.npz``): a subsample of the test embeddings
    (``embeddings``, ``labels``), a subsample of the training-class embeddings of the fitted model
    with the evaluation preprocessing (``train_embeddings`` float32, ``train_labels`` in
    ``[0, C)``, the numbering of ``proxy_labels``) and the learned proxies (``proxies``,
    ``proxy_labels``, ``proxy_uncertainty`` where the loss has one)."""
    idx = _subsample(len(labels), config.map_samples)
    arrays = {"embeddings": emb[idx].numpy(), "labels": labels[idx].numpy()}
    train_eval = data.train_eval
    if train_eval is not None and len(train_eval) > 0:
        rows = _subsample(len(train_eval), config.map_samples)
        train_emb, train_labels = compute_embeddings(model, train_eval, config, rows.tolist())
        arrays["train_embeddings"] = train_emb.numpy().astype(np.float32)
        arrays["train_labels"] = train_labels.numpy().astype(np.int64)
    proxies = get_proxies(loss, num_classes)
    if proxies is not None:
        arrays["proxies"], arrays["proxy_labels"], std = proxies
        if std is not None:
            arrays["proxy_uncertainty"] = std
    return arrays


__all__ = [
    "train_run",
    "TrainedRun",
    "train_and_evaluate",
    "train_one",
    "build_run",
    "fit_one_epoch",
    "select",
    "persist",
    # the run folder's own names live in .store (re-exported for existing imports)
    "RESULT_FILE",
    "ResultRecord",
    "inspect_run",
    "load_result",
    "run_dir",
    "evaluate",
    "EvalRows",
    "eval_rows",
    "retrieval_metrics",
    "category_metrics",
    "make_optimizer",
]
