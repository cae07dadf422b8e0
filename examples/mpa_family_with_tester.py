"""The Multi Proxy Anchor family, trained with a PML trainer and evaluated with PML's tester.

Shows how to train the three MPA losses (Saeki & Kawahara) with PML's ``MetricLossOnly``
trainer (the proxies have their own optimizer, lr x100 as in the paper: 1e-4 / 1e-2) and how
to evaluate with PML's ``GlobalEmbeddingSpaceTester`` using ``pml_proxies.AccuracyCalculator``,
which adds nDCG@k (MPA paper eq. 19-20) and Recall@k to PML's metrics. Every loss starts from
the same initial network (same seed); the results are printed as one table (x100, as the
paper's tables) and written to ``OUTPUT_DIR/results.csv``.

Data: scikit-learn's digits (classes 0-4 train, 5-9 test), or Omniglot with
``--dataset omniglot --data-root DIR`` (the folder holding the Omniglot zip files).

    python examples/mpa_family_with_tester.py --quick --output-dir /tmp/mpa
"""

import argparse
import logging
import warnings
from pathlib import Path

import pandas as pd
import torch
from pytorch_metric_learning import testers, trainers
from torch import nn

import pml_proxies
from pml_proxies.datasets import get_dataset, get_transforms
from pml_proxies.losses import (
    AllPairsMultiProxyAnchorLoss,
    DataWiseMultiProxyAnchorLoss,
    MultiProxyAnchorLoss,
)

LOSSES = {
    "MPA": MultiProxyAnchorLoss,
    "DW-MPA": DataWiseMultiProxyAnchorLoss,
    "AP-MPA": AllPairsMultiProxyAnchorLoss,
}
RECALL_KS, NDCG_KS = (1, 2, 4, 8), (10,)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="a few iterations (CI smoke run)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--output-dir", default="mpa_output")
parser.add_argument("--dataset", default="digits", choices=["digits", "omniglot"])
parser.add_argument("--data-root", default=None, help="folder of the Omniglot zips")
parser.add_argument("--epochs", type=int, default=None, help="default: 1 quick, 5 otherwise")
parser.add_argument("--centers-per-class", type=int, default=10, help="K (paper: 10 on CUB)")
parser.add_argument("--embedding-size", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
args = parser.parse_args()
epochs = args.epochs or (1 if args.quick else 5)
device = torch.device(args.device)
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

# evaluation: PML's tester with this package's AccuracyCalculator (nDCG@k, Recall@k)
metrics = [f"recall_at_{k}" for k in RECALL_KS] + [f"ndcg_at_{k}" for k in NDCG_KS]
metrics.append("mean_average_precision_at_r")
tester = testers.GlobalEmbeddingSpaceTester(
    accuracy_calculator=pml_proxies.AccuracyCalculator(
        include=metrics, ndcg_ks=NDCG_KS, recall_ks=RECALL_KS, k="max_bin_count"
    ),
    batch_size=256, dataloader_num_workers=0, data_device=device,
)  # fmt: skip


def train_and_test(loss_class):
    torch.manual_seed(0)  # the same initial network and batches for every loss
    trunk = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).to(device)  # fmt: skip
    embedder = nn.Linear(64, args.embedding_size).to(device)
    # paper defaults: K = 10, alpha = 32, delta = 0.1, gamma = 0.1, center regulariser tau = 0.2
    loss = loss_class(train_set.num_classes, args.embedding_size,
                      centers_per_class=args.centers_per_class).to(device)  # fmt: skip
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.AdamW(trunk.parameters(), lr=args.lr),
            "embedder_optimizer": torch.optim.AdamW(embedder.parameters(), lr=args.lr),
            "metric_loss_optimizer": torch.optim.AdamW(loss.parameters(), lr=args.lr * 100),
        },
        batch_size=args.batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=train_set,  # random batches (sampler=None), as the paper
        iterations_per_epoch=10 if args.quick else None,  # None: one pass over the data
        dataloader_num_workers=0,
        data_device=device,
    )
    trainer.train(num_epochs=epochs)
    accuracies = tester.test({"test": test_set}, epochs, trunk, embedder)["test"]
    return {m: 100 * accuracies[f"{m}_level0"] for m in metrics}


rows = {}
for name, loss_class in LOSSES.items():
    print(f"\n== {name} ({loss_class.__name__})")
    rows[name] = train_and_test(loss_class)

table = pd.DataFrame.from_dict(rows, orient="index")
table.columns = [f"R@{k}" for k in RECALL_KS] + [f"nDCG@{k}" for k in NDCG_KS] + ["MAP@R"]
print(f"\nTest classes of {args.dataset} after {epochs} epoch(s), x100:")
print(table.round(2).to_string())
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
table.to_csv(out / "results.csv", index_label="loss")
print(f"\nsaved {out / 'results.csv'}")
