"""CUB-200-2011 recipe (and Cars-196, SOP, In-Shop): the papers' settings for every proxy loss of
the package, on one GPU or many (``torchrun``, DistributedDataParallel).

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

Other data sets (``--dataset``): Proxy-Anchor's commands for each set (BN-Inception / ResNet-50):
Cars-196 decays the lr every 20 (ResNet-50: 10) epochs; SOP and In-Shop use lr 6e-4, decay x0.25
every 20 epochs, trainable BatchNorm (ResNet-50: 1 warm-up epoch). They apply to
``proxy_anchor`` and ``vcpa`` (whose paper follows Proxy-Anchor); the Proxy-ISA and MPA papers give
no per-set optimisation settings that this recipe knows of, so their CUB settings are kept. The
losses' own hyper-parameters per set (VCPA's tau, MPA's K on SOP, Proxy-ISA's k) come from
``pml_proxies.benchmark.losses``. ``--dataset digits`` (scikit-learn's digits, no download, no
augmentation) is for tests.

    python examples/cub200_recipe.py --data-root DATA --loss proxy_anchor --device cuda
    python examples/cub200_recipe.py --quick --output-dir /tmp/cub   # offline smoke run
    torchrun --nproc-per-node 4 examples/cub200_recipe.py --data-root DATA --loss vcpa
    torchrun --nproc-per-node 2 examples/cub200_recipe.py ... --resume   # on any number of GPUs

Under ``torchrun`` (``pml_proxies.distributed``): the network is in DistributedDataParallel, the
loss in ``DistributedProxyLoss`` (every rank computes the loss of the whole global batch, so the
proxies, Proxy-ISA's epoch schedule and VCPA's noise stay identical on every rank), each global
batch of ``batch_size`` is the one-process batch split over the ranks (the batch size is global:
it must be a multiple of the number of processes), the test set is embedded in shares and gathered
for rank 0, which evaluates, prints and writes the files. Trainable BatchNorm (SOP, In-Shop) is
synchronised over the GPUs (SyncBatchNorm). Random augmentations are drawn per rank, so only runs
without augmentation (digits) repeat the one-process run to rounding.

After every epoch rank 0 writes ``last.pt`` (network, loss state, optimizer, scheduler, history:
independent of the number of processes) atomically; ``--resume`` continues from it, with any
number of processes. If a process dies, the others stop with a message naming the checkpoint.
``results.json`` records ``"world_size"``.

``--quick`` builds a tiny fake CUB_200_2011 folder in a temporary directory and trains a
small CNN on it for two epochs: it only exercises the code path.
"""

import argparse
import itertools
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import pml_proxies
from pml_proxies import distributed as D
from pml_proxies.benchmark.losses import build_loss
from pml_proxies.benchmark.models import EmbeddingNet, build_trunk, freeze_batchnorm
from pml_proxies.datasets import get_dataset, get_transforms
from pml_proxies.hooks import set_epoch

PA = dict(optimizer="adamw", lr=1e-4, proxy_lr_mult=100, weight_decay=1e-4, batch_size=180,
          epochs=60, lr_decay_step=10, lr_decay_gamma=0.5, warmup_epochs=1, pooling="avgmax",
          freeze_bn=True)  # fmt: skip
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
#: Proxy-Anchor's commands per data set (BN-Inception, then ResNet-50 on top), for the losses
#: whose papers follow it
FOLLOW_PA = ("proxy_anchor", "vcpa")
LARGE = dict(lr=6e-4, lr_decay_step=20, lr_decay_gamma=0.25, freeze_bn=False)
DATASETS = {"cub200": {}, "cars196": dict(lr_decay_step=20), "sop": LARGE, "inshop": LARGE}
DATASETS_RESNET50 = {"cars196": dict(lr_decay_step=10), "sop": dict(warmup_epochs=1),
                     "inshop": dict(warmup_epochs=1)}  # fmt: skip

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--quick", action="store_true", help="fake data, tiny CNN (smoke run)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--output-dir", default="cub200_output")
parser.add_argument("--data-root", default=None, help="folder holding the data set")
parser.add_argument("--dataset", default="cub200", choices=[*DATASETS, "digits"])
parser.add_argument("--loss", default="proxy_anchor", choices=sorted(RECIPES))
parser.add_argument("--trunk", default="bninception", choices=["bninception", "resnet50"])
parser.add_argument("--epochs", type=int, default=None, help="default: the paper's")
parser.add_argument("--batch-size", type=int, default=None, help="global; default: the paper's")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--workers", type=int, default=4)
parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
args = parser.parse_args()
recipe = {**RECIPES[args.loss], **(RESNET50 if args.trunk == "resnet50" else {})}
if args.loss in FOLLOW_PA:
    recipe.update(DATASETS.get(args.dataset, {}))
    if args.trunk == "resnet50":
        recipe.update(DATASETS_RESNET50.get(args.dataset, {}))
