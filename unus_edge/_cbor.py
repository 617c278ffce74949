"""The CBOR subset of the wire codec: an encoder and a bounds-checked, zero-copy decoder.

Private to :mod:`unus_edge.codec`, which builds and validates envelopes on top of it (and
re-exports :func:`dumps` and :func:`loads`); no other module reads or writes CBOR.

* **The subset** (RFC 8949): unsigned and negative integers (64-bit), byte strings, text
  strings, arrays, maps with text keys (no duplicates), ``false``/``true``/``null`` and floats
  (16, 32 or 64 bit on input; the encoder writes 64-bit). Definite lengths only; tags,
  ``undefined`` and other simple values are refused. A microcontroller parses it with a hundred
  lines of C.
* **Deterministic encoding**: the shortest integer heads, so equal values encode to equal bytes.
  Byte strings are not copied: :func:`dumps` joins memoryviews of them once.
* **Defensive decoding**: byte strings come back as read-only views of the payload; every
  declared length is checked against the bytes actually present before slicing (or before a
  container is built), and the nesting depth, item count and text length are bounded by the
  caller's limits. Any malformed input raises :class:`~unus_edge.errors.CodecError`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from unus_edge.errors import CodecError

__all__ = [
    "ReaderLimits",
    "dumps",
    "loads",
]


class ReaderLimits(Protocol):
    """The bounds :func:`loads` enforces (:class:`unus_edge.codec.Limits` provides them)."""

    @property
    def max_payload_bytes(self) -> int: ...

    @property
    def max_depth(self) -> int: ...

    @property
    def max_items(self) -> int: ...

    @property
    def max_string_bytes(self) -> int: ...


# --------------------------------------------------------------------------------------------
# Encoding


_JOIN_SLICE = 8192
"""Parts joined per ``bytes.join`` call. One join holds the GIL for its whole length: over the
640,000 parts of a checkpoint with a full dedup window it blocked the event loop 46 ms while a
worker thread encoded it; slices of this many parts take well under a millisecond each, and a
message (an update: a few dozen parts) is still joined once, without a second copy."""


def dumps(value: Any) -> bytes:
    """Encode a value of the CBOR subset (NumPy arrays must be wrapped as tensor documents)."""
    parts: list[bytes | memoryview] = []
    _encode_value(value, parts)
    if len(parts) <= _JOIN_SLICE:
        return b"".join(parts)
    return b"".join([b"".join(parts[start:start + _JOIN_SLICE]) for start in range(0, len(parts), _JOIN_SLICE)])


def _head(major: int, argument: int) -> bytes:
    if argument < 24:
        return bytes((major << 5 | argument,))
    if argument < 0x100:
        return bytes((major << 5 | 24, argument))
    if argument < 0x10000:
        return struct.pack(">BH", major << 5 | 25, argument)
    if argument < 0x100000000:
        return struct.pack(">BI", major << 5 | 26, argument)
    return struct.pack(">BQ", major << 5 | 27, argument)


def _encode_value(value: Any, parts: list[bytes | memoryview]) -> None:
    # bool before int: bool is a subclass of int.
    if value is None:
        parts.append(b"\xf6")
    elif value is True:
        parts.append(b"\xf5")
    elif value is False:
        parts.append(b"\xf4")
    elif isinstance(value, int | np.integer):
        number = int(value)
        if 0 <= number < 1 << 64:
            parts.append(_head(0, number))
        elif -(1 << 64) <= number < 0:
            parts.append(_head(1, -1 - number))
        else:
            raise CodecError("unencodable", f"integer {number} does not fit in 64 bits")
    elif isinstance(value, float | np.floating):
        parts.append(struct.pack(">Bd", 0xFB, float(value)))
    elif isinstance(value, str):
        encoded = value.encode()
        parts.append(_head(3, len(encoded)))
        parts.append(encoded)
    elif isinstance(value, bytes | bytearray | memoryview):
        view = memoryview(value).cast("B")
        parts.append(_head(2, view.nbytes))
        parts.append(view)
    elif isinstance(value, Mapping):
        parts.append(_head(5, len(value)))
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError("unencodable", f"map key {key!r} is not a string")
            _encode_value(key, parts)
            _encode_value(item, parts)
    elif isinstance(value, list | tuple):
        parts.append(_head(4, len(value)))
        for item in value:
            _encode_value(item, parts)
    else:
        raise CodecError("unencodable", f"cannot encode {type(value).__name__}")



# --------------------------------------------------------------------------------------------
# Decoding


class _Reader:
    """Decodes the CBOR subset from a memoryview; every length is checked before slicing."""

    __slots__ = ("data", "end", "items", "limits", "offset")

    def __init__(self, data: memoryview, limits: ReaderLimits) -> None:
        self.data = data
        self.offset = 0
        self.end = data.nbytes
        self.limits = limits
        self.items = 0

    def _take(self, count: int) -> memoryview:
        start = self.offset
        if count > self.end - start:
            raise CodecError("truncated", f"need {count} bytes at offset {start}, have {self.end - start}")
        self.offset = start + count
        return self.data[start : start + count]

    def _argument(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self._take(1)[0]
        if info == 25:
            return int(struct.unpack(">H", self._take(2))[0])
        if info == 26:
            return int(struct.unpack(">I", self._take(4))[0])
        if info == 27:
            return int(struct.unpack(">Q", self._take(8))[0])
        if info == 31:
            raise CodecError("indefinite_length", f"at offset {self.offset - 1}")
        raise CodecError("bad_head", f"reserved additional information {info} at offset {self.offset - 1}")

    def value(self, depth: int = 0) -> Any:
        if depth > self.limits.max_depth:
            raise CodecError("too_deep", f"nesting deeper than {self.limits.max_depth}")
        self.items += 1
        if self.items > self.limits.max_items:
            raise CodecError("too_many_items", f"more than {self.limits.max_items} data items")
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            return self._simple(info)
        argument = self._argument(info)
        if major == 0:
            return argument
        if major == 1:
            return -1 - argument
        if major == 2:
            return self._take(argument)
        if major == 3:
            if argument > self.limits.max_string_bytes:
                raise CodecError("string_too_long", f"{argument} bytes > {self.limits.max_string_bytes}")
            raw = self._take(argument)
            try:
                return str(raw, "utf-8")
            except UnicodeDecodeError as error:
                raise CodecError("bad_utf8", str(error)) from error
        if major == 4:
            # Each item takes at least one byte: a claimed length beyond the bytes left is a lie.
            if argument > self.end - self.offset:
                raise CodecError("truncated", f"array of {argument} items in {self.end - self.offset} bytes")
            return [self.value(depth + 1) for _ in range(argument)]
        if major == 5:
            if argument > (self.end - self.offset) // 2:
                raise CodecError("truncated", f"map of {argument} entries in {self.end - self.offset} bytes")
            result: dict[str, Any] = {}
            for _ in range(argument):
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise CodecError("bad_key", f"map key of type {type(key).__name__}")
                if key in result:
                    raise CodecError("duplicate_key", repr(key))
                result[key] = self.value(depth + 1)
            return result
        raise CodecError("tag_not_allowed", f"tag {argument} at offset {self.offset}")

    def _simple(self, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 25:
            return float(struct.unpack(">e", self._take(2))[0])
        if info == 26:
            return float(struct.unpack(">f", self._take(4))[0])
        if info == 27:
            return float(struct.unpack(">d", self._take(8))[0])
        if info == 31:
            raise CodecError("indefinite_length", "break outside an indefinite item")
        raise CodecError("simple_not_allowed", f"simple value {info}")


def loads(payload: bytes | bytearray | memoryview, *, limits: ReaderLimits) -> Any:
    """Decode one value of the CBOR subset. Byte strings come back as read-only memoryviews."""
    view = memoryview(payload).cast("B").toreadonly()
    if view.nbytes > limits.max_payload_bytes:
        raise CodecError("too_large", f"{view.nbytes} bytes > {limits.max_payload_bytes}")
    reader = _Reader(view, limits)
    value = reader.value()
    if reader.offset != reader.end:
        raise CodecError("trailing_bytes", f"{reader.end - reader.offset} bytes after the value")
    return value

