"""A user's own data as input of the main job and the tuner (``--dataset csv:PATH``,
``folder:PATH``, ``features:PATH.npz``): the bundled Omniglot written out as a dataframe and as
an image folder gives the results of ``--dataset omniglot``; validation errors are usage errors
before any output folder exists; the data is part of the protocol; heads on frozen features."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pml_proxies.benchmark.cli import main
from pml_proxies.benchmark.config import BenchmarkConfig, ConfigError

SMALL = ["--dataset-arg", "variant=small"]  # the bundled set, wherever a full one is cached
OMNIGLOT_TRANSFORMS = ["--dataset-arg", "transforms=omniglot"]
#: offset of the test labels in the written dataframe (disjoint from the train labels)
TEST_LABEL_OFFSET = 1000
#: result fields that differ between two identical trainings of different inputs
VOLATILE = {"train_time_s", "config_fingerprint", "command"}


# ------------------------------------------------------------------ writing data out
def _omniglot_splits():
    from pml_proxies.datasets.omniglot import Omniglot

    return Omniglot("train", variant="small", progress=False), Omniglot(
        "test", variant="small", progress=False
    )


def write_omniglot(folder: Path) -> tuple[Path, Path]:
    """The bundled Omniglot as PNG files, in the same order and class split: an OML dataframe
    (``folder/df.csv``) and an image folder (``folder/images/{train,test}/<class>/``) over the
    same files. Class folders and files are numbered so that sorting keeps the set's order."""
    images = folder / "images"
    rows = []
    for split, ds in zip(("train", "test"), _omniglot_splits()):
        offset = 0 if split == "train" else TEST_LABEL_OFFSET
        for i, (array, label) in enumerate(zip(ds.images, ds.labels.tolist())):
            path = images / split / f"{label + offset:04d}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
            flag = "" if split == "train" else "True"
            rows.append([label + offset, str(path.relative_to(folder)),
                         "train" if split == "train" else "validation", flag, flag])  # fmt: skip
    return _write_csv(folder / "df.csv", rows), images