rank, world_size, device = D.init_from_env(args.device)
main_process = rank == 0
torch.manual_seed(args.seed)  # the same network and proxies on every rank


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


data_root, trunk_name, image_size, workers = args.data_root, args.trunk, 224, args.workers
if args.quick or args.dataset == "digits":  # tiny everything: exercises the code path offline
    trunk_name, image_size, workers = "small_cnn", 32, 0
    recipe.update(batch_size=8, epochs=2, warmup_epochs=min(recipe["warmup_epochs"], 1))
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    if args.dataset != "digits":
        tmp = tempfile.TemporaryDirectory()  # a fake CUB per process (removed at exit)
        data_root, args.dataset = fake_cub(Path(tmp.name)), "cub200"
if args.dataset == "digits":
    image_size = 8
recipe.update({k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v})
epochs, batch_size = recipe["epochs"], recipe["batch_size"]

train_set, test_set = (
    get_dataset(args.dataset, split, root=data_root,
                transform=get_transforms(args.dataset, train=split == "train",
                                         image_size=image_size))
    for split in ("train", "test")
)  # fmt: skip


def train_loader(epoch: int) -> torch.utils.data.DataLoader:
    """Random batches of ``batch_size`` (global) drawn with seed + epoch, this rank's share."""
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    draw = torch.utils.data.RandomSampler(train_set, generator=generator)
    sampler = D.ShardedBatchSampler(draw, batch_size)  # ValueError unless batch % world == 0
    return torch.utils.data.DataLoader(
        train_set, batch_size=sampler.local_batch_size, sampler=sampler, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda",
    )  # fmt: skip


# model: pretrained trunk -> global pooling -> linear 512-d embedding (kaiming init)
pretrained = not (args.quick or args.dataset == "digits")
channels = 1 if args.dataset == "digits" else 3
trunk = build_trunk(trunk_name, in_channels=channels, image_size=image_size, pretrained=pretrained)
model = EmbeddingNet(trunk, recipe["pooling"], embedding_size=512).to(device)
if recipe["freeze_bn"]:
    freeze_batchnorm(model.trunk)
