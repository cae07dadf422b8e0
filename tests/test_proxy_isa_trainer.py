"""ProxyISALoss inside PML trainers: the epoch schedule, HookContainer checkpoint / resume and
record-keeper statistics (tiny MetricLossOnly runs on random tensors)."""

from __future__ import annotations

import logging
import sqlite3
import warnings

import pandas as pd
import pytest
import torch

pytest.importorskip("record_keeper")
pytest.importorskip("faiss")

from pytorch_metric_learning import testers, trainers  # noqa: E402
from pytorch_metric_learning.utils import logging_presets  # noqa: E402
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # noqa: E402

from pml_proxies.hooks import SetEpochHook  # noqa: E402
from pml_proxies.losses import ProxyISALoss  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end PML trainer runs

logging.getLogger("PML").setLevel(logging.WARNING)
STATS = (
    "mean_effective_number",
    "memory_fill",
    "outlier_fraction",
    "mean_positive_weight",
    "mean_negative_weight",
    "mean_learned_similarity",
)
EPOCHS, INTERRUPT = 4, 2


def dataset(seed, n=48, classes=6):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    X = torch.randn(classes, 8, generator=gen)[y] + 0.8 * torch.randn(n, 8, generator=gen)
    return torch.utils.data.TensorDataset(X, y)


def run(folder, start_epoch, num_epochs, mode="ordered", collect_stats=False, log_freq=1000):
    """A MetricLossOnly run (seeded) that resumes from ``folder`` when a checkpoint is there;
    returns the loss of every iteration."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(8, 4)
    loss = ProxyISALoss(6, 4, memory_size=20, memory_start_epoch=2, filter_start_epoch=3,
                        volume_bound=4.0, hardness_scale=0.5, collect_stats=collect_stats)  # fmt: skip
    record_keeper, _, _ = logging_presets.get_record_keeper(str(folder / "logs"))
    hooks = logging_presets.get_hook_container(
        record_keeper, primary_metric="precision_at_1", log_freq=log_freq
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        end_of_testing_hook=hooks.end_of_testing_hook,
        accuracy_calculator=AccuracyCalculator(include=("precision_at_1",), k=1),
        dataloader_num_workers=0,
        batch_size=16,
    )
    save_and_test = hooks.end_of_epoch_hook(tester, {"val": dataset(1)}, str(folder / "models"))
    epoch_hook = SetEpochHook()
    losses = []

    def record_loss(trainer):
        losses.append(trainer.losses["metric_loss"].item())
        hooks.end_of_iteration_hook(trainer)

    if mode == "ordered":  # the epoch advances, then the checkpoint is saved
        end_of_epoch = epoch_hook.end_of_epoch_hook(save_and_test)
    else:  # checkpoint first, then the epoch advances

        def end_of_epoch(trainer):
            result = save_and_test(trainer)
            epoch_hook(trainer)
            return result

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk},
        optimizers={
            "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
            "metric_loss_optimizer": torch.optim.SGD(loss.parameters(), lr=0.5),
        },
        batch_size=12,
        loss_funcs={"metric_loss": loss},
        dataset=dataset(0),
        sampler=torch.utils.data.SequentialSampler(range(48)),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        end_of_iteration_hook=record_loss,
        end_of_epoch_hook=end_of_epoch,
    )
    if mode == "reversed_attached":
        epoch_hook.attach(trainer)
    start = hooks.load_latest_saved_models(trainer, str(folder / "models"), torch.device("cpu"))
    assert start == start_epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PML's progress bar on a tensor with grad
        trainer.train(start, num_epochs)
    return losses, loss


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    losses, loss = run(tmp_path_factory.mktemp("full"), 1, EPOCHS)
    assert bool(loss.filter_enabled) and int(loss.epoch) == EPOCHS + 1
    return losses


@pytest.mark.parametrize("mode", ["ordered", "reversed_attached"])
def test_hook_container_resume_continues_the_schedule(tmp_path, uninterrupted, mode):
    first, _ = run(tmp_path, 1, INTERRUPT, mode)
    rest, loss = run(tmp_path, INTERRUPT + 1, EPOCHS, mode)  # fresh objects, loads checkpoint
    assert first + rest == uninterrupted
    assert int(loss.epoch) == EPOCHS + 1 and int(loss.memory_count) == 20


def test_resume_without_sync_would_break_the_schedule(tmp_path, uninterrupted):
    # control: checkpoint saved before the epoch advances and no attach() -> the resumed epoch 3
    # runs without the filter, so the losses differ (what attach() and the ordering prevent)
    first, _ = run(tmp_path, 1, INTERRUPT, "reversed")
    rest, _ = run(tmp_path, INTERRUPT + 1, EPOCHS, "reversed")
    assert first + rest != uninterrupted


def test_statistics_reach_csv_and_sqlite_records(tmp_path):
    run(tmp_path, 1, 3, collect_stats=True, log_freq=1)
    logs = tmp_path / "logs"
    table = "metric_loss_ProxyISALoss"
    frame = pd.read_csv(logs / f"{table}.csv")
    for name in STATS:
        assert name in frame.columns, name
    assert len(frame) == 12  # 3 epochs x 4 iterations
    assert frame["memory_fill"].iloc[-1] == 1.0  # 20 entries, memory on from epoch 2
    assert frame["memory_fill"].iloc[3] == 0.0 and frame["memory_fill"].iloc[4] > 0
    assert (frame["mean_negative_weight"] <= 1).all()
    assert frame["mean_effective_number"].is_monotonic_increasing
    with sqlite3.connect(logs / "logs.db") as db:
        rows = db.execute(f"SELECT {', '.join(STATS)} FROM {table}").fetchall()
    assert len(rows) == 12
