"""A user's own images: OML's retrieval dataframe (``csv:``) and image folders (``folder:``)
read, validated and loaded (:mod:`pml_proxies.datasets.dataframe`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pml_proxies.datasets import get_dataset, get_transforms
from pml_proxies.datasets.dataframe import (
    DataframeError,
    RetrievalDataset,
    load_image_file,
    read_dataframe,
    read_image_folder,
)
from pml_proxies.datasets.features import read_features

HEADER = ["label", "path", "split", "is_query", "is_gallery"]


def _image(path: Path, value: int, size=(12, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
        path
    )
    return path


def _rows(tmp_path: Path) -> list[dict]:
    """3 train classes (0-2) and 2 validation classes (3-4), 3 images each; in validation the
    first image of a class is a query only, the others query and gallery."""
    rows = []
    for label in range(5):
        for j in range(3):
            name = f"img/{label}_{j}.png"
            _image(tmp_path / name, 10 * label + j)
            train = label < 3
            rows.append(
                dict(
                    label=str(label),
                    path=name,
                    split="train" if train else "validation",
                    is_query="" if train else "True",
                    is_gallery="" if train else str(j > 0),
                )
            )
    return rows


def _write(tmp_path: Path, rows: list[dict], name="df.csv") -> Path:
    path = tmp_path / name
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_valid_dataframe_reads_into_splits_with_query_and_gallery_flags(tmp_path):
    table = read_dataframe(_write(tmp_path, _rows(tmp_path)))
    assert table.labels.tolist() == [label for label in range(5) for _ in range(3)]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table.paths)
    train, test = RetrievalDataset(table, "train"), RetrievalDataset(table, "test")
    assert (len(train), len(test)) == (9, 6)
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.classes == ["3", "4"]
    assert test.is_query.all() and test.is_gallery.tolist() == [False, True, True] * 2
    assert not train.is_query.any() and not train.is_gallery.any()
    assert table.shared_labels().size == 0
    image, label = train[4]
    assert image.size == (12, 10) and label == 1


@pytest.mark.parametrize("relative_to", ["csv_folder", "root"])
def test_relative_paths_start_from_the_csv_folder_or_from_root(tmp_path, relative_to):
    rows = _rows(tmp_path)
    if relative_to == "csv_folder":
        table = read_dataframe(_write(tmp_path, rows))
    else:
        (tmp_path / "elsewhere").mkdir()
        table = read_dataframe(_write(tmp_path / "elsewhere", rows), root=tmp_path)
    assert table.paths[0] == str(tmp_path / "img" / "0_0.png")


def _error(tmp_path, rows, **kwargs) -> DataframeError:
    with pytest.raises(DataframeError) as info:
        read_dataframe(_write(tmp_path, rows), **kwargs)
    return info.value


def test_a_missing_column_is_named(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "is_gallery"} for r in _rows(tmp_path)]
    e = _error(tmp_path, rows)
    assert e.column == "is_gallery" and "missing" in str(e)


@pytest.mark.parametrize(
    "column, value, words",
    [
        ("label", "3.5", "must be an integer"),
        ("label", "cat", "must be an integer"),
        ("split", "test", "must be one of"),
        ("is_query", "maybe", "True or False"),
        ("path", "img/nowhere.png", "no such file"),
    ],
)
def test_a_bad_value_names_its_column_and_lines(tmp_path, column, value, words):
    rows = _rows(tmp_path)
    for i in (10, 13):  # validation rows, CSV lines 12 and 15
        rows[i][column] = value
    e = _error(tmp_path, rows)
    assert e.column == column and e.lines == [12, 15] and words in str(e)
    assert "line 12, 15" in str(e)


def test_many_offending_rows_are_counted(tmp_path):
    rows = _rows(tmp_path)
    for r in rows:
        r["label"] = "x"
    e = _error(tmp_path, rows)
    assert e.lines == list(range(2, 17)) and "(15 rows in all)" in str(e)


def test_query_flags_on_train_rows_are_refused(tmp_path):
    rows = _rows(tmp_path)
    rows[1]["is_query"] = "False"
    e = _error(tmp_path, rows)
    assert e.column == "is_query" and e.lines == [3] and "empty on train rows" in str(e)


def test_a_validation_row_neither_query_nor_gallery_is_refused(tmp_path):
    rows = _rows(tmp_path)
    rows[9].update(is_query="False", is_gallery="False")
    e = _error(tmp_path, rows)
    assert e.lines == [11] and "neither query nor gallery" in str(e)


def test_a_query_label_without_gallery_rows_is_refused(tmp_path):
    rows = _rows(tmp_path)
    for r in rows[12:15]:  # class 4: queries only
        r["is_gallery"] = "False"
    e = _error(tmp_path, rows)
    assert e.column == "label" and e.lines == [14, 15, 16] and "no gallery row" in str(e)


def test_an_unreadable_image_is_named(tmp_path):
    rows = _rows(tmp_path)
    (tmp_path / rows[4]["path"]).write_bytes(b"not an image")
    e = _error(tmp_path, rows)
    assert e.column == "path" and e.lines == [6] and "not a readable image" in str(e)
    assert read_dataframe(_write(tmp_path, rows), check_images=False).paths  # opt-out


@pytest.mark.parametrize(
    "box, column, words",
    [
        (("1", "", "1", "5"), "x_1", "all four"),
        (("5", "2", "1", "5"), "x_2", "x_1 < x_2"),
        (("1", "5", "6", "6"), "y_2", "y_1 < y_2"),
        (("-1", "5", "1", "5"), "x_1", ">= 0"),
        (("1.5", "5", "1", "5"), "x_1", "integer"),
        (("1", "13", "1", "5"), "x_2", "outside the image"),  # the images are 12 x 10
    ],
)
def test_bad_boxes_are_refused(tmp_path, box, column, words):
    rows = _rows(tmp_path)
    for r in rows:
        r.update(x_1="", x_2="", y_1="", y_2="")
    rows[2].update(zip(("x_1", "x_2", "y_1", "y_2"), box))
    e = _error(tmp_path, rows)
    assert e.column == column and e.lines == [4] and words in str(e)


def test_a_box_crops_the_image_and_categories_are_kept(tmp_path):
    rows = _rows(tmp_path)
    for r in rows:
        r.update(x_1="", x_2="", y_1="", y_2="", category=f"group{int(r['label']) % 2}")
    rows[11].update(x_1="2", x_2="7", y_1="1", y_2="9")
    table = read_dataframe(_write(tmp_path, rows))
    test = RetrievalDataset(table, "test")
    cropped, whole = test[2][0], test[1][0]
    assert cropped.size == (5, 8) and whole.size == (12, 10)
    full = np.asarray(Image.open(tmp_path / rows[11]["path"]).convert("RGB"))
    assert np.array_equal(np.asarray(cropped), full[1:9, 2:7])
    assert test.categories == ["group1"] * 3 + ["group0"] * 3


def test_get_dataset_reads_csv_and_folder_names(tmp_path):
    path = _write(tmp_path, _rows(tmp_path))
    ds = get_dataset(f"csv:{path}", "test")
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    train = get_transforms(f"csv:{path}", train=True, image_size=32)
    assert train(ds.load_image(0)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="give a path"):
        get_dataset("csv:", "train")


# ------------------------------------------------------------------ image folders
def _folder(tmp_path: Path, classes: int, per_class=2, subset="") -> Path:
    for c in range(classes):
        for j in range(per_class):
            _image(tmp_path / subset / f"class_{c}" / f"{j}.png", 100 * c + j)
    return tmp_path


def test_a_train_test_folder_keeps_its_split(tmp_path):
    _folder(tmp_path / "data", 3, subset="train")
    (tmp_path / "data" / "train" / "class_0" / "notes.txt").write_text("not an image")
    for c in range(3, 5):
        _image(tmp_path / "data" / "test" / f"class_{c}" / "0.png", c)
    table = read_image_folder(tmp_path / "data")
    assert (table.split == "train").sum() == 6 and (table.split == "validation").sum() == 2
    test = RetrievalDataset(table, "test")
    assert test.is_query.all() and test.is_gallery.all()


def test_a_flat_folder_is_split_by_classes_with_a_seed(tmp_path):
    _folder(tmp_path, 10)
    a, b = read_image_folder(tmp_path, seed=3), read_image_folder(tmp_path, seed=3)
    assert np.array_equal(a.split, b.split)
    train, test = a.labels[a.split == "train"], a.labels[a.split == "validation"]
    assert len(set(train)) == 5 and len(set(test)) == 5 and not set(train) & set(test)
    other = read_image_folder(tmp_path, seed=4)
    assert not np.array_equal(other.split, a.split)  # 252 possible splits of 10 classes
    assert (read_image_folder(tmp_path, test_fraction=0.3).split == "validation").sum() == 6


@pytest.mark.parametrize("fraction", [0.0, 1.0, float("nan")])
def test_bad_test_fractions_are_refused(tmp_path, fraction):
    _folder(tmp_path, 4)
    with pytest.raises(ValueError, match="test_fraction"):
        read_image_folder(tmp_path, test_fraction=fraction)


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "class_0").mkdir(parents=True)
    with pytest.raises(ValueError, match="class_0 holds no image"):
        read_image_folder(tmp_path / "empty")
    _folder(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="at least 2 class folders"):
        read_image_folder(tmp_path / "one")


# ------------------------------------------------------------------ image files
@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGB", "1"])
def test_common_modes_load_as_8_bit_rgb(tmp_path, mode):
    path = _image(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}", 1, mode=mode)
    im = load_image_file(str(path))
    assert im.mode == "RGB" and im.size == (12, 10)


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    a = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")  # mode I;16
    assert np.asarray(load_image_file(str(tmp_path / "x.png")))[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_composed_over_white(tmp_path):
    a = np.zeros((2, 2, 4), dtype=np.uint8)  # black, fully transparent, except one opaque red
    a[0, 0] = (255, 0, 0, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    rgb = np.asarray(load_image_file(str(tmp_path / "x.png")))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (30, 10), "white")
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "x.jpg", exif=exif)
    assert load_image_file(str(tmp_path / "x.jpg")).size == (10, 30)


def test_very_large_images_load(tmp_path, monkeypatch):
    _image(tmp_path / "x.png", 1, size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels: PIL alone refuses
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "x.png")
    assert load_image_file(str(tmp_path / "x.png")).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 100  # the limit is restored


def test_a_corrupt_image_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(OSError, match="x.png"):
        load_image_file(str(tmp_path / "x.png"))


# ------------------------------------------------------------------ frozen features
def _features(tmp_path: Path, dtype=np.float32, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = dict(
        features=rng.standard_normal((10, 6)).astype(dtype),
        labels=np.array([0, 0, 1, 1, 2, 2, 7, 7, 9, 9]),
        split=np.array(["train"] * 6 + ["validation"] * 4),
        category=np.array(list("aabbccddee")),
    )
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(tmp_path / "f.npz", **arrays)
    return tmp_path / "f.npz"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_features_file_reads_into_splits(tmp_path, dtype):
    path = _features(tmp_path, dtype)
    train, test = get_dataset(f"features:{path}", "train"), get_dataset(f"features:{path}", "test")
    assert (len(train), len(test), train.feature_dim) == (6, 4, 6)
    x, y = test[2]
    expected = np.load(path)["features"][8].astype(np.float32)
    assert x.dtype == torch.float32 and np.array_equal(x.numpy(), expected) and y == 1
    assert test.classes == ["7", "9"] and test.categories == list("ddee")
    assert test.is_query.all() and test.is_gallery.all()  # defaults: every validation row
    with pytest.raises(ValueError, match="no image transforms"):
        get_transforms(f"features:{path}", train=True)


@pytest.mark.parametrize(
    "changes, column, words",
    [
        (dict(labels=None), "labels", "missing"),
        (dict(features=np.zeros((10,), np.float32)), "features", "N x F float"),
        (dict(features=np.zeros((10, 2), np.int64)), "features", "N x F float"),
        (dict(labels=np.arange(10.0)), "labels", "integers"),
        (dict(split=np.array(["train"] * 6 + ["test"] * 4)), "split", "one of"),
        (dict(is_query=np.array([True] + [False] * 9)), "is_query", "False on train rows"),
        (dict(is_query=np.zeros(10, bool), is_gallery=np.zeros(10, bool)), "is_query", "neither"),
        (dict(is_gallery=np.array([False] * 8 + [True] * 2)), "labels", "no gallery row"),
        (dict(labels=np.arange(4)), "labels", "shape"),
    ],
)
def test_bad_features_files_are_refused_naming_the_array(tmp_path, changes, column, words):
    with pytest.raises(DataframeError) as info:
        read_features(_features(tmp_path, **changes))
    assert info.value.column == column and words in str(info.value)


def test_non_finite_features_are_refused_with_their_rows(tmp_path):
    features = np.ones((10, 3), np.float32)
    features[[3, 8], 1] = np.nan
    with pytest.raises(DataframeError) as info:
        read_features(_features(tmp_path, features=features))
    assert info.value.lines == [3, 8] and "not finite" in str(info.value)


def test_a_file_that_is_not_npz_is_refused(tmp_path):
    (tmp_path / "f.npz").write_bytes(b"junk")
    with pytest.raises(DataframeError, match="not a readable .npz"):
        read_features(tmp_path / "f.npz")


# ------------------------------------------------------------------ fingerprints
def test_fingerprints_change_with_the_data_and_only_then(tmp_path):
    import os

    from pml_proxies.datasets.fingerprint import data_fingerprint

    rows = _rows(tmp_path)
    path = _write(tmp_path, rows)
    first = data_fingerprint(get_dataset(f"csv:{path}", "train"))
    assert first == data_fingerprint(get_dataset(f"csv:{path}", "test"))  # the whole table
    assert first == data_fingerprint(get_dataset(f"csv:{path}", "train"))  # stable
    rows[3]["label"] = "2"
    assert data_fingerprint(get_dataset(f"csv:{_write(tmp_path, rows)}", "train")) != first
    rows[3]["label"] = "1"
    image = tmp_path / rows[0]["path"]
    os.utime(image, ns=(1, 1))  # a replaced image: another modification time
    assert data_fingerprint(get_dataset(f"csv:{_write(tmp_path, rows)}", "train")) != first
    features = _features(tmp_path)
    a = data_fingerprint(get_dataset(f"features:{features}", "train"))
    b = data_fingerprint(
        get_dataset(f"features:{_features(tmp_path, labels=np.arange(10))}", "train")
    )
    assert a != b and len(a) == 64
    assert data_fingerprint(get_dataset("digits", "train")) is None