elif world_size > 1 and device.type == "cuda":  # batch statistics of the global batch
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
inner_loss, _ = build_loss(args.loss, train_set.num_classes, 512, dataset=args.dataset)
loss_fn = D.DistributedProxyLoss(inner_loss.to(device))

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
def evaluate() -> dict | None:
    """Metrics of the test set on rank 0 (each rank embeds its share); ``None`` on the others."""
    model.eval()
    rows = D.shard_indices(len(test_set))
    share = torch.utils.data.Subset(test_set, list(rows))
    loader = torch.utils.data.DataLoader(share, batch_size=128, num_workers=workers)
    bar = tqdm(loader, desc="test", leave=False, disable=not main_process)
    pairs = [(model(x.to(device)), y.to(device)) for x, y in bar]
    embeddings = torch.cat([e for e, _ in pairs]) if pairs else torch.zeros(0, 512, device=device)
    labels = torch.cat([y for _, y in pairs]) if pairs else torch.zeros(0, dtype=torch.long)
    embeddings, labels = D.gather_embeddings(embeddings, labels.to(device))
    return calculator.get_accuracy(embeddings, labels) if main_process else None


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a partial file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
last_path = out / "last.pt"
best, history, start = {"recall_at_1": -1.0}, [], 1
if args.resume and last_path.is_file():  # written by rank 0, read by every rank
    state = torch.load(last_path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    inner_loss.load_state_dict(state["loss"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    best, history, start = state["best"], state["history"], state["epoch"] + 1
    if main_process:
        print(
            f"resumed from {last_path} (epoch {state['epoch']}, {state['world_size']} process(es))"
        )
elif args.resume and main_process:
    print(f"no {last_path}: starting from the beginning")
if main_process:
    print(f"{args.loss} on {args.dataset} with {trunk_name}, {world_size} process(es): {recipe}")


def train_epoch(epoch: int, network: torch.nn.Module, warm_up: bool) -> float:
    """One epoch; the mean global-batch loss (the same on every rank)."""
    model.train()
    loss_fn.train()
    if recipe["freeze_bn"]:
        freeze_batchnorm(model.trunk)  # BatchNorm stays in eval mode (frozen statistics)
    loader = train_loader(epoch)
    steps = min(3, len(loader)) if args.quick else len(loader)
    bar = tqdm(itertools.islice(loader, steps), total=steps, desc=f"epoch {epoch}",
               disable=not main_process)  # fmt: skip
    total = torch.zeros((), device=device)
    for x, y in bar:
        loss = loss_fn(network(x.to(device)), y.to(device)) / world_size  # the global loss
        optimizer.zero_grad()
        (loss * world_size).backward()  # world x: DDP averages the ranks' gradients
        loss_fn.sync_gradients()  # proxies: the global gradient, identical on every rank
        torch.nn.utils.clip_grad_value_(model.parameters(), 10)
        if proxies:
            torch.nn.utils.clip_grad_value_(proxies, 10)
        optimizer.step()
        total += loss.detach()
        bar.set_postfix(loss=f"{loss.item():.4f}", warm_up=warm_up)
    return float(total) / max(steps, 1)


def train() -> None:
    global best
    phase = None
    for epoch in range(start, epochs + 1):
        set_epoch(loss_fn, epoch)  # Proxy-ISA's memory / filter schedule; no-op for the others
        warm_up = epoch <= recipe["warmup_epochs"]  # train only the embedding layer and proxies
        for p in trunk_params:
            p.requires_grad_(not warm_up)
        if warm_up != phase:  # DDP reduces the parameters that need a gradient when it is built
            network, phase = D.wrap_model(model, device), warm_up
        train_loss = train_epoch(epoch, network, warm_up)
        scheduler.step()
        metrics = evaluate()
        if not main_process:
            continue
        history.append({"epoch": epoch, "train_loss": train_loss, **metrics})
        print(f"epoch {epoch}: loss={train_loss:.4f}, "
              + ", ".join(f"{k}={100 * v:.2f}" for k, v in metrics.items()))  # fmt: skip
        if metrics["recall_at_1"] > best["recall_at_1"]:
            best = {**metrics, "epoch": epoch}
            save_atomic({"model": model.state_dict(), "loss": inner_loss.state_dict(),
                         "epoch": epoch}, out / f"{args.dataset}_{args.loss}_best.pt")  # fmt: skip
        save_atomic({"model": model.state_dict(), "loss": inner_loss.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch, "best": best, "history": history,
                     "world_size": world_size}, last_path)  # fmt: skip


class Terminated(Exception):
    """torchrun's SIGTERM: it stops every process when one of them has failed."""


def on_sigterm(signum, frame):
    raise Terminated("torchrun stopped this process")


if world_size > 1:
    signal.signal(signal.SIGTERM, on_sigterm)
try:
    train()
except (RuntimeError, torch.distributed.DistBackendError, Terminated) as e:
    if world_size == 1:
        raise
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # reported once: exit on the next SIGTERM
    done = torch.load(last_path, map_location="cpu", weights_only=False)["epoch"] if last_path.is_file() else 0  # fmt: skip
    print(f"rank {rank}: the distributed job failed ({type(e).__name__}: {str(e)[:200]}); "
          f"another process probably died. The last checkpoint, {last_path} (epoch {done}), is "
          "intact: rerun with --resume, with any number of processes.", file=sys.stderr,
          flush=True)  # fmt: skip
    sys.exit(1)

if main_process:
    results = {"loss": args.loss, "dataset": args.dataset, "recipe": recipe,
               "world_size": world_size, "best": best, "history": history}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"best epoch {best['epoch']}: R@1 = {100 * best['recall_at_1']:.2f}; saved to {out}")
D.destroy()
