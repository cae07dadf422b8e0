"""One benchmark run: train one loss with one seed under the shared protocol, select the epoch on
the validation classes, evaluate it on the test classes and write the results atomically."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import BenchmarkConfig
from .data import BenchmarkData, probe_channels
from .losses import build_loss, get_proxies
from .models import EmbeddingNet, build_trunk, freeze_batchnorm

RESULT_FILE = "result.json"


# ------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accuracy_calculator(config: BenchmarkConfig):
    """``pml_proxies.AccuracyCalculator`` with the benchmark's metrics (``k="max_bin_count"``
    for PML's metrics, widened for Recall@k / nDCG@k)."""
    try:
        from .. import AccuracyCalculator
    except ImportError:
        from ..utils.accuracy_calculator import AccuracyCalculator
    include = ["precision_at_1", "r_precision", "mean_average_precision_at_r"]
    include += [f"recall_at_{k}" for k in config.recall_ks]
    include += [f"ndcg_at_{k}" for k in config.ndcg_ks]
    return AccuracyCalculator(
        include=tuple(include),
        k="max_bin_count",
        device=torch.device(config.device),
        recall_ks=tuple(config.recall_ks),
        ndcg_ks=tuple(config.ndcg_ks),
    )


@torch.no_grad()
def compute_embeddings(
    model, dataset, config: BenchmarkConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings and labels of ``dataset`` (eval mode, no augmentation)."""
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=config.eval_batch_size,
        shuffle=False,
        num_workers=config.workers,
    )
    embs, labels = [], []
    for x, y in loader:
        e = model(x.to(config.device, non_blocking=True)).float()
        embs.append(torch.nn.functional.normalize(e, dim=1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels)


def evaluate(model, dataset, calculator, config: BenchmarkConfig, return_embeddings=False):
    """Retrieval metrics of ``dataset`` against itself (leave-one-out, PML convention); with
    ``return_embeddings`` also the embeddings and labels."""
    emb, labels = compute_embeddings(model, dataset, config)
    acc = calculator.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
    acc = {k: float(v) for k, v in acc.items()}
    return (acc, emb, labels) if return_embeddings else acc


def make_optimizer(config: BenchmarkConfig, model: EmbeddingNet, loss, lr: float):
    """One optimizer, three parameter groups: trunk, embedder, loss parameters (proxies) with
    ``lr * proxy_lr_mult``. The same weight decay for all groups."""
    groups = [
        {"params": list(model.trunk.parameters()), "lr": lr, "name": "trunk"},
        {"params": list(model.embedder.parameters()), "lr": lr, "name": "embedder"},
    ]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": lr * config.proxy_lr_mult, "name": "loss"})
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


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def run_dir(output: Path, loss_name: str, seed: int) -> Path:
    return Path(output) / "runs" / loss_name / f"seed_{seed}"


def load_result(output: Path, loss_name: str, seed: int) -> dict | None:
    """The finished run's results, or ``None`` if the run has not finished."""
    path = run_dir(output, loss_name, seed) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


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
def train_one(
    config: BenchmarkConfig,
    data: BenchmarkData,
    loss_name: str,
    seed: int,
    output: Path,
    position: int = 0,
) -> dict:
    """Train ``loss_name`` with ``seed``; returns (and writes) the run's result dict."""
    from pytorch_metric_learning.utils import logging_presets

    out = run_dir(output, loss_name, seed)
    if out.exists():  # an unfinished earlier attempt: start clean (records would be duplicated)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    device = torch.device(config.device)
    seed_everything(seed)

    num_classes = data.train.num_classes
    in_channels = probe_channels(data.train)
    trunk = build_trunk(config.trunk, in_channels, config.image_size_or_default, config.pretrained)
    model = EmbeddingNet(trunk, config.pooling, config.embedding_size).to(device)
    loss, miner = build_loss(
        loss_name,
        num_classes,
        config.embedding_size,
        dataset=config.dataset,
        overrides=config.loss_params.get(loss_name),
    )
    loss = loss.to(device)
    lr = config.lr_or_default
    optimizer = make_optimizer(config, model, loss, lr)
    scheduler = None
    if config.lr_decay_epochs > 0:
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.lr_decay_epochs, gamma=config.lr_decay_gamma
        )
    m, batch_size = _batch_geometry(num_classes, config.m_per_class, config.batch_size)
    sampler = MPerClassSampler(
        data.train.labels,
        m=m,
        batch_size=batch_size,
        length_before_new_iter=batch_size * config.iterations_per_epoch,
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        data.train,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=config.workers > 0,
    )
    calculator = make_accuracy_calculator(config)
    record_keeper, _, _ = logging_presets.get_record_keeper(
        str(out / "logs"), str(out / "tensorboard")
    )

    # re-seed once everything is built: with a given seed every loss starts from the same network
    # and sees the same batches and augmentations (as long as the loss draws no random numbers)
    seed_everything(seed)
    history: list[dict] = []
    best = {"score": -math.inf, "epoch": 0, "model": None, "loss": None}
    iteration = 0
    start = time.time()
    freeze_bn = config.freeze_bn_or_default
    if freeze_bn:
        freeze_batchnorm(model.trunk)
    desc = f"{loss_name} s{seed}"
    for epoch in range(1, config.epochs + 1):
        if hasattr(loss, "set_epoch"):
            loss.set_epoch(epoch)
        trunk_frozen = epoch <= config.warmup_epochs_or_default
        _set_trunk_trainable(model, not trunk_frozen)
        if not trunk_frozen and freeze_bn:
            freeze_batchnorm(model.trunk)  # re-freeze BN affine params after the warm-up
        _train_mode(model, freeze_bn, trunk_frozen)
        losses = []
        bar = tqdm(
            loader,
            desc=f"{desc} ep{epoch}/{config.epochs}",
            leave=False,
            disable=not config.progress,
            position=position,
        )
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            emb = model(x)
            indices = miner(emb, y) if miner is not None else None
            value = loss(emb, y, indices)
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"{loss_name} seed {seed}: non-finite loss at epoch {epoch}"
                )
            value.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(
                    list(model.parameters()) + list(loss.parameters()), config.grad_clip
                )
            optimizer.step()
            iteration += 1
            v = float(value.detach())
            losses.append(v)
            if iteration % config.log_freq == 0:
                record_keeper.update_records({"total_loss": v}, iteration, parent_name="train")
                record_keeper.update_records(
                    {"metric_loss": loss}, iteration, recursive_types=[torch.nn.Module]
                )
                record_keeper.update_records(
                    {
                        f"lr_{g.get('name', i)}": g["lr"]
                        for i, g in enumerate(optimizer.param_groups)
                    },
                    iteration,
                    parent_name="optimizer",
                )
            bar.set_postfix(loss=f"{v:.4f}", refresh=False)
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, "iteration": iteration, "train_loss": float(np.mean(losses))}
        if len(data.val) > 0 and (epoch % config.eval_every == 0 or epoch == config.epochs):
            val = evaluate(model, data.val, calculator, config)
            row.update({f"val_{k}": v for k, v in val.items()})
            record_keeper.update_records(val, epoch, parent_name="accuracies_val")
            score = val[config.primary_metric]
            if score > best["score"]:
                best.update(
                    score=score,
                    epoch=epoch,
                    model=copy.deepcopy(model.state_dict()),
                    loss=copy.deepcopy(loss.state_dict()),
                )
        record_keeper.update_records(
            {"train_loss_epoch": row["train_loss"]}, epoch, parent_name="epoch"
        )
        record_keeper.save_records()
        history.append(row)
    train_time = time.time() - start

    if best["model"] is not None:
        model.load_state_dict(best["model"])
        loss.load_state_dict(best["loss"])
    else:  # no validation split: last epoch
        best["epoch"] = config.epochs
    test, test_emb, test_labels = evaluate(
        model, data.test, calculator, config, return_embeddings=True
    )
    record_keeper.update_records(test, best["epoch"], parent_name="accuracies_test")
    record_keeper.save_records()
    if record_keeper.tensorboard_writer is not None:
        record_keeper.tensorboard_writer.close()

    _save_map_data(model, data, test_emb, test_labels, loss, config, out, num_classes)
    result = {
        "loss": loss_name,
        "seed": seed,
        "best_epoch": best["epoch"],
        "best_val_score": None if best["model"] is None else best["score"],
        "train_time_s": train_time,
        "iterations": iteration,
        "batch_size": batch_size,
        "m_per_class": m,
        "test": test,
        "history": history,
        "loss_kwargs": _describe_kwargs(config, loss_name),
        "config_fingerprint": config.fingerprint(loss_name),
    }
    _write_json_atomic(out / RESULT_FILE, result)
    return result


