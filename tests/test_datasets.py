"""Data sets of the benchmark: parsing on small fake trees, transforms, download/extract code."""

import fnmatch
import hashlib
import importlib.resources
import io
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pml_proxies.datasets import (
    DATASET_NAMES,
    CorruptArchiveError,
    DownloadError,
    default_root,
    download_url,
    extract_archive,
    get_dataset,
    get_transforms,
)
from pml_proxies.datasets import cars196 as cars_mod
from pml_proxies.datasets import cub200 as cub_mod
from pml_proxies.datasets import download as download_mod
from pml_proxies.datasets import omniglot as omni_mod
from pml_proxies.datasets import sop as sop_mod
from pml_proxies.datasets import transforms as T

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- helpers


def write_image(path: Path, size=(40, 30), mode="RGB", seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr)
    img.save(path, format=fmt)
    return path


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def assert_contiguous(ds):
    assert ds.labels.dtype == np.int64
    assert ds.num_classes == len(ds.classes)
    assert set(ds.labels.tolist()) == set(range(ds.num_classes))


# ----------------------------------------------------------------------------- digits


def test_digits_splits_match_sklearn():
    from sklearn.datasets import load_digits

    data = load_digits()
    train = get_dataset("digits", "train")
    test = get_dataset("digits", "test")
    assert (len(train), len(test)) == (901, 896)
    assert train.classes == ["0", "1", "2", "3", "4"]
    assert test.classes == ["5", "6", "7", "8", "9"]
    assert_contiguous(train)
    assert_contiguous(test)
    # independent reference: the i-th test image is the i-th sklearn image with target >= 5
    idx = np.flatnonzero(data.target >= 5)
    for i in (0, 17, len(test) - 1):
        x, y = test[i]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_allclose(x[0].numpy(), data.images[idx[i]] / 16.0, rtol=0, atol=1e-7)
        assert y == data.target[idx[i]] - 5 and isinstance(y, int)


def test_digits_transform_options():
    ds = get_dataset("digits", "train", transform=get_transforms("digits", True, image_size=16))
    assert ds[0][0].shape == (1, 16, 16)
    tf3 = get_transforms("digits", False, channels=3)
    x = get_dataset("digits", "train", transform=tf3)[3][0]
    raw = torch.from_numpy(get_dataset("digits", "train").load_image(3))
    mean = torch.tensor(T.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(T.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x, (raw.expand(3, 8, 8) - mean) / std)


# ----------------------------------------------------------------------------- transforms


def test_to_tensor_pil_and_arrays():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    x = T.ToTensor()(Image.fromarray(rgb))
    assert x.shape == (3, 4, 5)
    np.testing.assert_allclose(x.numpy(), rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)
    g = T.ToTensor()(np.full((3, 2), 0.25))
    assert g.shape == (1, 3, 2) and torch.all(g == 0.25)
    bw = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert T.ToTensor()(bw).tolist() == [[[0.0, 1.0]]]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_resize_shorter_side_and_center_crop(as_tensor):
    arr = np.random.default_rng(0).integers(0, 256, size=(50, 100, 3), dtype=np.uint8)
    img = T.ToTensor()(arr) if as_tensor else Image.fromarray(arr)
    out = T.ToTensor()(T.Resize(20)(img))
    assert out.shape == (3, 20, 40)
    out = T.ToTensor()(T.Resize((7, 9))(img))
    assert out.shape == (3, 7, 9)
    crop = T.ToTensor()(T.CenterCrop((10, 30))(img))
    ref = arr[20:30, 35:65].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(crop.numpy(), ref, atol=1e-6)


def test_resize_tensor_close_to_pil():
    arr = np.random.default_rng(1).integers(0, 256, size=(60, 80), dtype=np.uint8)
    arr = np.kron(arr[::4, ::4], np.ones((4, 4), dtype=np.uint8))  # smooth-ish blocks
    a = T.ToTensor()(T.Resize((30, 40))(Image.fromarray(arr)))
    b = T.Resize((30, 40))(T.ToTensor()(arr))
    assert a.shape == b.shape == (1, 30, 40)
    assert (a - b).abs().mean() < 0.02


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flip(as_tensor):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    img = T.ToTensor()(arr) if as_tensor else Image.fromarray(arr)
    flipped = T.ToTensor()(T.RandomHorizontalFlip(p=1.0)(img))
    np.testing.assert_allclose(flipped[0].numpy(), arr[:, ::-1] / 255.0, atol=1e-7)
    same = T.ToTensor()(T.RandomHorizontalFlip(p=0.0)(img))
    np.testing.assert_allclose(same[0].numpy(), arr / 255.0, atol=1e-7)


def test_random_resized_crop_bounds_and_full_crop():
    rrc = T.RandomResizedCrop(16, scale=(0.2, 0.9), ratio=(0.5, 2.0))
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = rrc.get_params(30, 50)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
        assert 0.2 * 1500 * 0.8 <= h * w <= 0.9 * 1500 * 1.2  # rounding slack
        assert 0.5 * 0.8 <= w / h <= 2.0 * 1.2
    # scale = ratio = 1 on a square image: the whole image, just resized
    arr = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    full = T.RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))(Image.fromarray(arr))
    ref = Image.fromarray(arr).resize((8, 8), Image.BILINEAR)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(ref))


def test_convert_channels_and_normalize():
    grey = torch.rand(1, 4, 4)
    rgb = T.ConvertChannels(3)(grey)
    assert rgb.shape == (3, 4, 4) and torch.equal(rgb[2], grey[0])
    arr = np.random.default_rng(3).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    luma = T.ConvertChannels(1)(T.ToTensor()(arr))
    pil_luma = T.ToTensor()(Image.fromarray(arr).convert("L"))
    assert (luma - pil_luma).abs().max() <= 1.0 / 255 + 1e-6
    x = torch.rand(3, 2, 2)
    out = T.Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(x)
    torch.testing.assert_close(out[1], (x[1] - 0.2) / 0.25)
    with pytest.raises(ValueError, match="channels"):
        T.ConvertChannels(2)


