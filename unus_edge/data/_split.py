"""Writing one partition file per device plus a ``manifest.json``: :func:`split_to_directory`.

Layout of a split folder::

    out_dir/
        device_000.npz ... device_<N-1>.npz   partition files (see _files.py), zero-padded to
                                              at least 3 digits (more for >= 1000 devices)
        manifest.json                         written last: its presence means "complete"

Decisions
---------
* Arguments are checked and the partition computed *before* the folder is touched.
* A folder is recognised as a previous split when every entry in it is a name a split writes
  (``device_<digits>.npz``, ``manifest.json``, or our hidden ``.<name>.*.tmp`` temporaries) and
  its manifest, if any, is ours. Such a folder is replaced without asking; any other non-empty
  folder is refused (``DataError`` ``not_a_split``) unless ``overwrite=True``. Even then only
  files named like ours are ever deleted: foreign files are left in place.
* Order of work: the old manifest is removed first (an interrupted run leaves a folder without
  manifest, still recognised as a split and simply redone next time), every device file is
  written atomically, device files of an older, larger split are deleted, and the manifest is
  written last, atomically.
* Progress goes to ``progress(num_written, num_parts, path)`` after each file and to logging,
  so a CLI can draw a bar and a service can log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from unus_edge.data._dataset import Dataset, PathLike, as_path, data_error
from unus_edge.data._files import PARTITION_FORMAT_VERSION, atomic_write, save_partition
from unus_edge.data._partition import Scheme, default_min_examples, partition

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "ProgressCallback", "device_file_name", "source_manifest",
           "split_to_directory"]

logger = logging.getLogger(__name__)

#: ``progress(num_written, num_parts, path_just_written)``
ProgressCallback = Callable[[int, int, Path], None]

MANIFEST_NAME = "manifest.json"
#: The ``format`` value of a manifest written by unus-edge.
MANIFEST_FORMAT = "unus-edge-split"
MANIFEST_VERSION = 1

_DEVICE_FILE = re.compile(r"device_\d{3,}\.npz")
_TEMPORARY_FILE = re.compile(r"\.(device_\d{3,}\.npz|manifest\.json)\..+\.tmp")
_HASH_CHUNK = 1 << 20


def device_file_name(index: int, num_parts: int) -> str:
    """``device_007.npz``: zero-padded to 3 digits, or to the digits of ``num_parts - 1``."""
    width = max(3, len(str(num_parts - 1)))
    return f"device_{index:0{width}d}.npz"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_our_manifest(path: Path) -> bool:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("format") == MANIFEST_FORMAT


def _is_previous_split(entries: list[Path]) -> bool:
    for entry in entries:
        name = entry.name
        if name == MANIFEST_NAME:
            if not (entry.is_file() and _is_our_manifest(entry)):
                return False
        elif not (entry.is_file() and (_DEVICE_FILE.fullmatch(name) or _TEMPORARY_FILE.fullmatch(name))):
            return False
    return True


def _prepare_directory(directory: Path, overwrite: bool) -> list[Path]:
    """Create or vet ``directory``; return the split files already in it."""
    if directory.exists() and not directory.is_dir():
        raise data_error("not_a_directory", "the output path exists and is not a folder", path=directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise data_error("write_failed", error.strerror or str(error), path=directory) from error
    if entries and not overwrite and not _is_previous_split(entries):
        shown = ", ".join(entry.name for entry in entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise data_error(
            "not_a_split",
            f"the folder is not empty and is not a previous split (holds {shown}); "
            "choose an empty folder or pass overwrite=True",
            path=directory,
        )
    return [
        entry
        for entry in entries
        if entry.is_file()
        and (entry.name == MANIFEST_NAME or _DEVICE_FILE.fullmatch(entry.name) or _TEMPORARY_FILE.fullmatch(entry.name))
    ]


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise data_error("write_failed", f"cannot remove a stale file: {error.strerror}", path=path) from error


def split_to_directory(
    dataset: Dataset,
    out_dir: PathLike,
    *,
    num_parts: int,
    scheme: Scheme,
    seed: int,
    alpha: float = 0.5,
    shards_per_part: int = 2,
    min_examples: int | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    compress: bool = True,
) -> list[Path]:
    """Partition ``dataset`` and write ``device_000.npz`` ... and ``manifest.json`` to ``out_dir``.

    Returns the device file paths in device order. ``out_dir`` is created if needed; a
    non-empty folder that is not a previous split is refused (:class:`DataError`
    ``not_a_split``) unless ``overwrite=True``. See :func:`~unus_edge.data.partition` for the
    scheme arguments.
    """
    directory = as_path(out_dir)
    parts = partition(
        dataset.y,
        num_parts,
        scheme,
        seed=seed,
        alpha=alpha,
        shards_per_part=shards_per_part,
        min_examples=min_examples,
    )
    stale = _prepare_directory(directory, overwrite)
    _remove(directory / MANIFEST_NAME)

    written: list[Path] = []
    devices: list[dict[str, Any]] = []
    for index, indices in enumerate(parts):
        name = device_file_name(index, num_parts)
        path = directory / name
        part = dataset.subset(indices)
        save_partition(path, part, compress=compress)
        written.append(path)
        devices.append(
            {
                "device_id": name.removesuffix(".npz"),
                "file": name,
                "num_examples": len(part),
                "label_histogram": [int(count) for count in part.label_histogram()],
                "sha256": _sha256(path),
            }
        )
        logger.info("wrote %s (%d of %d): %d examples", path, index + 1, num_parts, len(part))
        if progress is not None:
            progress(index + 1, num_parts, path)

    keep = {path.name for path in written}
    for path in stale:
        if path.name not in keep and path.name != MANIFEST_NAME:
            _remove(path)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "partition_format_version": PARTITION_FORMAT_VERSION,
        "scheme": scheme,
        "seed": int(seed),
        "num_parts": int(num_parts),
        "num_examples": len(dataset),
        "num_classes": dataset.num_classes,
        "feature_shape": list(dataset.feature_shape),
        "label_histogram": [int(count) for count in dataset.label_histogram()],
        "devices": devices,
    }
    if scheme == "dirichlet":
        manifest["alpha"] = float(alpha)
        manifest["min_examples"] = (
            default_min_examples(len(dataset), num_parts) if min_examples is None else int(min_examples)
        )
    if scheme == "shards":
        manifest["shards_per_part"] = int(shards_per_part)

    def write(handle: IO[bytes]) -> None:
        handle.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    atomic_write(directory / MANIFEST_NAME, write)
    logger.info("split %d examples into %d parts (%s, seed %d) in %s", len(dataset), num_parts, scheme, seed, directory)
    return written


def _tree_sha256(path: Path) -> str:
    """A file's SHA-256, or a folder's: of the sorted lines ``<relative path> <file's SHA-256>``."""
    if path.is_file():
        return _sha256(path)
    lines = [f"{entry.relative_to(path).as_posix()} {_sha256(entry)}\n"
             for entry in sorted(path.rglob("*")) if entry.is_file()]
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def source_manifest(directory: Path, parts: list[tuple[Path, Dataset]], *, data_format: str, scheme: str,
                    seed: int, alpha: float, whole: Dataset) -> Path:
    """``manifest.json`` of a split written as device sources (``data split --format csv|idx|images``):
    as the npz split's, with ``source_format``, and per device its ``file`` (a file or a folder)
    and ``sha256`` (a folder's: of its files' relative paths and hashes, :func:`_tree_sha256`)."""
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "source_format": data_format,
        "scheme": scheme, "seed": int(seed), "num_parts": len(parts), "num_examples": len(whole),
        "num_classes": whole.num_classes, "feature_shape": list(whole.feature_shape),
        "devices": [{"device_id": path.name.removesuffix(".csv"), "file": path.name, "num_examples": len(part),
                     "sha256": _tree_sha256(path)} for path, part in parts],
    }
    if whole.num_classes:
        manifest["label_histogram"] = [int(count) for count in whole.label_histogram()]
        for entry, (_, part) in zip(manifest["devices"], parts, strict=True):
            entry["label_histogram"] = [int(count) for count in part.label_histogram()]
    if scheme == "dirichlet":
        manifest["alpha"] = float(alpha)

    def write(handle: IO[bytes]) -> None:
        handle.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    atomic_write(directory / MANIFEST_NAME, write)
    return directory / MANIFEST_NAME
