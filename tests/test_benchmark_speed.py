"""The benchmark's fast paths compute what the slow ones did: batched tensor transforms (same
random draws, the same resampling filter), the small CNN's pooling order and folded BatchNorm,
lazy imports, and the protocol version that tells runs of the old pipeline apart."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchmark_helpers import tiny_config
from PIL import Image
from torch import nn

from pml_proxies.benchmark import run_benchmark, train
from pml_proxies.benchmark.config import PIPELINE_VERSION, BenchmarkConfig
from pml_proxies.benchmark.data import batch_images, load_benchmark_data, load_config_data
from pml_proxies.benchmark.models import SmallCNN
from pml_proxies.benchmark.runner import ProtocolMismatch
from pml_proxies.datasets import get_transforms
from pml_proxies.datasets import transforms as T


# ------------------------------------------------------------------ batched transforms
def _images(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, h, w), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize(
    "name, train, channels, size",
    [
        ("omniglot", True, 1, 32),
        ("omniglot", False, 3, 20),
        ("cub200", True, 3, 24),  # RandomResizedCrop + flip + Normalize
        ("cub200", False, 3, 24),  # Resize (shorter side) + CenterCrop + Normalize
    ],
)
def test_batch_equals_the_tensor_path_image_by_image(name, train, channels, size):
    images = _images(9, 3 if name == "cub200" else 1, 41, 53)
    tf = get_transforms(name, train, image_size=size, channels=channels)
    torch.manual_seed(1)
    ref = torch.stack([tf(img.float() / 255.0) for img in images])  # F.interpolate(antialias)
    state = torch.get_rng_state()
    torch.manual_seed(1)
    out = tf.batch(images)
    # the same draws, in the same order (the RNG ends in the same state)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # the same filter, summed in another order: float32 rounding of a weighted mean of <= ~10
    # values in [0, 1] (1e-6), times 1 / std (<= 4.5) after Normalize
    assert (out - ref).abs().max() < 1e-5


def test_batch_matches_pil_within_its_uint8_rounding():
    """PIL resamples a uint8 image in two passes, rounding each to uint8: at most 0.5 / 255 per
    pass (the second pass averages the first's errors), so 1 / 255 in all."""
    images = _images(12, 1, 105, 105)
    tf = get_transforms("omniglot", True, image_size=32)
    torch.manual_seed(3)
    ref = torch.stack([tf(Image.fromarray(img[0].numpy())) for img in images])
    torch.manual_seed(3)
    out = tf.batch(images[:, 0])
    assert (out - ref).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("size", [(16, 20), (80, 60)])  # down (antialiased) and up
def test_resample_is_interpolate_with_antialias(size):
    x = torch.rand(3, 2, 50, 37, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    assert (T.resample(x, torch.tensor([[0, 0, 50, 37]]), size) - ref).abs().max() < 1e-5
    crop = torch.tensor([[4, 7, 30, 21]] * 3)  # a crop: the same as cropping first
    ref = F.interpolate(x[..., 4:34, 7:28], size=size, mode="bilinear", antialias=True)
    assert (T.resample(x, crop, size) - ref).abs().max() < 1e-5


def test_compose_without_batched_form_says_so():
    tf = T.Compose([T.ToTensor(), lambda x: x])
    assert not tf.supports_batch()
    with pytest.raises(TypeError, match="batched form"):
        tf.batch(_images(2, 1, 8, 8))


# ------------------------------------------------------------------ the benchmark's data
def test_subset_batches_are_its_items_and_draw_as_they_would():
    data = load_benchmark_data("omniglot", image_size=16, max_train_classes=10, progress=False)
    assert batch_images(data.train.base) is not None
    rows = [5, 0, 17, 3, 40, 5]
    torch.manual_seed(0)
    batch = data.train.__getitems__(rows)
    torch.manual_seed(0)
    items = [data.train[i] for i in rows]  # one at a time: the same path, the same draws
    for (x1, y1), (x2, y2) in zip(batch, items):
        assert torch.equal(x1, x2) and y1 == y2
    assert [y for _, y in batch] == data.train.labels[rows].tolist()
    # float images (digits): one sample at a time through the transform, as before
    digits = load_benchmark_data("digits")
    assert batch_images(digits.train.base) is None
    assert torch.equal(digits.test.__getitems__([2])[0][0], digits.test.base[2][0])


# ------------------------------------------------------------------ the small CNN
def _reference_order(net: SmallCNN) -> nn.Sequential:
    """The same modules in the order before: Conv, BN, ReLU, pool."""
    layers = list(net.features)
    out = []
    for conv, bn, pool, relu in zip(*(iter(layers),) * 4):
        out += [conv, bn, relu, pool]
    return nn.Sequential(*out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_cnn_pooling_before_relu_computes_the_same(dtype):
    """max and ReLU commute, and the gradient reaches the same element (or none): identical
    values by construction (the same kernels on the same numbers)."""
    torch.manual_seed(0)
    net = SmallCNN(1).to(dtype).train()
    ref = _reference_order(net)
    x = torch.randn(6, 1, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    a = net(x)
    grads_a = torch.autograd.grad(a.square().sum(), list(net.parameters()))
    b = ref(x)
    grads_b = torch.autograd.grad(b.square().sum(), list(net.parameters()))
    assert torch.equal(a, b)
    assert all(torch.equal(g, h) for g, h in zip(grads_a, grads_b))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_small_cnn_folded_batchnorm_in_evaluation(dtype, tol):
    torch.manual_seed(0)
    net = SmallCNN(1).to(dtype)
    for m in net.modules():  # running statistics and affine parameters away from 0 / 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, -1.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    net.eval()
    x = torch.randn(5, 1, 12, 12, dtype=dtype)
    unfolded = net(x)  # autograd on: the modules as they are
    with torch.no_grad():
        folded = net(x)
    # the same sums with (w * s) x instead of s (w x): a few ulps of the values, relative to
    # the largest (float32 eps 1.2e-7 over ~600-term convolutions: 1e-5; float64: 1e-12)
    assert (folded - unfolded).abs().max() <= tol * unfolded.abs().max()


def test_small_cnn_embeds_in_batches_that_fit_the_caches(tmp_path):
    """At most 128 x 32 x 32 input pixels (and at least 8 images) per batch of the small CNN's
    embedding passes; other trunks take --eval-batch-size as it is."""
    config = BenchmarkConfig(dataset="omniglot", losses=["proxy_anchor"], progress=False)
    assert (config.image_size_or_default, config.eval_batch_images) == (32, 128)
    for side, images in ((64, 32), (224, 8), (16, 128), (8, 128)):
        assert replace(config, image_size=side).eval_batch_images == images
    assert replace(config, image_size=64, eval_batch_size=20).eval_batch_images == 20
    assert replace(config, trunk="efficientnet_lite0").eval_batch_images == 128
    at_64 = replace(config, image_size=64)
    test_set = load_config_data(at_64).test
    sizes = [len(y) for _, y in train._eval_batches(test_set, at_64, range(70))]
    assert sizes == [32, 32, 6]


def test_small_cnn_embeddings_do_not_depend_on_the_batch():
    """What the batch rule rests on: batches of 8 give the embeddings of batches of 128 (equal
    on this project's CPU; another CPU's kernels may round them differently, hence 1e-6)."""
    torch.manual_seed(0)
    net = SmallCNN(3)
    net(torch.randn(8, 3, 64, 64)).sum().backward()  # running statistics away from 0 / 1
    net.eval()
    x = torch.randn(128, 3, 64, 64)
    with torch.no_grad():
        whole = net(x)
        in_eights = torch.cat([net(part) for part in x.split(8)])
    assert (in_eights - whole).abs().max() <= 1e-6 * whole.abs().max()


# ------------------------------------------------------------------ imports
def test_startup_imports_nothing_heavy():
    """The CLI, the runner and a worker's modules load no report, tuning or logging stack."""
    heavy = ["pandas", "matplotlib", "tensorboard", "optuna", "sqlalchemy", "sklearn", "faiss"]
    code = (
        "import sys\n"
        "import pml_proxies.benchmark.cli, pml_proxies.benchmark.runner\n"
        "import pml_proxies.benchmark.data, pml_proxies.benchmark.spec\n"
        "import pml_proxies.benchmark.train, pml_proxies.benchmark.parallel\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------ protocol version
def test_folder_of_the_previous_pipeline_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = tiny_config(out, ["proxy_anchor"])
    assert config.protocol()["pipeline_version"] == PIPELINE_VERSION
    old = config.protocol()
    del old["pipeline_version"]  # written before the version existed: version 1
    (out / "protocol.json").write_text(json.dumps({"protocol": old}))
    with pytest.raises(ProtocolMismatch, match=f"pipeline_version: 1 -> {PIPELINE_VERSION}"):
        run_benchmark(config)
    assert not (out / "runs").exists()
    assert np.array_equal(sorted(p.name for p in out.iterdir()), ["protocol.json"])
