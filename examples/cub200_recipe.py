"""CUB-200-2011 recipe: the papers' settings for every proxy loss of the package (GPU).

Trains a BN-Inception (or ResNet-50) trunk with a 512-d embedding on CUB-200-2011 (classes
1-100 train, 101-200 test) with the CUB settings of the paper of the selected loss, evaluates
Recall@1/2/4/8, nDCG@10 and MAP@R on the test classes after every epoch and keeps the best
checkpoint, as the authors' code does. Settings (``RECIPES`` below) and their sources:

* ``proxy_anchor``: Kim et al., CVPR 2020, and the CUB command of their official code: AdamW
  lr 1e-4, proxies lr x100, weight decay 1e-4, batch 180, 60 epochs, lr x0.5 every 10 epochs,
  1 warm-up epoch training only the embedding layer and proxies, average + max pooling.
* ``proxy_isa``: Li et al., MMAsia 2022, sec. 4: Adam lr 1e-4, batch 128, and on CUB none of
  Proxy-Anchor's extra tricks (no AdamW, no warm-up, no average + max pooling). The paper
  is silent on epochs, decay and proxy lr: Proxy-Anchor's values are used.
* ``vcpa``: Kim et al. (VCPA), supplement D.1 (CUB): AdamW lr 1e-4, weight decay 1e-4,
  batch 180, 60 epochs, lr x0.5 every 10 epochs, tau 0.01, 10 Newton steps (the proxies
  have no optimizer); warm-up and pooling "as Kim et al. 2020".
* ``mpa``, ``mpa_dw``, ``mpa_ap``: Saeki & Kawahara, sec. 5: AdamW lr 1e-4 (backbone) and 1e-2
  (proxies), batch 180, 60 epochs, lr x0.5 every 20 epochs, cubic GeM pooling, random
  batches, K = 10. Warm-up: none (not mentioned).

For every loss, as Proxy-Anchor's code (which the other papers build on or are silent about):
frozen BatchNorm, gradients clipped at 10, random batches, evaluation after every epoch and the
best epoch by R@1 kept. Loss hyper-parameters are the papers' defaults
(``pml_proxies.benchmark.losses``). With ``--trunk resnet50`` the batch size, warm-up and
decay step become those of Proxy-Anchor's ResNet-50 CUB command (batch 120, 5 warm-up
epochs, decay every 5 epochs). BN-Inception needs ``pip install pretrainedmodels``,
ResNet-50 needs torchvision (trunks from ``pml_proxies.benchmark.models``).

    python examples/cub200_recipe.py --data-root DATA --loss proxy_anchor --device cuda
    python examples/cub200_recipe.py --quick --output-dir /tmp/cub   # offline smoke run

``--quick`` builds a tiny fake CUB_200_2011 folder in a temporary directory and trains a
small CNN on it for two epochs: it only exercises the code path.
"""

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import pml_proxies
from pml_proxies.benchmark.losses import build_loss
from pml_proxies.benchmark.models import EmbeddingNet, build_trunk, freeze_batchnorm
from pml_proxies.datasets import get_dataset, get_transforms
from pml_proxies.hooks import set_epoch

PA = dict(optimizer="adamw", lr=1e-4, proxy_lr_mult=100, weight_decay=1e-4, batch_size=180,
          epochs=60, lr_decay_step=10, lr_decay_gamma=0.5, warmup_epochs=1, pooling="avgmax")  # fmt: skip
MPA = {**PA, "lr_decay_step": 20, "warmup_epochs": 0, "pooling": "gem"}
ISA = {**PA, "optimizer": "adam", "batch_size": 128, "warmup_epochs": 0, "pooling": "avg"}
RECIPES = {
    "proxy_anchor": PA,
    "proxy_isa": ISA,
    "vcpa": PA,
    "mpa": MPA,
    "mpa_dw": MPA,
    "mpa_ap": MPA,
}
RESNET50 = dict(batch_size=120, warmup_epochs=5, lr_decay_step=5)  # Proxy-Anchor README

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="fake data, tiny CNN (smoke run)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--output-dir", default="cub200_output")
parser.add_argument("--data-root", default=None, help="folder holding CUB_200_2011/")
parser.add_argument("--loss", default="proxy_anchor", choices=sorted(RECIPES))
parser.add_argument("--trunk", default="bninception", choices=["bninception", "resnet50"])
parser.add_argument("--epochs", type=int, default=None, help="default: the paper's")
parser.add_argument("--workers", type=int, default=4)
args = parser.parse_args()
recipe = {**RECIPES[args.loss], **(RESNET50 if args.trunk == "resnet50" else {})}
device = torch.device(args.device)
torch.manual_seed(0)


