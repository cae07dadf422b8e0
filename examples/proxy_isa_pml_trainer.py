"""Proxy-ISA with a PML trainer, record-keeper logging and checkpoint / resume.

Shows how to train ``pml_proxies.losses.ProxyISALoss`` with PML's ``MetricLossOnly`` trainer:

* the proxies get their own optimizer (``metric_loss_optimizer``, lr x100 as Proxy-Anchor);
* ``pml_proxies.hooks.SetEpochHook`` drives the loss's epoch schedule (memory from epoch 3,
  outlier filter from epoch 4) and is chained with ``HookContainer.end_of_epoch_hook``, which
  tests, logs (CSV + SQLite via record-keeper) and checkpoints after every epoch;
* ``collect_stats=True`` makes the loss record its statistics (effective number, memory fill,
  outlier fraction, weights), printed per epoch at the end;
* running the same command again resumes from the last checkpoint (raise ``--epochs`` to train
  further).

Data: scikit-learn's digits (classes 0-4 train, 5-9 test), or Omniglot with
``--dataset omniglot --data-root DIR`` (the folder holding the Omniglot zip files).

    python examples/proxy_isa_pml_trainer.py --quick --output-dir /tmp/proxy_isa
"""

import argparse
import logging
import warnings

import pandas as pd
import torch
from pytorch_metric_learning import testers, trainers
from pytorch_metric_learning.utils import logging_presets
from torch import nn

import pml_proxies
from pml_proxies.datasets import get_dataset, get_transforms
from pml_proxies.hooks import SetEpochHook
from pml_proxies.losses import ProxyISALoss

STATS = ["mean_effective_number", "memory_fill", "outlier_fraction", "mean_positive_weight",
         "mean_negative_weight", "mean_learned_similarity"]  # fmt: skip

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="a few iterations (CI smoke run)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--output-dir", default="proxy_isa_output")
parser.add_argument("--dataset", default="digits", choices=["digits", "omniglot"])
parser.add_argument("--data-root", default=None, help="folder of the Omniglot zips")
parser.add_argument("--epochs", type=int, default=None, help="default: 4 quick, 10 otherwise")
parser.add_argument("--embedding-size", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
args = parser.parse_args()
epochs = args.epochs or (4 if args.quick else 10)
device = torch.device(args.device)
torch.manual_seed(0)
if device.type == "cpu":
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
logging.getLogger("PML").setLevel(logging.WARNING)
# PML's progress bar reads the loss as a float: harmless warning on recent torch
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")

# data: class-disjoint train / test splits; images (1, H, W) in [0, 1]
size = 8 if args.dataset == "digits" else 32
train_set, test_set = (
    get_dataset(args.dataset, split, root=args.data_root,
                transform=get_transforms(args.dataset, train=split == "train", image_size=size))
    for split in ("train", "test")
)  # fmt: skip
num_classes = train_set.num_classes

# models: a small CNN trunk and a linear embedder
trunk = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(),
).to(device)  # fmt: skip
embedder = nn.Linear(64, args.embedding_size).to(device)

# the loss: paper defaults; a memory of about one epoch of embeddings for this small set
loss = ProxyISALoss(num_classes, args.embedding_size, memory_size=len(train_set),
                    collect_stats=True).to(device)  # fmt: skip
optimizers = {
    "trunk_optimizer": torch.optim.AdamW(trunk.parameters(), lr=args.lr, weight_decay=1e-4),
    "embedder_optimizer": torch.optim.AdamW(embedder.parameters(), lr=args.lr, weight_decay=1e-4),
    "metric_loss_optimizer": torch.optim.AdamW(loss.parameters(), lr=args.lr * 100),
}

# logging, testing and checkpointing (record-keeper + HookContainer)
record_keeper, _, _ = logging_presets.get_record_keeper(f"{args.output_dir}/logs")
hooks = logging_presets.get_hook_container(
    record_keeper, primary_metric="precision_at_1", validation_split_name="test", log_freq=1
)
tester = testers.GlobalEmbeddingSpaceTester(
    end_of_testing_hook=hooks.end_of_testing_hook,
    accuracy_calculator=pml_proxies.AccuracyCalculator(
        include=("precision_at_1", "recall_at_4", "mean_average_precision_at_r"),
        recall_ks=(4,), ndcg_ks=(), k="max_bin_count",
    ),
    batch_size=256, dataloader_num_workers=0, data_device=device,
)  # fmt: skip
model_folder = f"{args.output_dir}/models"
# the held-out classes serve for model selection and reporting here; split a validation set
# off the training classes in real work
save_and_test = hooks.end_of_epoch_hook(tester, {"test": test_set}, model_folder)
epoch_hook = SetEpochHook()  # advances the loss's epoch, then tests and saves

trainer = trainers.MetricLossOnly(
    models={"trunk": trunk, "embedder": embedder},
    optimizers=optimizers,
    batch_size=args.batch_size,
    loss_funcs={"metric_loss": loss},
    dataset=train_set,
    sampler=None,  # random batches, as the papers (proxy losses need no class-balanced batches)
    iterations_per_epoch=5 if args.quick else None,  # None: one pass over the data
    dataloader_num_workers=0,
    data_device=device,
    end_of_iteration_hook=hooks.end_of_iteration_hook,
    end_of_epoch_hook=epoch_hook.end_of_epoch_hook(save_and_test),
)
epoch_hook.attach(trainer)  # keeps the schedule right after a resume
start_epoch = hooks.load_latest_saved_models(trainer, model_folder, device)
if start_epoch > epochs:
    print(f"the checkpoint is at epoch {start_epoch - 1}: raise --epochs to train further")
else:
    print(f"training epochs {start_epoch}..{epochs} on {args.dataset} ({device})")
    trainer.train(start_epoch, epochs)

# results: accuracy per epoch and the loss's statistics (mean over each epoch's iterations)
accuracy = pd.DataFrame(hooks.get_accuracy_history(tester, "test", return_all_metrics=True))
print("\nTest accuracy per epoch:")
print(accuracy[["epoch", "precision_at_1_level0", "recall_at_4_level0",
                "mean_average_precision_at_r_level0"]].to_string(index=False))  # fmt: skip
stats = pd.DataFrame(record_keeper.query(
    "SELECT * FROM metric_loss_ProxyISALoss", return_dict=True))  # fmt: skip
stats["epoch"] = stats["~iteration~"] // trainer.iterations_per_epoch + 1  # from 0
print("\nProxy-ISA statistics per epoch (memory from epoch 3, filter from epoch 4):")
print(stats.groupby("epoch")[STATS].mean().round(4).to_string())
print(f"\nlogs: {args.output_dir}/logs, checkpoints: {model_folder}")