def test_natural_eval_transform_matches_pil_reference():
    arr = np.random.default_rng(4).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = get_transforms("cub200", train=False, image_size=112)(img)
    # reference written with PIL: shorter side to 128 (= 112 * 256 / 224), centre 112x112
    ref = img.resize((192, 128), Image.BILINEAR).crop((40, 8, 152, 120))
    ref = (np.asarray(ref, dtype=np.float32) / 255.0 - T.IMAGENET_MEAN) / T.IMAGENET_STD
    np.testing.assert_allclose(out.numpy(), ref.transpose(2, 0, 1), atol=1e-5)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_get_transforms_shapes_and_determinism(name):
    arr = np.random.default_rng(5).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if name == "digits":
        img = np.random.default_rng(5).random((8, 8)).astype(np.float32)
    size = 8 if name == "digits" else 32
    channels = 1 if name in ("digits", "omniglot") else 3
    train_tf = get_transforms(name, True, image_size=size)
    eval_tf = get_transforms(name, False, image_size=size)
    assert eval_tf(img).shape == (channels, size, size)
    torch.testing.assert_close(eval_tf(img), eval_tf(img))
    torch.manual_seed(123)
    a = train_tf(img)
    torch.manual_seed(123)
    b = train_tf(img)
    assert a.shape == (channels, size, size)
    torch.testing.assert_close(a, b)
    if name not in ("digits",):  # digits have no augmentation
        outs = [train_tf(img) for _ in range(5)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_get_transforms_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_transforms("mnist", True)
    with pytest.raises(ValueError, match="channels"):
        get_transforms("cub200", True, channels=2)


def test_omniglot_transform_inverts_and_channels():
    img = Image.new("1", (105, 105), color=1)  # white page
    img.paste(0, (40, 40, 60, 60))  # black square
    x = get_transforms("omniglot", False)(img)
    assert x.shape == (1, 64, 64)
    assert x[0, 0, 0] == 0.0 and x[0, 32, 32] == 1.0  # strokes bright, background dark
    x3 = get_transforms("omniglot", False, image_size=84, channels=3)(img)
    assert x3.shape == (3, 84, 84)
    torch.testing.assert_close(
        x3[:, 0, 0], (1 - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD)
    )


# ----------------------------------------------------------------------------- roots, errors


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path / "env"))
    assert default_root(tmp_path / "arg") == tmp_path / "arg"
    assert default_root() == tmp_path / "env"
    monkeypatch.delenv("PML_PROXIES_DATA")
    assert default_root() == Path.home() / ".cache" / "pml-proxies" / "data"


def test_bad_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("mnist", "train")
    with pytest.raises(ValueError, match="split"):
        get_dataset("digits", "val")
    with pytest.raises(ValueError, match="split"):
        get_dataset("cub200", "query", root=tmp_path)
    with pytest.raises(TypeError, match="download"):
        get_dataset("cub200", "train", root=tmp_path, download="yes")
    with pytest.raises(ValueError, match="variant"):
        get_dataset("omniglot", "train", variant="tiny")


FILE_SETS = ["omniglot", "cub200", "cars196", "sop", "inshop"]


def assert_no_leftovers(top: Path):
    """No partial download, no staging folder and no empty folder anywhere under ``top``."""
    if not top.exists():
        return
    for p in top.rglob("*"):
        assert not p.name.endswith(".part"), p
        assert not p.name.startswith(".extracting-"), p
        if p.is_dir():
            assert any(p.iterdir()), f"empty folder left behind: {p}"


