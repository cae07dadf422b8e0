"""Names and per-trunk recipe defaults of the benchmark's networks (no torch import: the
command line's ``--help`` reads them)."""

from __future__ import annotations

TRUNK_NAMES = (
    "small_cnn", "efficientnet_lite0", "resnet50", "googlenet", "bninception", "linear", "mlp",
)  # fmt: skip
#: heads on frozen features (``--dataset features:PATH``): they take vectors, not images
FEATURE_TRUNKS = ("linear", "mlp")
#: trunks small enough that one CPU thread per run and parallel runs are fastest
SMALL_TRUNKS = ("small_cnn", *FEATURE_TRUNKS)
POOLING_NAMES = ("avg", "avgmax", "gem")

#: Per-trunk recipe defaults (used where the command line leaves a value unset).
TRUNK_DEFAULTS = {
    "small_cnn": dict(lr=1e-3, warmup_epochs=0, freeze_bn=False, pretrained=False),
    "efficientnet_lite0": dict(lr=1e-4, warmup_epochs=1, freeze_bn=True, pretrained=True),
    "resnet50": dict(lr=1e-4, warmup_epochs=1, freeze_bn=True, pretrained=True),
    "googlenet": dict(lr=1e-4, warmup_epochs=1, freeze_bn=True, pretrained=True),
    "bninception": dict(lr=1e-4, warmup_epochs=1, freeze_bn=True, pretrained=True),
    "linear": dict(lr=1e-3, warmup_epochs=0, freeze_bn=False, pretrained=False),
    "mlp": dict(lr=1e-3, warmup_epochs=0, freeze_bn=False, pretrained=False),
}

#: Image sides the benchmark uses where ``--image-size`` is not given and the data set module's
#: default is too costly for the CPU budget: (data set, trunk) -> side in pixels. Omniglot with
#: the small CNN runs at 32 px (its data set default is 64 px; 32 px costs about 4x less and
#: still separates the losses). Natural images (CUB, Cars, SOP, In-Shop, and a user's images
#: with the natural-image transforms) with the small CNN run at 64 px, not the pretrained
#: trunks' 224: a training step of batch 32 costs 0.12 s of CPU at 64 px and 2.1 s at 224 px,
#: so the default comparison (110 runs of 320 steps) on 2 cores takes about 40 minutes of
#: training rather than about 10 hours.
BENCHMARK_IMAGE_SIZES = {
    ("omniglot", "small_cnn"): 32,
    **{(name, "small_cnn"): 64 for name in ("cub200", "cars196", "sop", "inshop")},
}
