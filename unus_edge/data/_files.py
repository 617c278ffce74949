"""The on-device partition file (``.npz``): atomic writing and strict, pickle-free reading.

Format (version 1), a NumPy ``.npz`` archive (zip of ``.npy`` members), deflate-compressed by
default:

==================  =========================================  ==============================
key                 dtype / shape                              meaning
==================  =========================================  ==============================
``x``               uint8 or float32, ``(n, *feature_shape)``  examples; uint8 is ``k / 255``
``y``               int64, ``(n,)``                            labels in ``[0, num_classes)``
                    or float32, ``(n, *target_shape)``          regression targets (finite)
``num_classes``     int64, ``()``                              classes of the task (0: regression)
``format_version``  int64, ``()``                              ``1``
==================  =========================================  ==============================

Decisions
---------
* ``x`` is stored as uint8 exactly when that is lossless (every value is ``float32(k) / 255``,
  see :func:`~unus_edge.data._dataset.encode_pixels`): 4x smaller files for image data, and the
  loaded float32 array is bit-identical to the one saved. Anything else is stored as float32.
* Writes are atomic: a temporary file in the destination folder, ``fsync``, ``os.replace``,
  then a best-effort ``fsync`` of the folder. A reader (or a device rebooting mid-copy) sees the
  old file or the new one, never half of one.
* Reading is strict and never unpickles: ``np.load(..., allow_pickle=False)`` always, and every
  member's ``.npy`` header is inspected *before* its data is loaded, so object arrays, wrong
  dtypes, wrong shapes and sizes that disagree with the archive are refused without allocating
  what the header claims. Failures are :class:`DataError` naming the file, with reasons
  ``not_found``, ``unreadable``, ``not_npz``, ``missing_key``, ``object_array``, ``bad_dtype``,
  ``bad_shape``, ``length_mismatch``, ``bad_labels``, ``bad_values``, ``bad_num_classes``,
  ``unsupported_version``, ``size_mismatch``.
* Keys other than the four above are ignored, so later versions can add optional members.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from unus_edge.data._dataset import REGRESSION, Dataset, PathLike, as_path, data_error, decode_pixels, encode_pixels

__all__ = ["PARTITION_FORMAT_VERSION", "atomic_write", "load_partition", "save_partition"]

logger = logging.getLogger(__name__)

PARTITION_FORMAT_VERSION = 1
_REQUIRED_KEYS = ("x", "y")
_X_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
# What a damaged archive makes zipfile/zlib/numpy raise: BadZipFile, zlib.error, EOFError and
# ValueError for corrupt bytes; NotImplementedError (a RuntimeError) for a mangled compression
# method or version; RuntimeError for a member flagged as encrypted. Found by fuzzing.
_READ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[IO[bytes], Path]]:
    handle_number, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(temporary_name)
    done = False
    try:
        with os.fdopen(handle_number, "wb") as handle:
            yield handle, temporary
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        done = True
    finally:
        if not done:
            temporary.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    try:
        handle_number = os.open(directory, os.O_RDONLY)
    except OSError as error:  # some filesystems cannot open folders; the data itself is synced
        logger.debug("cannot open %s to fsync it: %s", directory, error)
        return
    try:
        os.fsync(handle_number)
    except OSError as error:
        logger.debug("cannot fsync folder %s: %s", directory, error)
    finally:
        os.close(handle_number)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` atomically with what ``write`` puts into a binary stream.

    Raises :class:`DataError` (``write_failed``) naming ``path`` when the folder is missing or
    the disk refuses the write; the temporary file is removed in every case.
    """
    target = as_path(path)
    try:
        with _temporary_beside(target) as (handle, _):
            write(handle)
    except OSError as error:
        raise data_error("write_failed", error.strerror or str(error), path=target) from error
    _fsync_directory(target.parent)


def save_partition(path: PathLike, dataset: Dataset, *, compress: bool = True) -> None:
    """Write ``dataset`` to ``path`` as a version-1 partition file, atomically.

    ``x`` is stored as uint8 when that is lossless, else float32. ``compress=False`` writes a
    stored (uncompressed) archive: larger, slightly faster to load.
    """
    pixels = encode_pixels(dataset.x)
    x: NDArray[Any] = dataset.x if pixels is None else pixels
    save = np.savez_compressed if compress else np.savez

    def write(handle: IO[bytes]) -> None:
        save(
            handle,
            allow_pickle=False,
            x=x,
            y=dataset.y,
            num_classes=np.array(dataset.num_classes, dtype=np.int64),
            format_version=np.array(PARTITION_FORMAT_VERSION, dtype=np.int64),
        )

    atomic_write(path, write)
    logger.debug("saved partition %s: %d examples, x as %s", path, len(dataset), x.dtype)