@pytest.mark.parametrize("name", FILE_SETS)
def test_missing_files_error_names_python_and_cli_options(name, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        get_dataset(name, "train", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "given by root= in Python / --root on the CLI" in msg
    for option in ("root=", "--root", "$PML_PROXIES_DATA"):
        assert option in msg, (option, msg)
    if name == "inshop":
        assert "cannot be downloaded automatically" in msg and "Google Drive" in msg
    else:
        assert "download=True" in msg and "--download" in msg
    assert list(tmp_path.iterdir()) == []  # looking creates nothing


@pytest.mark.parametrize("name", ["cub200", "sop"])
def test_missing_files_error_says_where_the_root_came_from(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match=r"the folder of \$PML_PROXIES_DATA") as e:
        get_dataset(name, "train")
    assert str(tmp_path / "env") in str(e.value)
    monkeypatch.delenv("PML_PROXIES_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="neither root= / --root nor"):
        get_dataset(name, "train")


def test_inshop_download_explains_google_drive(tmp_path):
    with pytest.raises(FileNotFoundError, match="Google Drive"):
        get_dataset("inshop", "train", root=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- download code


def test_download_url_file_scheme(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello" * 1000)
    dest = download_url(src.as_uri(), tmp_path / "out" / "a.bin", md5=md5(src), progress=False)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(RuntimeError, match="MD5 mismatch"):
        download_url(src.as_uri(), tmp_path / "out" / "b.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "out" / "b.bin").exists()
    assert not (tmp_path / "out" / "b.bin.part").exists()
    with pytest.raises(RuntimeError, match="could not download"):
        download_url((tmp_path / "nope").as_uri(), tmp_path / "out" / "c.bin", progress=False)


MALFORMED_URLS = [
    "not a url",  # ValueError: unknown url type
    "http://[::1/file.bin",  # ValueError: Invalid IPv6 URL
    "http://exa mple.com/file.bin",  # http.client.InvalidURL, raised before any connection
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_mirror_is_recorded_and_the_next_one_tried(tmp_path, url):
    """Before: the ValueError / InvalidURL of a malformed mirror escaped download_first."""
    src = tmp_path / "mirror" / "data" / "file.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"payload" * 100)
    dest = tmp_path / "root" / "sub" / "file.bin"
    got = download_mod.download_first([url, src.as_uri()], dest, md5=md5(src), progress=False)
    assert got == dest and dest.read_bytes() == src.read_bytes()
    # only malformed mirrors: a DownloadError naming each one, and nothing left on disk
    other = tmp_path / "root2" / "file.bin"
    with pytest.raises(DownloadError, match="all mirrors failed") as e:
        download_mod.download_first([url, "http://[bad"], other, progress=False)
    assert repr(url) in str(e.value) and "'http://[bad'" in str(e.value)
    assert not (tmp_path / "root2").exists()


def test_extract_archive_zip_tar_and_unsafe(tmp_path):
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("top/x.txt", "x")
    extract_archive(zpath, tmp_path / "z", progress=False)
    assert (tmp_path / "z" / "top" / "x.txt").read_text() == "x"
    tpath = tmp_path / "a.tgz"
    with tarfile.open(tpath, "w:gz") as t:
        info = tarfile.TarInfo("top/y.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"y"))
    extract_archive(tpath, tmp_path / "t", progress=False)
    assert (tmp_path / "t" / "top" / "y.txt").read_text() == "y"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.txt", "bad")
    with pytest.raises(RuntimeError, match="unsafe"):
        extract_archive(evil, tmp_path / "e", progress=False)
    assert not (tmp_path / "escape.txt").exists()
    (tmp_path / "plain.txt").write_text("no archive")
    with pytest.raises(CorruptArchiveError, match="neither") as e:  # a ValueError
        extract_archive(tmp_path / "plain.txt", tmp_path / "p")
    assert isinstance(e.value, ValueError) and str(tmp_path / "plain.txt") in str(e.value)
    assert "delete it and download it again" in str(e.value) and not (tmp_path / "p").exists()


def test_extract_archive_merges_into_existing_folder(tmp_path):
    dest = tmp_path / "d"
    (dest / "top").mkdir(parents=True)
    (dest / "top" / "old.txt").write_text("kept")
    (dest / "top" / "x.txt").write_text("stale")
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("top/x.txt", "new")
        z.writestr("top/sub/y.txt", "y")
    extract_archive(zpath, dest, progress=False)
    assert (dest / "top" / "old.txt").read_text() == "kept"
    assert (dest / "top" / "x.txt").read_text() == "new"
    assert (dest / "top" / "sub" / "y.txt").read_text() == "y"
    assert sorted(p.name for p in dest.iterdir()) == ["top"]  # no staging folder left


def make_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def random_bytes(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_extract_truncated_archive_changes_nothing(tmp_path, kind):
    members = {f"top/f{i}.bin": random_bytes(50_000, seed=i) for i in range(4)}
    archive = tmp_path / f"a.{kind}"
    if kind == "tgz":
        make_tgz(archive, members)
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    else:  # a CRC error in the last member (the central directory stays readable)
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
            for name, data in members.items():
                z.writestr(name, data)
        raw = bytearray(archive.read_bytes())
        at = bytes(raw).find(members["top/f3.bin"]) + 1000
        raw[at] ^= 0xFF
        archive.write_bytes(bytes(raw))
    dest = tmp_path / "dest"
    with pytest.raises(CorruptArchiveError, match="damaged or truncated") as e:
        extract_archive(archive, dest, progress=False)
    assert e.value.path == archive and str(archive) in str(e.value)
    assert "delete it and download it again" in str(e.value)
    assert not dest.exists()  # staged: no partial extraction, no created folder


# ------------------------------------------------------------------- failed downloads


class FakeResponse:
    """urlopen's response: ``blocks`` then ``error`` (an exception), with a Content-Length."""

    def __init__(self, blocks, error=None, length=None):
        self.blocks, self.error = list(blocks), error
        self.headers = {"Content-Length": str(length)} if length is not None else {}

    def read(self, n=-1):
        if self.blocks:
            return self.blocks.pop(0)
        if self.error is not None:
            raise self.error
        return b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "response, raised",
    [
        (FakeResponse([b"x" * 100], ConnectionResetError("reset by peer")), DownloadError),
        (FakeResponse([b"x" * 100], KeyboardInterrupt()), KeyboardInterrupt),
        (FakeResponse([b"x" * 100], length=300), DownloadError),  # server closed early
    ],
    ids=["connection_reset", "interrupted", "short_transfer"],
)
def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch, response, raised):
    monkeypatch.setattr(download_mod.urllib.request, "urlopen", lambda *a, **k: response)
    dest = tmp_path / "root" / "sub" / "file.bin"
    with pytest.raises(raised):
        download_url("https://example.invalid/file.bin", dest, progress=False)
    assert not (tmp_path / "root").exists()


def test_failed_dataset_download_leaves_no_folders(tmp_path, monkeypatch):
    missing = (tmp_path / "missing.tgz").as_uri()
    monkeypatch.setattr(cub_mod, "CUB_URLS", [missing, missing])
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="all mirrors failed"):
        get_dataset("cub200", "train", root=root, download=True)
    assert not root.exists()
    # Cars: the first file downloads, the second fails: the complete file stays, nothing else
    src = tmp_path / "mirror"
    make_cars(src)
    monkeypatch.setattr(cars_mod, "CARS_ANNOS_URLS", [(src / "cars_annos.mat").as_uri()])
    monkeypatch.setattr(cars_mod, "CARS_IMAGES_URLS", [missing])
    with pytest.raises(DownloadError):
        get_dataset("cars196", "train", root=root, download=True)
    assert sorted(p.name for p in root.rglob("*")) == ["cars196", "cars_annos.mat"]
    # Omniglot without a root downloads into $PML_PROXIES_DATA: nothing created there either
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(omni_mod, "OMNIGLOT_URL", (tmp_path / "nowhere").as_uri() + "/{}")
    with pytest.raises(DownloadError):
        get_dataset("omniglot", "train", download=True, progress=False)
    assert not (tmp_path / "env").exists()


# ------------------------------------------------------------------- corrupted archives


def test_existing_archive_with_wrong_md5_is_reported_not_overwritten(tmp_path, monkeypatch):
    folder = tmp_path / "cub2011"
    folder.mkdir()
    (folder / "CUB_200_2011.tgz").write_bytes(b"half a download")
    monkeypatch.setattr(cub_mod, "CUB_URLS", [(tmp_path / "never-used.tgz").as_uri()])
    with pytest.raises(FileNotFoundError, match="Found .*CUB_200_2011.tgz"):
        get_dataset("cub200", "train", root=tmp_path)  # without download: hints at it
    with pytest.raises(CorruptArchiveError, match="wrong MD5") as e:
        get_dataset("cub200", "train", root=tmp_path, download=True)
    assert e.value.path == folder / "CUB_200_2011.tgz" and "delete it" in str(e.value)
    assert (folder / "CUB_200_2011.tgz").read_bytes() == b"half a download"
    assert sorted(p.name for p in folder.iterdir()) == ["CUB_200_2011.tgz"]


def test_truncated_archive_of_a_dataset_is_reported(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    make_cars(src)
    archive = make_tgz(
        tmp_path / "car_ims.tgz",
        {f"car_ims/{i:06d}.jpg": random_bytes(40_000, i) for i in range(1, 6)},
    )
    archive.write_bytes(archive.read_bytes()[:100_000])  # e.g. a copy cut short
    target = tmp_path / "root" / "cars196"
    target.mkdir(parents=True)
    shutil.copy(src / "cars_annos.mat", target)
    shutil.copy(archive, target)  # no MD5 is known for Cars: only extraction can tell
    monkeypatch.setattr(cars_mod, "CARS_IMAGES_URLS", [(tmp_path / "never-used").as_uri()])
    with pytest.raises(CorruptArchiveError) as e:
        get_dataset("cars196", "train", root=tmp_path / "root", download=True)
    assert e.value.path == target / "car_ims.tgz" and "download it again" in str(e.value)
    assert sorted(p.name for p in target.iterdir()) == ["car_ims.tgz", "cars_annos.mat"]


# ----------------------------------------------------------------------------- Omniglot


def png_bytes(seed, size=12):
    arr = np.random.default_rng(seed).random((size, size)) > 0.5
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # mode "1", as the real files
    return buf.getvalue()


def make_omniglot_zip(path: Path, top: str, alphabets: dict, drawers=3, seed=0):
    """alphabets: {name: number of characters}; returns {member: png bytes}."""
    written = {}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/", "")
        for a, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                for d in range(1, drawers + 1):
                    name = f"{top}/{a}/character{c:02d}/{c:02d}{seed}_{d:02d}.png"
                    written[name] = png_bytes(hash((a, c, d)) % 10_000)
                    z.writestr(name, written[name])
    return written


def test_omniglot_full_zips_preferred(tmp_path):
    d = tmp_path / "omniglot"
    d.mkdir()
    bg = make_omniglot_zip(d / "images_background.zip", "images_background", {"A": 2, "B": 3})
    make_omniglot_zip(d / "images_evaluation.zip", "images_evaluation", {"C": 4})
    make_omniglot_zip(d / "images_background_small1.zip", "images_background_small1", {"Korean": 1})
    make_omniglot_zip(
        d / "images_background_small2.zip", "images_background_small2", {"Tagalog": 1}
    )
    train = get_dataset("omniglot", "train", root=tmp_path, transform=T.ToTensor())
    test = get_dataset("omniglot", "test", root=tmp_path, transform=T.ToTensor())
    assert train.variant == test.variant == "full"
    assert train.files == (d / "images_background.zip",)
    assert test.files == (d / "images_evaluation.zip",)
    assert train.source == "argument" and train.directory == d
    assert (len(train), train.num_classes, len(test), test.num_classes) == (15, 5, 12, 4)
    assert train.classes[:3] == ["A/character01", "A/character02", "B/character01"]
    assert_contiguous(train)
    # first image (sorted) read independently from the zip bytes
    ref = np.asarray(Image.open(io.BytesIO(bg[sorted(bg)[0]])).convert("L")) / 255.0
    x, y = train[0]
    assert y == 0 and x.shape == (1, 12, 12)
    np.testing.assert_allclose(x[0].numpy(), ref)
    small = get_dataset("omniglot", "train", root=tmp_path, variant="small", progress=False)
    assert (small.variant, small.classes, len(small)) == ("small", ["Korean/character01"], 3)


def test_omniglot_small_dedup_and_split(tmp_path):
    shared = {"Greek": 2, "Latin": 1}
    make_omniglot_zip(
        tmp_path / "images_background_small1.zip",
        "images_background_small1",
        {"Balinese": 2, "Korean": 1, **shared},
    )
    make_omniglot_zip(
        tmp_path / "images_background_small2.zip",
        "images_background_small2",
        {"Sanskrit": 1, "Tagalog": 2, **shared},
    )
    train = get_dataset("omniglot", "train", root=tmp_path, progress=False)
    test = get_dataset("omniglot", "test", root=tmp_path, progress=False)
    assert train.variant == "small"
    assert train.classes == [
        "Balinese/character01",
        "Balinese/character02",
        "Korean/character01",
        "Sanskrit/character01",
    ]
    # Greek (2) + Latin (1) counted once, Tagalog (2): 5 classes x 3 drawers
    assert (test.num_classes, len(test)) == (5, 15)
    assert np.bincount(test.labels).tolist() == [3] * 5
    assert test[0][0].shape == (1, 64, 64)


def test_decoded_omniglot_images_are_handed_to_another_process(tmp_path, monkeypatch):
    """What a --jobs worker gets from its parent (pickled, as spawn sends its arguments): the
    same images without decoding a PNG; changed zips and malformed entries are not taken."""
    make_omniglot_zip(tmp_path / "images_background_small1.zip", "images_background_small1",
                      {"Korean": 2})  # fmt: skip
    make_omniglot_zip(tmp_path / "images_background_small2.zip", "images_background_small2",
                      {"Tagalog": 1})  # fmt: skip
    monkeypatch.setattr(omni_mod, "_CACHE", {})
    parent = get_dataset("omniglot", "train", root=tmp_path, progress=False)
    handed = pickle.loads(pickle.dumps(omni_mod.decoded_images()))
    assert len(handed) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(omni_mod, "_CACHE", {})  # a fresh process
    monkeypatch.setattr(omni_mod, "read_omniglot_zips", no_decoding)
    malformed = {("x",): (np.zeros((2, 3, 3), np.float32), ["a", "b"]), ("y",): "z"}
    assert omni_mod.adopt_decoded_images({**handed, **malformed}) == 1
    worker = get_dataset("omniglot", "train", root=tmp_path, progress=False)
    np.testing.assert_array_equal(worker.images, parent.images)
    assert worker.classes == parent.classes
    # a zip rewritten since has another key: decoded again, not taken from the parent
    make_omniglot_zip(tmp_path / "images_background_small1.zip", "images_background_small1",
                      {"Korean": 3})  # fmt: skip
    with pytest.raises(AssertionError, match="decoded again"):
        get_dataset("omniglot", "train", root=tmp_path, progress=False)


def test_omniglot_download_from_file_url(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    src.mkdir()
    make_omniglot_zip(src / "images_background.zip", "images_background", {"A": 2})
    make_omniglot_zip(src / "images_evaluation.zip", "images_evaluation", {"B": 1})
    monkeypatch.setattr(omni_mod, "OMNIGLOT_URL", src.as_uri() + "/{}")
    monkeypatch.setattr(
        omni_mod,
        "OMNIGLOT_MD5",
        {z: md5(src / z) for z in ("images_background.zip", "images_evaluation.zip")},
    )
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError):
        get_dataset("omniglot", "test", root=root)
    test = get_dataset("omniglot", "test", root=root, download=True, progress=False)
    assert (root / "omniglot" / "images_evaluation.zip").is_file()
    assert (test.variant, len(test), test.num_classes) == ("full", 3, 1)


def test_omniglot_real_small_sets(shared_dir, tmp_path, monkeypatch):
    root = shared_dir / "data"
    if not (root / "omniglot" / "images_background_small1.zip").is_file():
        pytest.skip("Omniglot small zips are not in ../shared/data/omniglot")
    train = get_dataset("omniglot", "train", root=root, variant="small", progress=False)
    test = get_dataset("omniglot", "test", root=root, variant="small", progress=False)
    assert (train.num_classes, len(train)) == (128, 2560)
    assert (test.num_classes, len(test)) == (114, 2280)
    for ds in (train, test):
        assert_contiguous(ds)
        assert np.bincount(ds.labels).tolist() == [20] * ds.num_classes
        assert ds.load_image(0).size == (105, 105)
    alphabets = lambda ds: {c.split("/")[0] for c in ds.classes}  # noqa: E731
    assert alphabets(train) == {"Balinese", "Early_Aramaic", "Korean", "Sanskrit"}
    assert alphabets(test) == {"Greek", "Japanese_(katakana)", "Latin", "Tagalog"}
    x, y = train[0]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.mean() < 0.5  # inverted: mostly dark
    x, _ = get_dataset(
        "omniglot",
        "test",
        root=root,
        variant="small",
        transform=get_transforms("omniglot", True, image_size=84, channels=3),
    )[5]
    assert x.shape == (3, 84, 84)
    # the bundled copy holds the same images, in the same order
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path))
    bundled = get_dataset("omniglot", "test", progress=False)
    assert bundled.source == "bundled" and bundled.classes == test.classes
    np.testing.assert_array_equal(bundled.images, test.images)


# ------------------------------------------------------------- Omniglot: the bundled small set

BUNDLED_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
SMALL_ALPHABETS = {
    "train": {"Balinese", "Early_Aramaic", "Korean", "Sanskrit"},
    "test": {"Greek", "Japanese_(katakana)", "Latin", "Tagalog"},
}


def bundled_data_dir() -> Path:
    return Path(str(importlib.resources.files("pml_proxies.datasets").joinpath("data")))


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """$PML_PROXIES_DATA pointing at an empty folder: no Omniglot files anywhere but the
    package's own (the bundled set must need neither ../shared nor a download)."""
    monkeypatch.setenv("PML_PROXIES_DATA", str(tmp_path / "empty"))
    return tmp_path / "empty"


def test_bundled_omniglot_loads_without_root(no_local_data):
    train = get_dataset("omniglot", "train", progress=False)
    test = get_dataset("omniglot", "test", progress=False)
    data = bundled_data_dir()
    for ds, (n_classes, n_images) in ((train, (128, 2560)), (test, (114, 2280))):
        assert (ds.source, ds.variant) == ("bundled", "small")
        assert ds.files == tuple(data / z for z in BUNDLED_ZIPS)
        assert (ds.num_classes, len(ds)) == (n_classes, n_images)
        assert_contiguous(ds)
        assert np.bincount(ds.labels).tolist() == [20] * n_classes
        assert {c.split("/")[0] for c in ds.classes} == SMALL_ALPHABETS[ds.split]
        assert ds.load_image(0).size == (105, 105)
    assert not set(train.classes) & set(test.classes)
    assert not no_local_data.exists()  # nothing downloaded or created
    x, y = train[0]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and y == 0
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.mean() < 0.5  # inverted: mostly dark


def test_bundled_omniglot_also_from_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("PML_PROXIES_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/pml-proxies/data is empty
    ds = get_dataset("omniglot", "test", variant="small", progress=False)
    assert (ds.source, ds.num_classes, len(ds)) == ("bundled", 114, 2280)
    assert list(tmp_path.iterdir()) == []


def test_bundled_zips_are_the_authors_files():
    data = bundled_data_dir()
    for z in BUNDLED_ZIPS:
        assert md5(data / z) == omni_mod.OMNIGLOT_MD5[z]
    # Greek and Latin are in both zips, byte for byte (read once by the data set)
    members = []
    for z in BUNDLED_ZIPS:
        with zipfile.ZipFile(data / z) as f:
            members.append(
                {
                    tuple(i.filename.split("/")[1:]): i.CRC
                    for i in f.infolist()
                    if i.filename.split("/")[1:2] in (["Greek"], ["Latin"])
                    and i.filename.endswith(".png")
                }
            )
    assert members[0] == members[1] and len(members[0]) == (24 + 26) * 20
    licence = (data / "LICENSE-omniglot.txt").read_text()
    assert "MIT" in licence and "Brenden Lake" in licence
    assert "Lake" in (data / "README.md").read_text()


def test_bundled_zips_are_declared_package_data():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["pml_proxies"]
    for name in (*BUNDLED_ZIPS, "LICENSE-omniglot.txt", "README.md"):
        rel = f"datasets/data/{name}"
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel
        assert importlib.resources.files("pml_proxies").joinpath(rel).is_file(), rel
    assert "pml_proxies/datasets/data/LICENSE-omniglot.txt" in config["project"]["license-files"]
    assert omni_mod.bundled_omniglot_zips() == tuple(bundled_data_dir() / z for z in BUNDLED_ZIPS)


@pytest.mark.slow
def test_wheel_and_sdist_contain_the_bundled_zips(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / f, src)
    shutil.copytree(
        REPO / "pml_proxies", src / "pml_proxies", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "dist"
    out.mkdir()
    for build in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state
        code = f"import sys; from setuptools import build_meta as b; b.{build}(sys.argv[1])"
        subprocess.run(
            [sys.executable, "-c", code, str(out)], cwd=src, check=True, capture_output=True
        )
    wheel = zipfile.ZipFile(next(out.glob("*.whl"))).namelist()
    sdist = tarfile.open(next(out.glob("*.tar.gz"))).getnames()
    for name in (*BUNDLED_ZIPS, "LICENSE-omniglot.txt", "README.md"):
        assert f"pml_proxies/datasets/data/{name}" in wheel, name
        assert any(n.endswith(f"/pml_proxies/datasets/data/{name}") for n in sdist), name


# ------------------------------------------------------------- Omniglot: which files are used


def make_small_zips(directory: Path, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    make_omniglot_zip(
        directory / BUNDLED_ZIPS[0],
        "images_background_small1",
        {"Korean": 2, "Greek": 1},
        seed=seed,
    )
    make_omniglot_zip(
        directory / BUNDLED_ZIPS[1], "images_background_small2", {"Sanskrit": 1, "Greek": 1}
    )


def make_full_zips(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    make_omniglot_zip(directory / "images_background.zip", "images_background", {"A": 3})
    make_omniglot_zip(directory / "images_evaluation.zip", "images_evaluation", {"B": 2})


def test_omniglot_precedence_root_env_bundled(tmp_path, monkeypatch):
    env = tmp_path / "env"
    make_full_zips(env / "omniglot")
    monkeypatch.setenv("PML_PROXIES_DATA", str(env))
    # 1. files under $PML_PROXIES_DATA win over the bundled set
    ds = get_dataset("omniglot", "train", progress=False)
    assert (ds.source, ds.variant, ds.num_classes) == ("environment", "full", 3)
    assert ds.files == (env / "omniglot" / "images_background.zip",)
    small = get_dataset("omniglot", "train", variant="small", progress=False)
    assert small.source == "bundled"  # env has no small zips: the bundled ones
    # 2. an explicit root wins over $PML_PROXIES_DATA
    make_small_zips(tmp_path / "mine")
    ds = get_dataset("omniglot", "train", root=tmp_path / "mine", progress=False)
    assert (ds.source, ds.variant, ds.classes) == (
        "argument",
        "small",
        ["Korean/character01", "Korean/character02", "Sanskrit/character01"],
    )
    assert ds.files == tuple(tmp_path / "mine" / z for z in BUNDLED_ZIPS)
    # 3. an explicit root without files never falls back to the bundled set
    with pytest.raises(FileNotFoundError, match="Without root= / --root, the small set bundled"):
        get_dataset("omniglot", "train", root=tmp_path / "nothing")
    # 4. small zips under $PML_PROXIES_DATA are used too (auto: full first, then small)
    shutil.rmtree(env / "omniglot")
    make_small_zips(env / "Omniglot")
    ds = get_dataset("omniglot", "test", progress=False)
    assert (ds.source, ds.variant, ds.classes) == ("environment", "small", ["Greek/character01"])


def test_omniglot_full_variant_has_no_bundled_fallback(no_local_data):
    with pytest.raises(FileNotFoundError) as e:
        get_dataset("omniglot", "train", variant="full")
    msg = str(e.value)
    assert "images_background.zip + images_evaluation.zip" in msg
    assert "--dataset-arg variant=small" in msg and "--download" in msg
    assert str(no_local_data) in msg and "$PML_PROXIES_DATA" in msg


@pytest.mark.parametrize("damage", ["not_a_zip", "truncated", "bad_crc", "bad_png"])
def test_corrupted_omniglot_zip_is_reported(tmp_path, damage):
    make_small_zips(tmp_path, seed=7)
    bad = tmp_path / BUNDLED_ZIPS[1]
    raw = bytearray(bad.read_bytes())
    if damage == "not_a_zip":
        raw = bytearray(b"<html>404 Not Found</html>")
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        with zipfile.ZipFile(bad) as z:
            name = next(n for n in z.namelist() if n.endswith(".png"))
            member = z.read(name)
        if damage == "bad_crc":  # flip a byte of the stored PNG: the zip's CRC check fails
            at = bytes(raw).find(member) + len(member) // 2
            raw[at] ^= 0xFF
        else:  # a member that is no PNG at all, with a correct CRC
            with zipfile.ZipFile(bad, "a") as z:
                z.writestr("images_background_small2/Sanskrit/character01/x.png", b"not a png")
            raw = bytearray(bad.read_bytes())
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptArchiveError) as e:  # Sanskrit (train) is read from the bad zip
        get_dataset("omniglot", "train", root=tmp_path, progress=False)
    assert e.value.path == bad and str(bad) in str(e.value)
    assert "delete it and download it again" in str(e.value) and "--download" in str(e.value)


# ----------------------------------------------------------------------------- CUB-200-2011


def make_cub(directory: Path):
    """Classes 1, 2 (train) and 101, 150 (test); 2 images each, one greyscale JPEG."""
    classes = {1: "001.A_bird", 2: "002.B_bird", 101: "101.C_bird", 150: "150.D_bird"}
    lines, labels = [], []
    i = 0
    for c, name in classes.items():
        for k in range(2):
            i += 1
            rel = f"{name}/{name}_{k}.jpg"
            mode = "L" if (c, k) == (2, 1) else "RGB"
            write_image(directory / "images" / rel, mode=mode, seed=i)
            lines.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    (directory / "images.txt").write_text("\n".join(lines) + "\n")
    (directory / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (directory / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in classes.items()))


def test_cub_parsing(tmp_path):
    make_cub(tmp_path / "cub2011" / "CUB_200_2011")
    train = get_dataset("cub200", "train", root=tmp_path)
    test = get_dataset(
        "cub200", "test", root=tmp_path, transform=get_transforms("cub200", True, 32)
    )
    assert train.classes == ["001.A_bird", "002.B_bird"]
    assert test.classes == ["101.C_bird", "150.D_bird"]
    assert train.labels.tolist() == [0, 0, 1, 1] and test.labels.tolist() == [0, 0, 1, 1]
    assert test.class_ids.tolist() == [101, 150]
    assert Path(train.paths[3]).name == "002.B_bird_1.jpg"
    x, y = train[3]  # the greyscale JPEG comes out with 3 channels
    assert x.shape == (3, 224, 224) and y == 1
    assert test[0][0].shape == (3, 32, 32)


def test_cub_other_layout_and_download(tmp_path, monkeypatch):
    make_cub(tmp_path / "alt" / "CUB_200_2011")
    assert len(get_dataset("cub200", "train", root=tmp_path / "alt")) == 4
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "alt" / "CUB_200_2011", arcname="CUB_200_2011")
    monkeypatch.setattr(
        cub_mod, "CUB_URLS", [(tmp_path / "missing.tgz").as_uri(), archive.as_uri()]
    )
    monkeypatch.setattr(cub_mod, "CUB_MD5", md5(archive))
    root = tmp_path / "root"
    ds = get_dataset("cub200", "test", root=root, download=True)
    assert (root / "cub2011" / "CUB_200_2011" / "images.txt").is_file()
    assert len(ds) == 4 and ds.num_classes == 2


# ----------------------------------------------------------------------------- Cars-196


def _struct_array(records: list[dict]) -> np.ndarray:
    fields = list(records[0])
    arr = np.empty(len(records), dtype=[(f, object) for f in fields])
    for i, r in enumerate(records):
        for f in fields:
            arr[i][f] = r[f]
    return arr


CAR_NAMES = np.array([f"Car model {i}" for i in range(1, 197)], dtype=object)


def make_cars(directory: Path, classes=(1, 98, 99, 196, 1)):
    from scipy.io import savemat

    records = []
    for i, c in enumerate(classes, start=1):
        rel = f"car_ims/{i:06d}.jpg"
        write_image(directory / rel, seed=i)
        records.append({"relative_im_path": rel, "class": c, "test": i % 2})
    savemat(
        directory / "cars_annos.mat",
        {"annotations": _struct_array(records), "class_names": CAR_NAMES},
    )


def test_cars_annos_parsing(tmp_path):
    make_cars(tmp_path / "cars196")
    train = get_dataset("cars196", "train", root=tmp_path)
    test = get_dataset("cars196", "test", root=tmp_path)
    assert train.layout == "annos"
    assert train.classes == ["Car model 1", "Car model 98"]
    assert [Path(p).name for p in train.paths] == ["000001.jpg", "000002.jpg", "000005.jpg"]
    assert train.labels.tolist() == [0, 1, 0]
    assert test.class_ids.tolist() == [99, 196] and test.labels.tolist() == [0, 1]
    assert test[1][0].shape == (3, 224, 224)


def test_cars_devkit_parsing(tmp_path):
    from scipy.io import savemat

    d = tmp_path / "cars196"
    (d / "devkit").mkdir(parents=True)
    savemat(d / "devkit" / "cars_meta.mat", {"class_names": CAR_NAMES})
    for folder, annos, classes in (
        ("cars_train", d / "devkit" / "cars_train_annos.mat", (1, 120)),
        ("cars_test", d / "cars_test_annos_withlabels.mat", (98, 99, 3)),
    ):
        recs = []
        for i, c in enumerate(classes, start=1):
            write_image(d / folder / f"{i:05d}.jpg", seed=c)
            recs.append({"fname": f"{i:05d}.jpg", "class": c})
        savemat(annos, {"annotations": _struct_array(recs)})
    train = get_dataset("cars196", "train", root=tmp_path)
    test = get_dataset("cars196", "test", root=tmp_path)
    assert train.layout == "devkit"
    assert train.class_ids.tolist() == [1, 3, 98] and train.labels.tolist() == [0, 2, 1]
    assert [Path(p).parent.name for p in train.paths] == ["cars_train", "cars_test", "cars_test"]
    assert test.classes == ["Car model 99", "Car model 120"] and len(test) == 2


def test_cars_download(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    make_cars(src)
    archive = tmp_path / "car_ims.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src / "car_ims", arcname="car_ims")
    monkeypatch.setattr(cars_mod, "CARS_ANNOS_URLS", [(src / "cars_annos.mat").as_uri()])
    monkeypatch.setattr(cars_mod, "CARS_IMAGES_URLS", [archive.as_uri()])
    ds = get_dataset("cars196", "train", root=tmp_path / "root", download=True)
    assert (tmp_path / "root" / "cars196" / "car_ims" / "000001.jpg").is_file()
    assert len(ds) == 3


# ----------------------------------------------------------------------------- SOP


def make_sop(directory: Path):
    header = "image_id class_id super_class_id path\n"
    train = [
        (1, 1, 1, "bicycle_final/1_0.JPG"),
        (2, 1, 1, "bicycle_final/1_1.JPG"),
        (3, 2, 2, "cabinet_final/2_0.JPG"),
    ]
    test = [
        (4, 11319, 1, "bicycle_final/9_0.JPG"),
        (5, 11320, 12, "toaster_final/8_0.JPG"),
        (6, 11320, 12, "toaster_final/8_1.JPG"),
    ]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        text = header + "".join(f"{a} {b} {c} {p}\n" for a, b, c, p in rows)
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
        for i, *_, p in rows:
            write_image(directory / p, seed=i, fmt="JPEG")


def test_sop_parsing_and_download(tmp_path, monkeypatch):
    make_sop(tmp_path / "src" / "Stanford_Online_Products")
    train = get_dataset("sop", "train", root=tmp_path / "src")
    test = get_dataset("sop", "test", root=tmp_path / "src")
    assert train.classes == ["bicycle/1", "cabinet/2"] and train.labels.tolist() == [0, 0, 1]
    assert test.classes == ["bicycle/11319", "toaster/11320"]
    assert test.labels.tolist() == [0, 1, 1] and test.super_labels.tolist() == [0, 11, 11]
    assert test.super_classes[11] == "toaster"
    assert test[2][0].shape == (3, 224, 224)
    archive = tmp_path / "Stanford_Online_Products.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((tmp_path / "src").rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(tmp_path / "src"))
    monkeypatch.setattr(sop_mod, "SOP_URLS", [archive.as_uri()])
    monkeypatch.setattr(sop_mod, "SOP_MD5", md5(archive))
    ds = get_dataset("sop", "test", root=tmp_path / "root", download=True)
    assert (tmp_path / "root" / "Stanford_Online_Products" / "Ebay_test.txt").is_file()
    assert ds.classes == test.classes


# ----------------------------------------------------------------------------- In-Shop


def make_inshop(base: Path, flat: bool = False):
    """Google Drive layout (Eval/list_eval_partition.txt, Img/img/...) or flat (both in base)."""
    rows = [
        ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
        ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "train"),
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Tees/id_00000007/01_1_front.jpg", "id_00000007", "query"),
        ("img/WOMEN/Tees/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
        ("img/MEN/Shirts/id_00000005/01_1_front.jpg", "id_00000005", "gallery"),
        ("img/MEN/Shirts/id_00000005/01_3_back.jpg", "id_00000005", "query"),
    ]
    eval_dir, img_dir = (base, base) if flat else (base / "Eval", base / "Img")
    eval_dir.mkdir(parents=True)
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n"
    text += "".join(f"{p}           {i} {s}\n" for p, i, s in rows)
    (eval_dir / "list_eval_partition.txt").write_text(text)
    for k, (p, _, _) in enumerate(rows):
        write_image(img_dir / p, seed=k)


@pytest.mark.parametrize("flat", [False, True], ids=["drive_layout", "flat_layout"])
def test_inshop_parsing(tmp_path, flat):
    make_inshop(tmp_path / "inshop", flat=flat)
    train = get_dataset("inshop", "train", root=tmp_path)
    test = get_dataset("inshop", "test", root=tmp_path)
    query = get_dataset("inshop", "query", root=tmp_path)
    gallery = get_dataset("inshop", "gallery", root=tmp_path)
    assert train.classes == ["id_00000002", "id_00000080"] and train.labels.tolist() == [1, 1, 0]
    assert test.classes == ["id_00000005", "id_00000007"] and len(test) == 4
    assert test.labels.tolist() == [1, 1, 0, 0]
    assert test.is_query.tolist() == [True, False, False, True]
    assert query.classes == gallery.classes == test.classes
    assert query.labels.tolist() == [1, 0] and gallery.labels.tolist() == [1, 0]
    assert Path(gallery.paths[1]).name == "01_1_front.jpg"
    assert train[0][0].shape == (3, 224, 224)