def fake_cub(root: Path, classes=(1, 2, 3, 4, 101, 102, 103, 104), per_class=6) -> Path:
    """A tiny CUB_200_2011 folder (random JPEGs) with the real file layout."""
    cub, rng = root / "CUB_200_2011", np.random.default_rng(0)
    images, labels = [], []
    for c in classes:
        (cub / "images" / f"{c:03d}.bird").mkdir(parents=True)
        for j in range(per_class):
            path = f"{c:03d}.bird/img_{j}.jpg"
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(cub / "images" / path)
            images.append(f"{len(images) + 1} {path}")
            labels.append(f"{len(labels) + 1} {c}")
    (cub / "images.txt").write_text("\n".join(images))
    (cub / "image_class_labels.txt").write_text("\n".join(labels))
    (cub / "classes.txt").write_text("\n".join(f"{c} {c:03d}.bird" for c in classes))
    return root


if args.quick:  # tiny everything: exercises the code path offline
    tmp = tempfile.TemporaryDirectory()
    data_root, trunk_name, image_size, workers = fake_cub(Path(tmp.name)), "small_cnn", 32, 0
    recipe.update(batch_size=8, epochs=2, warmup_epochs=min(recipe["warmup_epochs"], 1))
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
else:
    data_root, trunk_name, image_size, workers = args.data_root, args.trunk, 224, args.workers
epochs = args.epochs or recipe["epochs"]

train_set, test_set = (
    get_dataset("cub200", split, root=data_root,
                transform=get_transforms("cub200", train=split == "train", image_size=image_size))
    for split in ("train", "test")
)  # fmt: skip
train_loader = torch.utils.data.DataLoader(
    train_set, batch_size=recipe["batch_size"], shuffle=True, drop_last=True,
    num_workers=workers, pin_memory=device.type == "cuda",
)  # fmt: skip

# model: pretrained trunk -> global pooling -> linear 512-d embedding (kaiming init)
trunk = build_trunk(trunk_name, in_channels=3, image_size=image_size, pretrained=not args.quick)
model = EmbeddingNet(trunk, recipe["pooling"], embedding_size=512).to(device)
freeze_batchnorm(model.trunk)
trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
loss_fn, _ = build_loss(args.loss, train_set.num_classes, 512, dataset="cub200")
loss_fn = loss_fn.to(device)

lr = recipe["lr"]
groups = [{"params": trunk_params}, {"params": model.embedder.parameters()}]
proxies = list(loss_fn.parameters())  # empty for VCPA: its Newton steps update the proxies
if proxies:
    groups.append({"params": proxies, "lr": lr * recipe["proxy_lr_mult"]})
optim_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[recipe["optimizer"]]
optimizer = optim_class(groups, lr=lr, weight_decay=recipe["weight_decay"])
scheduler = torch.optim.lr_scheduler.StepLR(
    optimizer, step_size=recipe["lr_decay_step"], gamma=recipe["lr_decay_gamma"]
)
calculator = pml_proxies.AccuracyCalculator(
    include=("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "ndcg_at_10",
             "mean_average_precision_at_r"),
    recall_ks=(1, 2, 4, 8), ndcg_ks=(10,), k="max_bin_count", device=device,
)  # fmt: skip


@torch.no_grad()
def evaluate() -> dict:
    model.eval()
    loader = torch.utils.data.DataLoader(test_set, batch_size=128, num_workers=workers)
    pairs = [(model(x.to(device)), y) for x, y in tqdm(loader, desc="test", leave=False)]
    embeddings, labels = torch.cat([e for e, _ in pairs]), torch.cat([y for _, y in pairs])
    return calculator.get_accuracy(embeddings, labels.to(device))


out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
print(f"{args.loss} on CUB-200 with {trunk_name}: {recipe}")
best = {"recall_at_1": -1.0}
for epoch in range(1, epochs + 1):
    set_epoch(loss_fn, epoch)  # Proxy-ISA's memory / filter schedule; no-op for the others
    warm_up = epoch <= recipe["warmup_epochs"]  # train only the embedding layer and proxies
    for p in trunk_params:
        p.requires_grad_(not warm_up)
    model.train()
    loss_fn.train()
    freeze_batchnorm(model.trunk)  # BatchNorm stays in eval mode (frozen statistics)
    steps = 3 if args.quick else len(train_loader)
    bar = tqdm(itertools.islice(train_loader, steps), total=steps, desc=f"epoch {epoch}")
    for x, y in bar:
        loss = loss_fn(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 10)
        if proxies:
            torch.nn.utils.clip_grad_value_(proxies, 10)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", warm_up=warm_up)
    scheduler.step()
    metrics = evaluate()
    print(f"epoch {epoch}: " + ", ".join(f"{k}={100 * v:.2f}" for k, v in metrics.items()))
    if metrics["recall_at_1"] > best["recall_at_1"]:
        best = {**metrics, "epoch": epoch}
        torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict(), "epoch": epoch},
                   out / f"cub200_{args.loss}_best.pt")  # fmt: skip

(out / "results.json").write_text(json.dumps({"loss": args.loss, "recipe": recipe,
                                              "best": best}, indent=2))  # fmt: skip
print(f"best epoch {best['epoch']}: R@1 = {100 * best['recall_at_1']:.2f}; saved to {out}")