def _member_header(archive: Any, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Shape, dtype and uncompressed member size of ``key``, read without loading the data."""
    member = f"{key}.npy"
    try:
        info = archive.zip.getinfo(member)
        with archive.zip.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise data_error("unreadable", f"member {key!r}: unknown .npy version {version}", path=path)
    except KeyError as error:
        raise data_error("unreadable", f"member {key!r} is not stored as {member}", path=path) from error
    except _READ_ERRORS as error:
        raise data_error("unreadable", f"member {key!r}: {error}", path=path) from error
    if dtype.hasobject:
        raise data_error(
            "object_array", f"member {key!r} holds Python objects ({dtype}); refused (no pickle)", path=path
        )
    return tuple(shape), dtype, int(info.file_size)


def _load_member(archive: Any, key: str, path: Path) -> NDArray[Any]:
    shape, dtype, member_size = _member_header(archive, key, path)
    if key == "x" and (dtype not in _X_DTYPES or len(shape) < 2):
        raise data_error(
            "bad_dtype" if dtype not in _X_DTYPES else "bad_shape",
            f"x must be uint8 or float32 of shape (n, *feature_shape), got {dtype} {shape}",
            path=path,
        )
    if key == "y" and dtype == np.float32 and len(shape) >= 1:
        pass  # regression targets; load_partition checks num_classes is 0
    elif key == "y" and (dtype != np.int64 or len(shape) != 1):
        raise data_error(
            "bad_dtype" if dtype != np.int64 else "bad_shape",
            f"y must be int64 of shape (n,) (or float32 regression targets), got {dtype} {shape}",
            path=path,
        )
    if key in ("num_classes", "format_version") and (not np.issubdtype(dtype, np.integer) or shape not in ((), (1,))):
        raise data_error("bad_dtype", f"{key} must be an integer scalar, got {dtype} {shape}", path=path)
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > member_size:
        raise data_error(
            "size_mismatch", f"member {key!r} announces {claimed} bytes, the archive holds {member_size}", path=path
        )
    try:
        array: NDArray[Any] = archive[key]
    except _READ_ERRORS as error:
        raise data_error("unreadable", f"member {key!r}: {error}", path=path) from error
    return array


def _scalar(array: NDArray[Any]) -> int:
    return int(array.reshape(-1)[0])


_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def _check_magic(path: Path) -> None:
    """Refuse what is neither an .npz (a zip) nor an .npy file before NumPy reads it: for any
    other bytes NumPy's message is about pickles (``allow_pickle``), which misleads."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except FileNotFoundError as error:
        raise data_error("not_found", "no such partition file", path=path) from error
    except OSError as error:
        raise data_error("unreadable", error.strerror or str(error), path=path) from error
    if not head.startswith((_ZIP_MAGIC, _NPY_MAGIC)):
        kind = "an empty file" if not head else f"a file starting with {head!r}"
        raise data_error("not_npz", f"{kind}, not an .npz archive: write partitions with "
                         "`unus-edge data split` (or numpy.savez with x, y, num_classes)", path=path)


def load_partition(path: PathLike, *, num_classes: int | None = None) -> Dataset:
    """Read a partition file written by :func:`save_partition` into a :class:`Dataset`.

    ``num_classes`` is required only for files without a ``num_classes`` member; when both
    exist they must agree. Raises :class:`DataError` with the reason and ``path``.
    """
    file_path = as_path(path)
    _check_magic(file_path)
    try:
        archive = np.load(file_path, allow_pickle=False)
    except FileNotFoundError as error:
        raise data_error("not_found", "no such partition file", path=file_path) from error
    except _READ_ERRORS as error:
        raise data_error("unreadable", f"not a readable .npz archive ({error})", path=file_path) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise data_error("not_npz", "a single .npy array, expected an .npz archive", path=file_path)
    with archive:
        keys = set(archive.files)
        missing = [key for key in _REQUIRED_KEYS if key not in keys]
        if missing:
            raise data_error(
                "missing_key", f"missing {', '.join(missing)}; the archive holds {sorted(keys)}", path=file_path
            )
        if "format_version" in keys:
            version = _scalar(_load_member(archive, "format_version", file_path))
            if version != PARTITION_FORMAT_VERSION:
                raise data_error(
                    "unsupported_version",
                    f"format_version {version}, this unus-edge reads version {PARTITION_FORMAT_VERSION}",
                    path=file_path,
                )
        stored_classes = _scalar(_load_member(archive, "num_classes", file_path)) if "num_classes" in keys else None
        if stored_classes is not None and num_classes is not None and stored_classes != num_classes:
            raise data_error(
                "bad_num_classes", f"the file says {stored_classes} classes, the caller {num_classes}", path=file_path
            )
        classes = stored_classes if stored_classes is not None else num_classes
        if classes is None:
            raise data_error("missing_key", "no num_classes member and none given by the caller", path=file_path)
        y = _load_member(archive, "y", file_path)
        regression = y.dtype == np.float32
        if regression and classes != REGRESSION:
            raise data_error("bad_dtype", f"y must be int64 labels with num_classes {classes} (float32 y holds "
                                          "regression targets, with num_classes 0)", path=file_path)
        if classes < (0 if regression else 1):
            raise data_error("bad_num_classes", f"num_classes is {classes} (0 only for float32 regression targets)",
                             path=file_path)
        x_shape = _member_header(archive, "x", file_path)[0]
        if x_shape[:1] != y.shape[:1]:
            raise data_error(
                "length_mismatch", f"x has {x_shape[0] if x_shape else 0} examples, y has {y.shape[0]}", path=file_path
            )
        if regression:
            if y.size and not bool(np.isfinite(y).all()):
                raise data_error("bad_targets", "regression targets must be finite", path=file_path)
        elif y.size and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise data_error(
                "bad_labels",
                f"labels span [{int(y.min())}, {int(y.max())}], outside [0, {classes})",
                path=file_path,
            )
        x = _load_member(archive, "x", file_path)
    if x.dtype == np.uint8:
        x = decode_pixels(x)
    elif regression:  # sensor readings: any finite values
        if x.size and not bool(np.isfinite(x).all()):
            raise data_error("bad_values", "float32 x must be finite", path=file_path)
    elif x.size and not (float(x.min()) >= 0.0 and float(x.max()) <= 1.0):  # NaN fails too
        raise data_error("bad_values", "float32 x must be finite and within [0, 1]", path=file_path)
    logger.debug("loaded partition %s: %d examples", file_path, y.shape[0])
    return Dataset(x=np.ascontiguousarray(x), y=np.ascontiguousarray(y), num_classes=classes)
