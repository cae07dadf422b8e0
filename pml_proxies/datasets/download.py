"""Downloading (with a tqdm progress bar and optional MD5 check) and archive extraction."""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["download_first", "download_url", "extract_archive", "md5sum"]

_CHUNK = 1 << 20


def md5sum(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download_url(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to the file ``dest`` (skipped when it exists and matches ``md5``).

    Writes to ``dest.part`` first and renames on success, so an interrupted download never
    leaves a truncated file under the final name. Raises RuntimeError with the URL on network
    errors and on an MD5 mismatch.
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "pml-proxies"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as f:
            total = response.headers.get("Content-Length") if response.headers else None
            with tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
            ) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    f.write(block)
                    bar.update(len(block))
    except OSError as e:  # URLError, HTTPError, timeouts are OSErrors
        part.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url}: {e}") from e
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise RuntimeError(f"MD5 mismatch for {url}: expected {md5}, got {got}")
    os.replace(part, dest)
    return dest


def download_first(
    urls: list[str], dest: str | os.PathLike, md5: str | None = None, progress: bool = True
) -> Path:
    """Try the mirrors ``urls`` in order; RuntimeError listing every failure if none works."""
    errors = []
    for url in urls:
        try:
            return download_url(url, dest, md5=md5, progress=progress)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError("all mirrors failed:\n  " + "\n  ".join(errors))


def _inside(base: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def extract_archive(
    archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True
) -> Path:
    """Extract a .zip, .tar, .tar.gz/.tgz, .tar.bz2 or .tar.xz archive into ``dest``.

    Members that would land outside ``dest`` (absolute paths, ``..``, links) are refused.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            for m in members:
                if not _inside(dest, dest / m.filename):
                    raise RuntimeError(f"unsafe path {m.filename!r} in {archive}")
            for m in tqdm(members, desc=f"extract {archive.name}", disable=not progress):
                z.extract(m, dest)
        return dest
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                bad_link = (m.issym() or m.islnk()) and not _inside(
                    dest, (dest / m.name).parent / m.linkname
                )
                if not _inside(dest, dest / m.name) or bad_link or m.isdev():
                    raise RuntimeError(f"unsafe member {m.name!r} in {archive}")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for m in tqdm(members, desc=f"extract {archive.name}", disable=not progress):
                t.extract(m, dest, **kwargs)
        return dest
    raise ValueError(f"{archive} is neither a zip nor a tar archive")


def download_and_extract(
    urls: str | list[str],
    archive: str | os.PathLike,
    extract_dir: str | os.PathLike,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``urls`` (one URL or mirrors tried in order) to the file ``archive`` (kept, so
    a second call does not download again) and extract it into ``extract_dir``."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    path = download_first(urls, archive, md5=md5, progress=progress)
    return extract_archive(path, extract_dir, progress=progress)
