"""A minimal protocol-buffers wire-format reader and writer.

Devices run without the ``protobuf``/``onnx`` packages, so the ONNX I/O of unus-edge speaks
the wire format directly. Only the encoding layer lives here; the ONNX schema (which field
number means what) lives in :mod:`unus_edge._onnx_schema` (public API: :mod:`unus_edge.onnx_io`).

Design decisions:

* **Reading is a flat field iterator.** :func:`iter_fields` yields ``(number, wire_type,
  value)`` for one message; a varint or fixed field yields an ``int``, a length-delimited one
  a zero-copy :class:`memoryview` slice (tensors of megabytes are never copied while being
  parsed). Nested messages are parsed by calling :func:`iter_fields` on the slice. Unknown
  field numbers are simply not looked at by the caller, so they are skipped for free; groups
  (wire types 3/4, deprecated) are rejected because no ONNX field uses them.
* **Every malformed input raises** :class:`~unus_edge.errors.ModelError` with a stable
  ``reason`` (``"truncated"``, ``"bad_varint"``, ``"bad_wire_type"``...), never ``IndexError``
  or ``struct.error``.
* **Writing builds a list of byte chunks** and joins them once. A nested message is encoded to
  bytes first, then length-prefixed (the sizes here are small; a two-pass size computation is
  not worth its complexity). Output is deterministic: fields are written in the order the
  caller gives them.
* Negative ``int32``/``int64`` values are written as ten-byte two's complement varints, as
  protobuf does; :func:`to_signed64` maps them back on reading.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import numpy as np

from unus_edge.errors import ModelError

__all__ = [
    "FIXED32",
    "FIXED64",
    "LEN",
    "VARINT",
    "Writer",
    "decode_varint",
    "encode_field_raw",
    "encode_varint",
    "iter_fields",
    "packed_fixed32",
    "packed_fixed64",
    "packed_varints",
    "to_signed64",
]

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5

_MAX_VARINT_BYTES = 10
_U64 = 1 << 64

FieldValue = int | memoryview


def encode_varint(value: int) -> bytes:
    """Encode a non-negative or int64-negative integer as a base-128 varint."""
    if value < 0:
        if value < -(1 << 63):
            raise ValueError(f"varint out of int64 range: {value}")
        value += _U64
    if value >= _U64:
        raise ValueError(f"varint out of uint64 range: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; return ``(value, new_pos)`` (value as unsigned 64-bit)."""
    result = 0
    shift = 0
    end = len(data)
    for count in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise ModelError("truncated: varint runs past the end of the data")
        byte = data[pos]
        pos += 1
        if count == _MAX_VARINT_BYTES - 1 and byte > 1:
            raise ModelError("bad_varint: varint does not fit in 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ModelError("bad_varint: varint longer than 10 bytes")


def to_signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint value as two's complement int64."""
    return value - _U64 if value >= 1 << 63 else value


def iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, FieldValue]]:
    """Yield ``(field_number, wire_type, value)`` for each field of one message."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = decode_varint(view, pos)
        number = key >> 3
        wire_type = key & 7
        if number == 0:
            raise ModelError("bad_field: field number 0")
        if wire_type == VARINT:
            value, pos = decode_varint(view, pos)
            yield number, wire_type, value
        elif wire_type == LEN:
            size, pos = decode_varint(view, pos)
            if size > end - pos:
                raise ModelError(f"truncated: field {number} declares {size} bytes, {end - pos} remain")
            yield number, wire_type, view[pos : pos + size]
            pos += size
        elif wire_type == FIXED32:
            if end - pos < 4:
                raise ModelError(f"truncated: fixed32 field {number}")
            yield number, wire_type, int.from_bytes(view[pos : pos + 4], "little")
            pos += 4
        elif wire_type == FIXED64:
            if end - pos < 8:
                raise ModelError(f"truncated: fixed64 field {number}")
            yield number, wire_type, int.from_bytes(view[pos : pos + 8], "little")
            pos += 8
        else:
            raise ModelError(f"bad_wire_type: field {number} has wire type {wire_type}")


def packed_varints(data: memoryview) -> list[int]:
    """Decode the payload of a packed repeated varint field (unsigned values)."""
    values: list[int] = []
    pos = 0
    end = len(data)
    while pos < end:
        value, pos = decode_varint(data, pos)
        values.append(value)
    return values


def _packed_fixed(data: memoryview, dtype: str, size: int) -> np.ndarray:
    if len(data) % size:
        raise ModelError(f"truncated: packed field of {len(data)} bytes is not a multiple of {size}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).copy()


def packed_fixed32(data: memoryview, dtype: str = "<f4") -> np.ndarray:
    """Decode a packed repeated 32-bit field (``float`` by default) into a fresh array."""
    return _packed_fixed(data, dtype, 4)


def packed_fixed64(data: memoryview, dtype: str = "<f8") -> np.ndarray:
    """Decode a packed repeated 64-bit field (``double`` by default) into a fresh array."""
    return _packed_fixed(data, dtype, 8)


def _tag(number: int, wire_type: int) -> bytes:
    return encode_varint((number << 3) | wire_type)


class Writer:
    """Append-only encoder for one message; :meth:`getvalue` returns its bytes."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def varint(self, number: int, value: int) -> None:
        """Write an ``int32``/``int64``/``uint64``/``bool``/enum field."""
        self._chunks.append(_tag(number, VARINT) + encode_varint(int(value)))

    def fixed32_float(self, number: int, value: float) -> None:
        """Write a ``float`` field."""
        self._chunks.append(_tag(number, FIXED32) + struct.pack("<f", value))

    def fixed64_double(self, number: int, value: float) -> None:
        """Write a ``double`` field."""
        self._chunks.append(_tag(number, FIXED64) + struct.pack("<d", value))

    def bytes_field(self, number: int, value: bytes | bytearray | memoryview) -> None:
        """Write a ``bytes``/``string``/embedded-message field (already encoded)."""
        self._chunks.append(_tag(number, LEN) + encode_varint(len(value)))
        self._chunks.append(bytes(value))

    def string(self, number: int, value: str) -> None:
        """Write a ``string`` field as UTF-8."""
        self.bytes_field(number, value.encode("utf-8"))

    def message(self, number: int, value: Writer) -> None:
        """Write an embedded message."""
        self.bytes_field(number, value.getvalue())

    def packed_varints(self, number: int, values: Iterable[int]) -> None:
        """Write a packed repeated varint field (nothing when empty, as protobuf does)."""
        payload = b"".join(encode_varint(int(v)) for v in values)
        if payload:
            self.bytes_field(number, payload)

    def packed_floats(self, number: int, values: Iterable[float]) -> None:
        """Write a packed repeated ``float`` field."""
        payload = np.asarray(list(values), dtype="<f4").tobytes()
        if payload:
            self.bytes_field(number, payload)

    def raw(self, chunk: bytes | memoryview) -> None:
        """Append an already-encoded field verbatim (tag included)."""
        self._chunks.append(bytes(chunk))

    def getvalue(self) -> bytes:
        """The encoded message."""
        return b"".join(self._chunks)


def encode_field_raw(number: int, wire_type: int, value: FieldValue) -> bytes:
    """Re-encode one field exactly as :func:`iter_fields` yielded it (used to copy fields)."""
    tag = _tag(number, wire_type)
    if wire_type == VARINT:
        assert isinstance(value, int)
        return tag + encode_varint(value)
    if wire_type == LEN:
        assert isinstance(value, memoryview)
        return tag + encode_varint(len(value)) + bytes(value)
    assert isinstance(value, int)
    return tag + value.to_bytes(4 if wire_type == FIXED32 else 8, "little")
