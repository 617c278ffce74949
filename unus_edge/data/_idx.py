"""A strict reader for the IDX format of MNIST (LeCun et al.), raw or gzip-compressed.

Format: two zero bytes, a dtype code byte, a byte ``ndim``, then ``ndim`` big-endian uint32
dimension sizes, then the row-major big-endian payload::

    0x00 0x00 <dtype> <ndim> <dim_0:u32be> ... <dim_{ndim-1}:u32be> <data...>

dtype codes: ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
``0x0E`` float64.

Decisions
---------
* Compression is detected from the content (the gzip magic ``1f 8b``), not the file name: an
  IDX file always starts with ``00 00``, so the two cannot be confused.
* The header is validated against the byte length *before* the payload is allocated. For a raw
  file the exact size is known from ``fstat``. A gzip stream has no reliable size up front, so
  its payload is read in bounded chunks and the reader stops at the first byte beyond what the
  header announced: memory follows the bytes that really decompress, never the header's claim.
  ``max_bytes`` caps the payload in both cases (gzip bombs, absurd headers).
* Every failure is a :class:`~unus_edge.errors.DataError` naming the file, with one of the
  reason codes ``not_found``, ``unreadable``, ``bad_gzip``, ``truncated``, ``bad_magic``,
  ``bad_dtype``, ``bad_header``, ``too_large``, ``size_mismatch``; ``struct.error``,
  ``EOFError``, ``zlib.error`` and friends never leak.
* The result is a native-endian NumPy array of shape ``dims``; for uint8 data the buffer read
  from disk is used as is (no copy).
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import zlib
from typing import Any

import numpy as np
from numpy.typing import NDArray

from unus_edge.data._dataset import PathLike, as_path, data_error

__all__ = ["DEFAULT_MAX_BYTES", "IDX_DTYPES", "read_idx"]

logger = logging.getLogger(__name__)

#: IDX dtype code -> big-endian NumPy dtype of the payload.
IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Default cap on the payload of one IDX file (MNIST's largest file is 47 MB).
DEFAULT_MAX_BYTES = 1 << 30

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_BYTES = 1 << 20


def _read_exactly(stream: io.BufferedIOBase, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at the end of the stream."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        part = stream.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _read_header(stream: io.BufferedIOBase, path: PathLike) -> tuple[np.dtype[Any], tuple[int, ...]]:
    prefix = _read_exactly(stream, 4)
    if len(prefix) < 4:
        raise data_error("truncated", f"{len(prefix)} bytes, an IDX header needs at least 4", path=path)
    if prefix[0] != 0 or prefix[1] != 0:
        raise data_error("bad_magic", f"starts with {prefix[:2].hex()}, an IDX file starts with 0000", path=path)
    code, ndim = prefix[2], prefix[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{known:02X}" for known in IDX_DTYPES)
        raise data_error("bad_dtype", f"unknown IDX dtype code 0x{code:02X} (known: {known})", path=path)
    if ndim == 0:
        raise data_error("bad_header", "the header declares 0 dimensions", path=path)
    dims_bytes = _read_exactly(stream, 4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise data_error("truncated", f"the header declares {ndim} dimensions but the file ends inside it", path=path)
    dims = tuple(int.from_bytes(dims_bytes[4 * axis : 4 * axis + 4], "big") for axis in range(ndim))
    return IDX_DTYPES[code], dims


def _payload_from_raw(stream: io.BufferedIOBase, nbytes: int, file_size: int, header_size: int, path: PathLike) -> Any:
    actual = file_size - header_size
    if actual != nbytes:
        reason = "truncated" if actual < nbytes else "size_mismatch"
        raise data_error(reason, f"the header announces {nbytes} payload bytes, the file has {actual}", path=path)
    buffer = np.empty(nbytes, dtype=np.uint8)
    view = buffer.data
    filled = 0
    while filled < nbytes:
        count = stream.readinto(view[filled:])
        if not count:
            raise data_error("truncated", f"the file ended after {filled} of {nbytes} payload bytes", path=path)
        filled += count
    return buffer


def _payload_from_gzip(stream: io.BufferedIOBase, nbytes: int, path: PathLike) -> Any:
    buffer = bytearray()
    while True:
        # Ask for one byte more than still expected, so trailing data is noticed without
        # reading (or allocating) all of it.
        chunk = stream.read(min(_CHUNK_BYTES, nbytes - len(buffer) + 1))
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > nbytes:
            raise data_error(
                "size_mismatch", f"the header announces {nbytes} payload bytes, the data is longer", path=path
            )
    if len(buffer) < nbytes:
        raise data_error(
            "truncated", f"the header announces {nbytes} payload bytes, the data has {len(buffer)}", path=path
        )
    return buffer


def _read(stream: io.BufferedIOBase, path: PathLike, *, file_size: int | None, max_bytes: int) -> NDArray[Any]:
    dtype, dims = _read_header(stream, path)
    count = math.prod(dims)
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise data_error(
            "too_large",
            f"the header announces {'x'.join(map(str, dims))} {dtype.name} = {nbytes} bytes, "
            f"more than max_bytes={max_bytes}",
            path=path,
        )
    if file_size is None:
        payload = _payload_from_gzip(stream, nbytes, path)
    else:
        payload = _payload_from_raw(stream, nbytes, file_size, 4 + 4 * len(dims), path)
    array = np.frombuffer(payload, dtype=dtype, count=count)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return array.reshape(dims)


def read_idx(path: PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> NDArray[Any]:
    """Read an IDX file (raw or gzip) into a native-endian array of the declared shape.

    Raises :class:`DataError` naming ``path`` for a missing, unreadable, truncated or
    malformed file, a header that disagrees with the data, or a payload above ``max_bytes``.
    """
    file_path = as_path(path)
    try:
        handle = file_path.open("rb")
    except FileNotFoundError as error:
        raise data_error("not_found", "no such file", path=file_path) from error
    except OSError as error:
        raise data_error("unreadable", error.strerror or str(error), path=file_path) from error
    with handle:
        try:
            compressed = handle.read(2) == _GZIP_MAGIC
            handle.seek(0)
            file_size = os.fstat(handle.fileno()).st_size
        except OSError as error:
            raise data_error("unreadable", error.strerror or str(error), path=file_path) from error
        if not compressed:
            try:
                array = _read(handle, file_path, file_size=file_size, max_bytes=max_bytes)
            except OSError as error:
                raise data_error("unreadable", error.strerror or str(error), path=file_path) from error
        else:
            try:
                with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
                    array = _read(stream, file_path, file_size=None, max_bytes=max_bytes)
            except (OSError, EOFError, zlib.error) as error:
                # BadGzipFile is an OSError; a cut-off stream raises EOFError; a corrupt
                # deflate block raises zlib.error.
                raise data_error("bad_gzip", str(error) or type(error).__name__, path=file_path) from error
    logger.debug("read IDX %s: %s %s", file_path, array.dtype, array.shape)
    return array