def _write_csv(path: Path, rows: list, header=("label", "path", "split", "is_query", "is_gallery")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tiny_images(folder: Path, classes: int = 8, per_class: int = 6, seed: int = 0) -> Path:
    """A small image folder (``folder/<class>/<i>.png``, colour, two sizes) for quick runs."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = folder / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            side = 20 if i % 2 else 24
            array = (rng.random((side, side + 2, 3)) * 60 + c * 24).astype(np.uint8)
            Image.fromarray(array).save(d / f"{i}.png")
    return folder


def tiny_csv(folder: Path, shared: bool = False) -> Path:
    """A dataframe over :func:`tiny_images` (train classes 0-3, validation 4-7; with
    ``shared`` the validation rows also hold class 0)."""
    images = tiny_images(folder / "img")
    rows = []
    for c in range(8):
        for i in range(6):
            test = c >= 4 or (shared and c == 0 and i >= 3)
            flag = "True" if test else ""
            rows.append([c, f"img/class_{c}/{i}.png", "validation" if test else "train", flag,
                         flag])  # fmt: skip
    assert images.is_dir()
    return _write_csv(folder / "df.csv", rows)


def tiny_features(path: Path, n_classes: int = 10, per_class: int = 8, dim: int = 16) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    features = (centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    split = np.where(labels < n_classes // 2, "train", "validation")
    np.savez(path, features=features, labels=labels, split=split)
    return path


TINY = ["--quick", "--no-progress", "--device", "cpu", "--batch-size", "8", "--m-per-class", "2",
        "--image-size", "16", "--map-samples", "20"]  # fmt: skip


def _runs(out: Path) -> pd.DataFrame:
    runs = pd.read_csv(out / "runs.csv")
    return runs.drop(columns=[c for c in runs.columns if c in VOLATILE])


def _results(out: Path) -> dict:
    results = {}
    for path in sorted((out / "runs").glob("*/seed_*/result.json")):
        result = json.loads(path.read_text())
        results[str(path.relative_to(out))] = {k: v for k, v in result.items() if k not in VOLATILE}
    return results


# ------------------------------------------------------------------ the identity with Omniglot
def _omniglot_three_ways(tmp_path) -> list[tuple[str, list[str]]]:
    """``(name, --dataset options)`` of the bundled Omniglot, its dataframe and its image folder
    (written under ``tmp_path/data``)."""
    csv_path, folder = write_omniglot(tmp_path / "data")
    return [
        ("omniglot", ["--dataset", "omniglot", *SMALL]),
        ("csv", ["--dataset", f"csv:{csv_path}", *OMNIGLOT_TRANSFORMS]),
        ("folder", ["--dataset", f"folder:{folder}", *OMNIGLOT_TRANSFORMS]),
    ]


def _same_as_omniglot(tmp_path, capsys, command: list[str], files: list[str]) -> None:
    """``command`` on the bundled Omniglot, its dataframe and its image folder: the same runs."""
    outs = {}
    for name, dataset in _omniglot_three_ways(tmp_path):
        outs[name] = tmp_path / name
        assert main([*command, *dataset, "--output", str(outs[name])]) == 0, capsys.readouterr()
    capsys.readouterr()
    reference = outs.pop("omniglot")
    assert len(_results(reference)) == 2 and len(_runs(reference)) == 2
    for name, out in outs.items():
        # the same images, labels, transforms and random draws: the same float operations in
        # the same order, hence the same numbers
        pd.testing.assert_frame_equal(_runs(out), _runs(reference), check_exact=True, obj=name)
        assert _results(out) == _results(reference), name
        for file in files:
            assert (out / file).is_file()
    protocol = json.loads((outs["csv"] / "protocol.json").read_text())["protocol"]
    assert protocol["data_fingerprint"] and protocol["class_split"]["test_classes"] == 114
    assert (
        "data_fingerprint" not in json.loads((reference / "protocol.json").read_text())["protocol"]
    )
    title = (outs["csv"] / "report.md").read_text().splitlines()[0]
    assert title.startswith("# Benchmark report: df.csv")


def test_omniglot_as_a_dataframe_and_a_folder_gives_the_same_runs(tmp_path, capsys):
    """The fast variant: two losses, one seed, --quick."""
    _same_as_omniglot(
        tmp_path, capsys, ["--losses", "proxy_anchor,mpa", "--quick", "--no-progress",
                           "--device", "cpu", "--jobs", "1"], ["report.md", "runs.csv"],
    )  # fmt: skip


@pytest.mark.slow
def test_omniglot_as_a_dataframe_and_a_folder_gives_the_same_tuned_runs(tmp_path, capsys):
    """``tune``: a tiny study (2 trials of one loss, 1 seed re-run) on the three inputs."""
    outs = {}
    for name, dataset in _omniglot_three_ways(tmp_path):
        outs[name] = tmp_path / name
        rc = main(["tune", "--losses", "proxy_anchor", "--quick", "--no-progress", "--device",
                   "cpu", "--trials", "2", "--output", str(outs[name]), *dataset])  # fmt: skip
        assert rc == 0, capsys.readouterr()
    reference = outs.pop("omniglot")
    for name, out in outs.items():
        ref_files = sorted(p.relative_to(reference) for p in reference.rglob("result.json"))
        assert ref_files == sorted(p.relative_to(out) for p in out.rglob("result.json"))
        for rel in ref_files:
            a, b = (json.loads((d / rel).read_text()) for d in (out, reference))
            assert {k: v for k, v in a.items() if k not in VOLATILE} == {
                k: v for k, v in b.items() if k not in VOLATILE
            }, (name, rel)


# ------------------------------------------------------------------ usage errors, no folder
def _usage_error(capsys, argv: list[str], out: Path) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--output", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("see '") and "Traceback" not in err, err
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("command", [[], ["report"], ["tune"]])
def test_bad_input_is_a_usage_error_before_any_folder(tmp_path, capsys, command):
    csv_path = tiny_csv(tmp_path)
    text = csv_path.read_text().replace("train,,", "train,True,", 1)  # a flag on a train row
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    out = tmp_path / "out"
    line = _usage_error(capsys, [*command, "--dataset", f"csv:{bad}", *TINY], out)
    assert "argument --dataset" in line and "is_query" in line and "line 2" in line
    missing = _usage_error(capsys, [*command, "--dataset", f"csv:{tmp_path}/no.csv"], out)
    assert "does not exist" in missing
    line = _usage_error(capsys, [*command, "--dataset", f"folder:{tmp_path}/nothing"], out)
    assert "does not exist" in line
    line = _usage_error(capsys, [*command, "--dataset", f"features:{csv_path}", "--trunk",
                                 "linear"], out)  # fmt: skip
    assert "not a readable .npz file" in line


def test_shared_classes_refused_unless_allowed(tmp_path, capsys):
    csv_path = tiny_csv(tmp_path, shared=True)
    out = tmp_path / "out"
    line = _usage_error(capsys, ["--dataset", f"csv:{csv_path}", *TINY], out)
    assert "1 of the 5 classes" in line and "--allow-shared-classes" in line
    argv = ["--dataset", f"csv:{csv_path}", *TINY, "--losses", "proxy_anchor",
            "--allow-shared-classes", "--val-fraction", "0", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = (out / "report.md").read_text().splitlines()
    assert "not class-disjoint" in report[2]
    protocol = json.loads((out / "protocol.json").read_text())["protocol"]
    assert protocol["allow_shared_classes"] is True
    assert protocol["class_split"]["shared_classes"] == 1


def test_corrupt_image_named_or_skipped_and_counted(tmp_path, capsys):
    folder = tiny_images(tmp_path / "img")
    broken = folder / "class_3" / "2.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG: its header reads
    out = tmp_path / "out"
    line = _usage_error(capsys, ["--dataset", f"folder:{folder}", *TINY], out)
    assert str(broken) in line and "--skip-corrupt-images" in line
    argv = ["--dataset", f"folder:{folder}", *TINY, "--losses", "proxy_anchor",
            "--skip-corrupt-images", "--val-fraction", "0", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "1 image(s) that could not be decoded were skipped" in (out / "report.md").read_text()
    protocol = json.loads((out / "protocol.json").read_text())["protocol"]
    assert protocol["class_split"]["skipped_images"] == 1
    assert protocol["skip_corrupt_images"] is True and protocol["test_fraction"] == 0.5


def test_folder_split_is_seeded_and_recorded(tmp_path):
    folder = tiny_images(tmp_path / "img")
    configs = {
        (fraction, seed): BenchmarkConfig(dataset=f"folder:{folder}", device="cpu",
                                          test_fraction=fraction, split_seed=seed)
        for fraction in (0.5, 0.25) for seed in (0, 1)
    }  # fmt: skip
    splits = {k: c.class_split for k, c in configs.items()}
    assert splits[0.5, 0]["test_classes"] == 4 and splits[0.25, 0]["test_classes"] == 2
    assert splits[0.5, 0]["sha256"] != splits[0.5, 1]["sha256"]  # another draw
    again = BenchmarkConfig(dataset=f"folder:{folder}", device="cpu", test_fraction=0.5)
    assert again.class_split == splits[0.5, 0]
    assert configs[0.5, 0].protocol()["test_fraction"] == 0.5


def test_user_data_read_once_is_handed_to_another_process(tmp_path, monkeypatch):
    """What a --jobs worker gets from its parent (pickled, as spawn sends its arguments): the
    same decoded images and split without reading a file; a changed input is read again."""
    from pml_proxies.benchmark import userdata

    folder = tiny_images(tmp_path / "img")
    monkeypatch.setattr(userdata, "_USER_DATA", {})
    config = BenchmarkConfig(dataset=f"folder:{folder}", device="cpu", test_fraction=0.5)
    parent = userdata.user_data(config)
    handed = pickle.loads(pickle.dumps(userdata.read_user_data()))

    def no_reading(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(userdata, "_USER_DATA", {})  # a fresh process
    monkeypatch.setattr(userdata, "_read_user_data", no_reading)
    assert userdata.adopt_user_data({**handed, ("x",): "not user data"}) == 1
    worker = userdata.user_data(config)
    np.testing.assert_array_equal(worker.images, parent.images)
    assert (worker.fingerprint, worker.class_split) == (parent.fingerprint, parent.class_split)
    (folder / "class_0" / "extra.png").write_bytes((folder / "class_0" / "0.png").read_bytes())
    os.utime(folder, ns=(1, 1))  # the folder's time: another key
    with pytest.raises(AssertionError, match="read again"):
        userdata.user_data(config)


def test_the_small_cnn_takes_natural_images_at_64_px_by_default(tmp_path):
    """224 px costs the small CNN about 17x the CPU time of 64 px a step: the default comparison
    on a few thousand images would take about 10 hours on 2 cores instead of about 40 minutes."""
    folder = tiny_images(tmp_path / "img")
    config = BenchmarkConfig(dataset=f"folder:{folder}", device="cpu", test_fraction=0.5)
    assert (config.trunk, config.image_size, config.protocol()["image_size"]) == (
        "small_cnn", 64, 64)  # fmt: skip
    assert config.eval_batch_images == 32
    chosen = BenchmarkConfig(dataset=f"folder:{folder}", device="cpu", test_fraction=0.5,
                             image_size=224)  # fmt: skip
    assert (chosen.image_size, chosen.eval_batch_images) == (224, 8)
    omniglot_like = BenchmarkConfig(dataset=f"folder:{folder}", device="cpu", test_fraction=0.5,
                                    dataset_kwargs={"transforms": "omniglot"})  # fmt: skip
    assert omniglot_like.image_size == 32  # the benchmark's Omniglot side


def test_user_data_options_refused_with_a_named_set():
    with pytest.raises(ConfigError, match="test_fraction: only for your own data"):
        BenchmarkConfig(dataset="digits", device="cpu", test_fraction=0.3)
    with pytest.raises(ConfigError, match="allow_shared_classes"):
        BenchmarkConfig(dataset="digits", device="cpu", allow_shared_classes=True)


def test_changed_data_refused_in_an_existing_folder(tmp_path, capsys):
    csv_path = tiny_csv(tmp_path)
    out = tmp_path / "out"
    argv = ["--dataset", f"csv:{csv_path}", *TINY, "--losses", "proxy_anchor",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert main([*argv, "--report-only"]) == 0  # the same data: reported
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    lines = csv_path.read_text().splitlines()
    label, rest = lines[1].split(",", 1)
    lines[1] = f"{int(label) + 1},{rest}"  # a train image moved to another train class
    csv_path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different protocol" in err and "data_fingerprint" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# ------------------------------------------------------------------ frozen features
@pytest.mark.parametrize("trunk", ["linear", "mlp"])
def test_features_train_a_head(tmp_path, capsys, trunk):
    path = tiny_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    argv = ["--dataset", f"features:{path}", "--trunk", trunk, "--mlp-width", "12",
            "--embedding-size", "8", *TINY, "--losses", "proxy_anchor,mpa", "--seeds", "0,1",
            "--jobs", "1", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4
    protocol = json.loads((out / "protocol.json").read_text())["protocol"]
    assert protocol["trunk"] == trunk and protocol["mlp_width"] == 12
    assert len(protocol["data_fingerprint"]) == 64
    assert main(argv) == 0  # resumed: every run reused
    assert "4 finished run(s) reused" in capsys.readouterr().out


def test_a_features_file_is_read_once_for_its_checks_and_fingerprint(tmp_path, monkeypatch):
    """The checks, class split and fingerprint take one read of the file (two before); a file
    without validation rows is refused up front, naming the data set."""
    from pml_proxies.benchmark import userdata
    from pml_proxies.datasets import features as features_mod
    from pml_proxies.datasets.fingerprint import file_sha256

    path = tiny_features(tmp_path / "f.npz")
    reads = []
    original = features_mod.read_features
    monkeypatch.setattr(features_mod, "read_features", lambda p: reads.append(p) or original(p))
    monkeypatch.setattr(userdata, "_USER_DATA", {})
    config = BenchmarkConfig(dataset=f"features:{path}", trunk="linear", device="cpu")
    assert len(reads) == 1 and config.data_fingerprint == file_sha256(path)
    arrays = dict(np.load(path))
    np.savez(tmp_path / "train_only.npz", **{**arrays, "split": np.full(len(arrays["split"]),
                                                                         "train")})  # fmt: skip
    with pytest.raises(ConfigError, match="dataset: .*no validation rows"):
        BenchmarkConfig(dataset=f"features:{tmp_path / 'train_only.npz'}", trunk="linear",
                        device="cpu")  # fmt: skip


def test_features_and_trunks_must_match(tmp_path, capsys):
    path = tiny_features(tmp_path / "f.npz")
    out = tmp_path / "out"
    line = _usage_error(capsys, ["--dataset", f"features:{path}"], out)
    assert "--trunk" in line and "linear or mlp" in line
    line = _usage_error(capsys, ["--dataset", f"csv:{tiny_csv(tmp_path)}", "--trunk", "mlp"], out)
    assert "head on frozen features" in line


def test_features_head_shapes():
    import torch

    from pml_proxies.benchmark.models import EmbeddingNet, build_trunk

    for name, width, params in [("linear", None, 16 * 8 + 8), ("mlp", 12, 16 * 12 + 12 + 24 + 12 * 8 + 8)]:  # fmt: skip
        net = EmbeddingNet(build_trunk(name, 16, 224, False, width), "avg", 8)
        assert net(torch.randn(5, 16)).shape == (5, 8)
        assert sum(p.numel() for p in net.parameters()) == params


# ------------------------------------------------------------------ the rest of the machinery
@pytest.mark.slow
def test_folder_runs_resume_folds_and_tune(tmp_path, capsys):
    """A tiny folder: --jobs 2, resume, tune with SQLite and --folds."""
    folder = tiny_images(tmp_path / "img", classes=12)
    out = tmp_path / "out"
    base = ["--dataset", f"folder:{folder}", *TINY, "--losses", "proxy_anchor"]
    assert main([*base, "--seeds", "0,1", "--jobs", "2", "--output", str(out)]) == 0
    assert main([*base, "--seeds", "0,1", "--output", str(out)]) == 0
    assert "2 finished run(s) reused" in capsys.readouterr().out
    assert (out / "metrics.png").is_file()
    tuned = tmp_path / "tuned"
    argv = ["tune", *base, "--trials", "2", "--folds", "2", "--output", str(tuned),
            "--storage", f"sqlite:///{tmp_path / 'study.db'}"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr()
    report = (tuned / "tune_report.md").read_text()
    assert report.startswith("# Tuned benchmark report: img")
