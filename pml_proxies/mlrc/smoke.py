"""A tiny fake data set and config overlay to check an MLRC install on the CPU in minutes.

``python -m pml_proxies.mlrc.smoke DIR`` writes ``DIR/data`` (a few classes of small random images,
one colour pattern per class) and ``DIR/configs`` (a config folder for ``--config_folder`` with a
tiny trunk, 2 folds, 2 epochs of 2 iterations) and prints a command that runs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SMOKE_CONFIGS = {
    "config_dataset/smoke.yaml": """\
dataset~OVERRIDE~:
  ImageFolderDataset:
    folder: smoke_images
split_manager~OVERRIDE~:
  ClassDisjointSplitManager:
    test_size: 0.5
    test_start_idx: 0.5
    num_training_partitions: 2
    num_training_sets: 2
    hierarchy_level: 0
    data_and_label_getter_keys: [data, label]
""",
    "config_general/smoke.yaml": """\
trainer~OVERRIDE~:
  MetricLossOnly:
    iterations_per_epoch: 2
    dataloader_num_workers: 0
    batch_size: 8
    freeze_trunk_batchnorm: True
    label_hierarchy_level: 0
    loss_weights: null
    set_min_label_to_zero: True
num_epochs_train: 2
save_interval: 1
patience: 1
log_data_to_tensorboard: False
# the fake classes are easy: an untrained model can tie the trained one, and powerful-benchmarker
# then reports no "trained" row; without the untrained evaluations the best epoch is always >= 1
check_untrained_accuracy: False
""",
    "config_models/smoke.yaml": """\
models~OVERRIDE~:
  trunk:
    TinyConvTrunk:
      channels: 8
  embedder:
    MLP:
      layer_sizes:
        - 128
""",
    "config_transforms/smoke.yaml": """\
transforms~OVERRIDE~:
  train:
    RandomResizedCrop:
      scale: 0.5 1
      ratio: 0.75 1.33
      size: 16
    RandomHorizontalFlip:
      p: 0.5
  eval:
    CenterCrop:
      size: 16
""",
    "config_eval/smoke.yaml": """\
tester~APPLY~2:
  batch_size: 16
  dataloader_num_workers: 0
""",
}


def make_fake_dataset(
    root: str | os.PathLike[str],
    num_classes: int = 12,
    per_class: int = 6,
    size: int = 20,
    seed: int = 0,
) -> Path:
    """Write ``root/smoke_images/<class>/<i>.png``: per class a colour with noise. Returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(root) / "smoke_images"
    for c in range(num_classes):
        class_dir = folder / f"class_{c:03d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-90, 91, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(class_dir / f"{i}.png")
    return Path(root)


def write_smoke_configs(folder: str | os.PathLike[str]) -> Path:
    """Write the smoke config overlay (for ``--config_folder``) and return its path."""
    destination = Path(folder)
    for rel, text in SMOKE_CONFIGS.items():
        (destination / rel).parent.mkdir(parents=True, exist_ok=True)
        (destination / rel).write_text(text)
    return destination


SMOKE_SELECTION = [
    "--config_dataset", "[default, smoke]",
    "--config_general", "[default, smoke]",
    "--config_models", "[default, smoke]",
    "--config_transforms", "[smoke]",
    "--config_eval", "[default, smoke]",
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pml_proxies.mlrc.smoke DIR")
        return 2
    base = Path(argv[0])
    make_fake_dataset(base / "data")
    write_smoke_configs(base / "configs")
    selection = " ".join(f"'{a}'" if a.startswith("[") else a for a in SMOKE_SELECTION)
    print(
        f"pml-proxies-mlrc --experiment_name smoke --dataset_root {base / 'data'} "
        f"--root_experiment_folder {base / 'experiments'} --config_folder {base / 'configs'} "
        f"{selection} --config_loss_and_miners '[default, mpa_fixed]' "
        "--config_optimizers '[default, proxy_lr_fixed]'"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
