"""``unus-edge data fetch``: download a dataset's canonical files, checked, into a cache folder.

The files are the gzipped IDX files of the dataset's distribution. Each is checked against the
SHA-256 of its *uncompressed* content, so a mirror that recompressed the files (Debian's
``dataset-fashion-mnist`` does) still passes, and a corrupt or wrong file never does. A file is
downloaded next to its destination under a temporary name, checked, then renamed into place:
an interrupted download leaves nothing that looks complete, and a file already present and
correct is not downloaded again.

Where the files go: ``directory`` if given, else :func:`cache_dir` (``$XDG_CACHE_HOME`` or
``~/.cache``, then ``unus-edge/<dataset>``). :func:`unus_edge.data.resolve_data_dir` looks
there for MNIST when neither a flag nor ``$UNUS_DATA_DIR`` names a folder.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unus_edge.data._dataset import data_error
from unus_edge.errors import DataError

__all__ = ["SOURCES", "FetchProgress", "Source", "cache_dir", "fetch_dataset", "verify_file"]

FetchProgress = Callable[[str, int, int], None]
"""``(file name, bytes so far, total bytes or 0 if unknown)``, called as a download goes."""

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Source:
    """A dataset's files: name -> SHA-256 of the uncompressed content, and where to get them."""

    name: str
    files: dict[str, str]
    urls: tuple[str, ...]
    """Base URLs, tried in order (a file is ``base + name``)."""


SOURCES: dict[str, Source] = {
    "mnist": Source("mnist", {
        # The canonical files' SHA-256 (uncompressed), as every MNIST distribution lists them.
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }, ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")),
    "fashion-mnist": Source("fashion-mnist", {
        # Computed from the upstream repository's data/fashion (Debian's dataset-fashion-mnist
        # 0.0~git20200523), uncompressed.
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }, ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)),
}


def cache_dir(dataset: str) -> Path:
    """Where ``fetch`` puts ``dataset`` by default: ``$XDG_CACHE_HOME/unus-edge/<dataset>``."""
    base = os.environ.get("XDG_CACHE_HOME", "") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unus-edge" / dataset


def verify_file(path: Path, sha256: str, *, gzipped: bool | None = None) -> bool:
    """Whether ``path`` holds content with this SHA-256, uncompressed first if it is gzipped
    (by default: if its name ends in ``.gz``)."""
    digest = hashlib.sha256()
    if gzipped is None:
        gzipped = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):  # missing, truncated, or not gzip at all
        return False
    return digest.hexdigest() == sha256


def fetch_dataset(dataset: str, directory: Path | None = None, *, base_url: str = "", timeout: float = 60.0,
                  progress: FetchProgress | None = None) -> Path:
    """Download ``dataset``'s files into ``directory`` (default :func:`cache_dir`); return it.

    ``base_url`` replaces the dataset's mirrors (a local mirror, or a test server). Raises
    :class:`~unus_edge.errors.DataError`: ``unknown_dataset``, ``unwritable``, ``unreachable`` (no
    mirror answered: the message says where to put the files by hand) or ``checksum_mismatch``
    (a mirror answered with other content; the next mirror is tried first).
    """
    source = SOURCES.get(dataset)
    if source is None:
        raise data_error("unknown_dataset", f"{dataset!r}: fetch knows {', '.join(sorted(SOURCES))}")
    target = directory if directory is not None else cache_dir(dataset)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise data_error("unwritable", f"cannot create the folder ({error.strerror})", path=target) from error
    bases = (base_url if base_url.endswith("/") else base_url + "/",) if base_url else source.urls
    for name, sha256 in source.files.items():
        destination = target / name
        if verify_file(destination, sha256):
            continue
        _download(name, sha256, bases, destination, timeout, progress)
    return target


def _download(name: str, sha256: str, bases: tuple[str, ...], destination: Path, timeout: float,
              progress: FetchProgress | None) -> None:
    partial = destination.with_name(destination.name + ".part")
    failures = []
    mismatched = False
    for base in bases:
        url = base + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(name, done, total)
                if total and done != total:
                    raise http.client.IncompleteRead(b"", total - done)  # the connection ended early
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:  # truncated too
            reason = getattr(error, "reason", None) or error
            if isinstance(error, http.client.IncompleteRead):
                reason = f"the connection ended {error.expected} bytes early"
            failures.append(f"{url}: {reason}")
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            continue
        if not verify_file(partial, sha256, gzipped=name.endswith(".gz")):
            partial.unlink()
            failures.append(f"{url}: not the expected file (the SHA-256 of its content should be {sha256})")
            mismatched = True
            continue
        os.replace(partial, destination)
        return
    reason = "checksum_mismatch" if mismatched else "unreachable"
    raise DataError(reason, f"could not download {name}: {'; '.join(failures)}. Nothing was kept. Without a network, "
                            f"copy the dataset's files into {destination.parent} by hand (or pass --url a mirror)",
                    path=str(destination))