def _describe_kwargs(config: BenchmarkConfig, loss_name: str) -> dict:
    from .losses import loss_kwargs

    return {
        k: repr(v)
        for k, v in loss_kwargs(
            loss_name, config.dataset, config.loss_params.get(loss_name)
        ).items()
    }


def _subsample(n_total: int, n_max: int) -> np.ndarray:
    """Sorted indices of a fixed random subsample of at most ``n_max`` of ``n_total`` rows."""
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(n_total, size=min(n_total, n_max), replace=False))


def _save_map_data(model, data, emb, labels, loss, config, out: Path, num_classes: int) -> None:
    """Save the data of the 2-D map plot in ``map_data.npz``: a subsample of the test embeddings
    (``embeddings``, ``labels``), a subsample of the training-class embeddings of the fitted model
    with the evaluation preprocessing (``train_embeddings`` float32, ``train_labels`` in
    ``[0, C)``, the numbering of ``proxy_labels``) and the learned proxies (``proxies``,
    ``proxy_labels``, ``proxy_uncertainty`` where the loss has one)."""
    idx = _subsample(len(labels), config.map_samples)
    arrays = {"embeddings": emb[idx].numpy(), "labels": labels[idx].numpy()}
    train_eval = data.train_eval
    if train_eval is not None and len(train_eval) > 0:
        rows = _subsample(len(train_eval), config.map_samples)
        train_emb, train_labels = compute_embeddings(
            model, torch.utils.data.Subset(train_eval, rows.tolist()), config
        )
        arrays["train_embeddings"] = train_emb.numpy().astype(np.float32)
        arrays["train_labels"] = train_labels.numpy().astype(np.int64)
    proxies = get_proxies(loss, num_classes)
    if proxies is not None:
        arrays["proxies"], arrays["proxy_labels"], std = proxies
        if std is not None:
            arrays["proxy_uncertainty"] = std
    np.savez_compressed(out / "map_data.npz", **arrays)


__all__ = ["train_one", "load_result", "run_dir", "evaluate", "make_optimizer", "asdict"]
