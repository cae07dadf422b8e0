"""VCPA in a plain PyTorch training loop, evaluated with pml_proxies.AccuracyCalculator.

Shows how to use ``pml_proxies.losses.VCPALoss`` without a PML trainer:

* the loss updates its Gaussian proxies itself (Newton steps inside ``forward`` in training
  mode), so only the network has an optimizer (with ``newton_steps=0`` the proxy means and
  standard deviations become Parameters: give them an optimizer then);
* ``pml_proxies.hooks.set_epoch(loss, epoch)`` at the start of each epoch: a no-op for VCPA
  (no epoch schedule), but it drives the schedule of losses that have one (``ProxyISALoss``),
  so the loop works for every loss of the package;
* evaluation: Recall@k, nDCG@k and MAP@R of the test classes' embeddings among themselves;
* the per-proxy uncertainty (VCPA supplement eq. 30) printed after training, and a checkpoint
  (``state_dict`` of model and loss, generator state included) saved to ``--output-dir``.

Data: scikit-learn's digits (classes 0-4 train, 5-9 test), or Omniglot with
``--dataset omniglot --data-root DIR`` (the folder holding the Omniglot zip files).

    python examples/vcpa_plain_pytorch.py --quick --output-dir /tmp/vcpa
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import pml_proxies
from pml_proxies.datasets import get_dataset, get_transforms
from pml_proxies.hooks import set_epoch
from pml_proxies.losses import VCPALoss

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="a few iterations (CI smoke run)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--output-dir", default="vcpa_output")
parser.add_argument("--dataset", default="digits", choices=["digits", "omniglot"])
parser.add_argument("--data-root", default=None, help="folder of the Omniglot zips")
parser.add_argument("--epochs", type=int, default=None, help="default: 2 quick, 10 otherwise")
parser.add_argument("--embedding-size", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--temperature", type=float, default=0.01, help="VCPA's tau (0.01 on CUB)")
args = parser.parse_args()
epochs = args.epochs or (2 if args.quick else 10)
device = torch.device(args.device)
torch.manual_seed(0)
if device.type == "cpu":
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead

# data: class-disjoint train / test splits; images (1, H, W) in [0, 1]
size = 8 if args.dataset == "digits" else 32
train_set, test_set = (
    get_dataset(args.dataset, split, root=args.data_root,
                transform=get_transforms(args.dataset, train=split == "train", image_size=size))
    for split in ("train", "test")
)  # fmt: skip
train_loader = torch.utils.data.DataLoader(
    train_set, batch_size=args.batch_size, shuffle=True, drop_last=True
)

# model (a small CNN and a linear embedding layer), loss and optimizer
model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, args.embedding_size),
).to(device)  # fmt: skip
loss_fn = VCPALoss(train_set.num_classes, args.embedding_size, temperature=args.temperature,
                   newton_steps=10, seed=0).to(device)  # fmt: skip
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)


@torch.no_grad()
def embed(dataset):
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    batches = [(model(x.to(device)), y) for x, y in tqdm(loader, desc="embed", leave=False)]
    return torch.cat([e for e, _ in batches]), torch.cat([y for _, y in batches]).to(device)


def evaluate():
    calculator = pml_proxies.AccuracyCalculator(
        include=("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "ndcg_at_10",
                 "mean_average_precision_at_r"),
        recall_ks=(1, 2, 4, 8), ndcg_ks=(10,), k="max_bin_count",
    )  # fmt: skip
    embeddings, labels = embed(test_set)
    return calculator.get_accuracy(embeddings, labels)  # query = reference, self excluded


for epoch in range(1, epochs + 1):
    set_epoch(loss_fn, epoch)  # no-op for VCPA; keeps the loop right for scheduled losses
    model.train()
    loss_fn.train()  # Newton steps and state updates happen in training mode only
    steps = 5 if args.quick else len(train_loader)
    progress = tqdm(itertools.islice(train_loader, steps), total=steps, desc=f"epoch {epoch}")
    for x, y in progress:
        loss = loss_fn(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    metrics = evaluate()
    print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

# per-proxy uncertainty: sum over dimensions of the std of the normalised sampled proxies
uncertainty = loss_fn.proxy_uncertainty(num_samples=1000).cpu()
mean_std = loss_fn.std.mean(dim=1).cpu()
print("\nProxy uncertainty (supplement eq. 30) and mean sigma per training class:")
print(f"{'class':>8} {'uncertainty':>12} {'mean sigma':>11}")
for name, u, s in zip(train_set.classes, uncertainty.tolist(), mean_std.tolist()):
    print(f"{name:>8} {u:12.4f} {s:11.3e}")
print(f"uncertainty: min {uncertainty.min():.4f}, mean {uncertainty.mean():.4f}, "
      f"max {uncertainty.max():.4f}")  # fmt: skip

out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict()}, out / "vcpa.pt")
results = {"metrics": metrics, "proxy_uncertainty": uncertainty.tolist()}
(out / "results.json").write_text(json.dumps(results, indent=2))
print(f"\nsaved {out / 'vcpa.pt'} and {out / 'results.json'}")
