"""Downloading (with a tqdm progress bar and optional MD5 check) and archive extraction.

Nothing half-done stays on disk: a download is written to ``<dest>.part`` and renamed only when
it is complete (and its MD5 matches); an archive is extracted into a temporary folder and moved
into place only when every member was read; folders created for a download that fails are removed
again when they are empty. Files that cannot be used (bad or truncated archive, wrong checksum)
raise :class:`CorruptArchiveError` naming the file and how to get a good copy.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "CorruptArchiveError",
    "DownloadError",
    "download_first",
    "download_url",
    "extract_archive",
    "md5sum",
]

_CHUNK = 1 << 20
#: what "get a good copy" means, appended to every CorruptArchiveError
REDOWNLOAD_HINT = "delete it and download it again (download=True in Python, --download on the CLI)"
#: errors of the archive readers that mean "this file is damaged"
ARCHIVE_READ_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)


class DownloadError(RuntimeError):
    """A download failed (network error, incomplete transfer, MD5 mismatch); nothing was kept."""


class CorruptArchiveError(ValueError):
    """A file on disk cannot be used (not an archive, truncated, damaged, wrong checksum)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}; {REDOWNLOAD_HINT}")


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """The ``hashlib`` digest (hex) of a file's bytes, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def md5sum(path: str | os.PathLike) -> str:
    return file_digest(path, "md5")


@contextlib.contextmanager
def new_dirs(directory: str | os.PathLike) -> Iterator[Path]:
    """Create ``directory`` and its missing parents; if the block raises (KeyboardInterrupt
    included), remove again the folders created here that are still empty, deepest first."""
    directory = Path(directory)
    created = []
    d = directory
    while not d.exists():
        created.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield directory
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (or already gone): keep it and its parents
                break
        raise


def check_existing(dest: Path, md5: str | None) -> bool:
    """True when ``dest`` is a file that matches ``md5`` (any file when ``md5`` is None), False
    when it does not exist; CorruptArchiveError when it exists with another checksum."""
    if not dest.is_file():
        return False
    if md5 is not None:
        got = md5sum(dest)
        if got != md5:
            raise CorruptArchiveError(dest, f"wrong MD5 {got} (expected {md5})")
    return True


def download_url(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to the file ``dest``; skipped when ``dest`` exists and matches ``md5``.

    Writes to ``dest.part`` first and renames on success, so an interrupted or failed download
    never leaves a file under the final name, nor the ``.part`` file, nor the folders it created.
    Raises :class:`DownloadError` with the URL on a malformed URL, network errors, a malformed
    response, a transfer shorter than the announced ``Content-Length`` and an MD5 mismatch;
    :class:`CorruptArchiveError` when ``dest`` already exists with another MD5 (it is not
    overwritten).
    """
    dest = Path(dest)
    if check_existing(dest, md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    with new_dirs(dest.parent):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "pml-proxies"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = response.headers.get("Content-Length") if response.headers else None
                total = int(total) if total else None
                received = 0
                with (
                    open(part, "wb") as f,
                    tqdm(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=dest.name,
                        disable=not progress,
                    ) as bar,
                ):
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        f.write(block)
                        received += len(block)
                        bar.update(len(block))
            if total is not None and received != total:
                raise DownloadError(
                    f"incomplete download of {url}: {received} of {total} bytes received"
                )
            if md5 is not None:
                got = md5sum(part)
                if got != md5:
                    raise DownloadError(f"MD5 mismatch for {url}: expected {md5}, got {got}")
            os.replace(part, dest)
        except OSError as e:  # URLError, HTTPError, timeouts, connection resets are OSErrors
            part.unlink(missing_ok=True)
            raise DownloadError(f"could not download {url}: {e}") from e
        except (ValueError, http.client.HTTPException) as e:
            # a malformed URL ("unknown url type", "Invalid IPv6 URL", http.client.InvalidURL
            # for control characters) or a malformed response (a bad status line or length)
            part.unlink(missing_ok=True)
            raise DownloadError(f"could not download {url!r}: {type(e).__name__}: {e}") from e
        except BaseException:  # DownloadError above, KeyboardInterrupt: no partial file
            part.unlink(missing_ok=True)
            raise
    return dest


def download_first(
    urls: Sequence[str], dest: str | os.PathLike, md5: str | None = None, progress: bool = True
) -> Path:
    """Try the mirrors ``urls`` in order, going on after any failure of one (a malformed URL
    included); DownloadError listing every failure if none works."""
    dest = Path(dest)
    if check_existing(dest, md5):
        return dest
    errors = []
    for url in urls:
        try:
            return download_url(url, dest, md5=md5, progress=progress)
        except DownloadError as e:
            errors.append(str(e))
    raise DownloadError("all mirrors failed:\n  " + "\n  ".join(errors))


def _inside(base: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return True


def _merge_into(src: Path, dst: Path) -> None:
    """Move the tree ``src`` onto ``dst``: new entries are renamed into place, existing folders
    are merged, existing files replaced."""
    if dst.is_dir() and src.is_dir() and not dst.is_symlink():
        for child in src.iterdir():
            _merge_into(child, dst / child.name)
        src.rmdir()
    else:
        os.replace(src, dst)


def _extract_zip(archive: Path, staging: Path, progress: bool) -> None:
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        for info in members:
            if not _inside(staging, staging / info.filename):
                raise RuntimeError(f"unsafe path {info.filename!r} in {archive}")
        for info in tqdm(members, desc=f"extract {archive.name}", disable=not progress):
            z.extract(info, staging)  # reads every byte: CRC errors raise BadZipFile


def _extract_tar(archive: Path, staging: Path, progress: bool) -> None:
    with tarfile.open(archive) as t:
        members = t.getmembers()
        for m in members:
            bad_link = (m.issym() or m.islnk()) and not _inside(
                staging, (staging / m.name).parent / m.linkname
            )
            if not _inside(staging, staging / m.name) or bad_link or m.isdev():
                raise RuntimeError(f"unsafe member {m.name!r} in {archive}")
        for m in tqdm(members, desc=f"extract {archive.name}", disable=not progress):
            if hasattr(tarfile, "data_filter"):
                t.extract(m, staging, filter="data")
            else:  # Python < 3.10.12: the members were checked above
                t.extract(m, staging)


def extract_archive(
    archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True
) -> Path:
    """Extract a .zip, .tar, .tar.gz/.tgz, .tar.bz2 or .tar.xz archive into ``dest``.

    Members that would land outside ``dest`` (absolute paths, ``..``, links) are refused. The
    archive is extracted into a temporary folder inside ``dest`` and merged into ``dest`` only
    when complete, so a damaged archive changes nothing: it raises
    :class:`CorruptArchiveError` naming the archive (a file that is no archive at all included).
    """
    archive, dest = Path(archive), Path(dest)
    if zipfile.is_zipfile(archive):
        extract = _extract_zip
    elif tarfile.is_tarfile(archive):
        extract = _extract_tar
    else:
        raise CorruptArchiveError(
            archive, "neither a zip nor a tar archive (damaged or truncated?)"
        )
    with new_dirs(dest):
        staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=dest))
        try:
            try:
                extract(archive, staging, progress)
            except ARCHIVE_READ_ERRORS as e:
                raise CorruptArchiveError(archive, f"damaged or truncated archive ({e})") from e
            for child in list(staging.iterdir()):
                _merge_into(child, dest / child.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest
