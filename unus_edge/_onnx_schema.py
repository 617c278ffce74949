"""The ONNX protobuf schema: which field of which message means what, both ways.

Private to :mod:`unus_edge.onnx_io` (which re-exports :class:`Node`, :class:`ValueInfo`,
:class:`RawAttribute` and ``AttributeValue``). On top of the wire format of
:mod:`unus_edge._protobuf`, this module decodes and encodes the messages a model is made of:
``TensorProto`` (to and from read-only NumPy arrays), ``AttributeProto``, ``NodeProto`` and
``ValueInfoProto`` with its type and shape. Only the fields the engine needs are decoded;
callers skip the rest. Malformed input raises :class:`~unus_edge.errors.ModelError` with a
``corrupt_onnx`` or ``unsupported_tensor`` reason. Encoders write fields in field-number order,
as the reference serializer does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from unus_edge import _protobuf as pb
from unus_edge.errors import ModelError

__all__ = [
    "AttributeValue",
    "Node",
    "RawAttribute",
    "ValueInfo",
    "encode_node",
    "encode_tensor",
    "encode_value_info",
    "parse_node",
    "parse_tensor",
    "parse_value_info",
    "read_int",
    "read_message",
    "read_text",
]


# TensorProto.DataType -> numpy dtype (little-endian); STRING, complex and bfloat16 are not supported.
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    9: np.dtype("bool"),
    10: np.dtype("<f2"),
    11: np.dtype("<f8"),
    12: np.dtype("<u4"),
    13: np.dtype("<u8"),
}
_DTYPE_CODES = {dtype.newbyteorder("="): code for code, dtype in _DTYPES.items()}
# Element types stored in TensorProto.int32_data (16-bit floats as their bit patterns).
_INT32_DATA_TYPES = {2, 3, 4, 5, 6, 9, 10}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# AttributeProto.AttributeType
_A_FLOAT, _A_INT, _A_STRING, _A_TENSOR = 1, 2, 3, 4
_A_FLOATS, _A_INTS, _A_STRINGS = 6, 7, 8


@dataclass(frozen=True)
class RawAttribute:
    """An attribute kind the engine never interprets (graphs, sparse tensors...), kept as bytes."""

    type: int
    data: bytes


AttributeValue = float | int | str | NDArray[Any] | tuple[float, ...] | tuple[int, ...] | tuple[str, ...]


@dataclass(frozen=True)
class Node:
    """One ONNX node. Absent optional inputs/outputs are empty strings, as in ONNX."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str = ""
    domain: str = ""
    attributes: Mapping[str, AttributeValue | RawAttribute] = field(default_factory=dict)


class ValueInfo(NamedTuple):
    """A graph input or output: ``dtype`` is None when unknown; a dim is an int, a symbol or None."""

    name: str
    dtype: np.dtype[Any] | None
    shape: tuple[int | str | None, ...] | None


# ----------------------------------------------------------------------------------- reading


def read_text(value: pb.FieldValue, what: str) -> str:
    """A string field (``what`` names it in the error)."""
    if not isinstance(value, memoryview):
        raise ModelError(f"corrupt_onnx: {what} is not a length-delimited field")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelError(f"corrupt_onnx: {what} is not valid UTF-8") from error


def read_int(wire: int, value: pb.FieldValue, what: str) -> int:
    """A (signed 64-bit) varint field."""
    if wire != pb.VARINT or not isinstance(value, int):
        raise ModelError(f"corrupt_onnx: {what} is not a varint")
    return pb.to_signed64(value)


def read_message(value: pb.FieldValue, what: str) -> memoryview:
    """An embedded message (or a bytes field), as a zero-copy view."""
    if not isinstance(value, memoryview):
        raise ModelError(f"corrupt_onnx: {what} is not an embedded message")
    return value


def _ints(wire: int, value: pb.FieldValue, what: str) -> list[int]:
    """A repeated int field, packed (LEN) or not (VARINT)."""
    if wire == pb.LEN:
        assert isinstance(value, memoryview)
        return [pb.to_signed64(v) for v in pb.packed_varints(value)]
    return [read_int(wire, value, what)]


def _float32(wire: int, value: pb.FieldValue, what: str) -> float:
    if wire != pb.FIXED32 or not isinstance(value, int):
        raise ModelError(f"corrupt_onnx: {what} is not a fixed32 float")
    return float(np.array([value], dtype="<u4").view("<f4")[0])


def parse_tensor(data: memoryview) -> tuple[str, NDArray[Any]]:
    name = ""
    dims: list[int] = []
    code = 0
    raw: memoryview | None = None
    floats: list[NDArray[Any]] = []
    doubles: list[NDArray[Any]] = []
    ints: list[int] = []
    external = False
    for number, wire, value in pb.iter_fields(data):
        if number == 1:
            dims.extend(_ints(wire, value, "TensorProto.dims"))
        elif number == 2:
            code = read_int(wire, value, "TensorProto.data_type")
        elif number == 8:
            name = read_text(value, "TensorProto.name")
        elif number == 9:
            raw = read_message(value, "TensorProto.raw_data")
        elif number == 4:
            if isinstance(value, memoryview):
                floats.append(pb.packed_fixed32(value))
            else:
                floats.append(np.array([_float32(wire, value, "TensorProto.float_data")], np.float32))
        elif number == 10:
            if isinstance(value, memoryview):
                doubles.append(pb.packed_fixed64(value))
            elif wire == pb.FIXED64:
                doubles.append(np.array([value], np.uint64).view(np.float64))
            else:
                raise ModelError("corrupt_onnx: TensorProto.double_data is not a fixed64 double")
        elif number in (5, 7, 11):
            ints.extend(_ints(wire, value, "TensorProto.int_data"))
        elif number == 14:
            external = read_int(wire, value, "TensorProto.data_location") == _EXTERNAL
    if external:
        raise ModelError(f"unsupported_tensor: initializer {name!r} uses external data; save it inline")
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise ModelError(f"unsupported_tensor: {name!r} has ONNX data type {code}")
    if any(d < 0 for d in dims):
        raise ModelError(f"corrupt_onnx: tensor {name!r} has a negative dim {dims}")
    count = math.prod(dims)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ModelError(
                f"corrupt_onnx: tensor {name!r} raw_data holds {len(raw)} bytes, "
                f"dims {dims} of {dtype} need {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)
    elif code == 1:
        array = np.concatenate(floats) if floats else np.zeros(0, np.float32)
    elif code == 11:
        array = np.concatenate(doubles) if doubles else np.zeros(0, np.float64)
    elif code in _INT32_DATA_TYPES:
        array = np.array(ints, dtype=np.int64).astype(np.int32)
        array = array.astype(np.uint16).view(np.float16) if code == 10 else array.astype(dtype)
    else:
        array = np.array(ints, dtype=np.int64).astype(dtype)
    if array.size != count:
        raise ModelError(f"corrupt_onnx: tensor {name!r} holds {array.size} values, dims {dims} need {count}")
    array = array.reshape(dims)
    array.flags.writeable = False
    return name, array


def _parse_attribute(data: memoryview) -> tuple[str, AttributeValue | RawAttribute]:
    name = ""
    kind = 0
    scalars: dict[int, Any] = {}
    ints: list[int] = []
    floats: list[float] = []
    strings: list[str] = []
    for number, wire, value in pb.iter_fields(data):
        if number == 1:
            name = read_text(value, "AttributeProto.name")
        elif number == 20:
            kind = read_int(wire, value, "AttributeProto.type")
        elif number == 2:
            scalars[_A_FLOAT] = _float32(wire, value, "AttributeProto.f")
        elif number == 3:
            scalars[_A_INT] = read_int(wire, value, "AttributeProto.i")
        elif number == 4:
            scalars[_A_STRING] = read_text(value, "AttributeProto.s")
        elif number == 5:
            scalars[_A_TENSOR] = parse_tensor(read_message(value, "AttributeProto.t"))[1]
        elif number == 7:
            if isinstance(value, memoryview):
                floats.extend(float(v) for v in pb.packed_fixed32(value))
            else:
                floats.append(_float32(wire, value, "AttributeProto.floats"))
            scalars.setdefault(_A_FLOATS, None)
        elif number == 8:
            ints.extend(_ints(wire, value, "AttributeProto.ints"))
            scalars.setdefault(_A_INTS, None)
        elif number == 9:
            strings.append(read_text(value, "AttributeProto.strings"))
            scalars.setdefault(_A_STRINGS, None)
    if kind == 0 and len(scalars) == 1:  # pre-IR-2 models may omit the type
        kind = next(iter(scalars))
    if kind in (_A_FLOAT, _A_INT, _A_STRING, _A_TENSOR):
        if kind not in scalars:
            defaults: dict[int, AttributeValue] = {_A_FLOAT: 0.0, _A_INT: 0, _A_STRING: ""}
            if kind not in defaults:
                raise ModelError(f"corrupt_onnx: tensor attribute {name!r} has no tensor")
            return name, defaults[kind]
        return name, scalars[kind]
    if kind == _A_FLOATS:
        return name, tuple(floats)
    if kind == _A_INTS:
        return name, tuple(ints)
    if kind == _A_STRINGS:
        return name, tuple(strings)
    return name, RawAttribute(kind, bytes(data))


def parse_node(data: memoryview) -> Node:
    inputs: list[str] = []
    outputs: list[str] = []
    name = op_type = domain = ""
    attributes: dict[str, AttributeValue | RawAttribute] = {}
    for number, _wire, value in pb.iter_fields(data):
        if number == 1:
            inputs.append(read_text(value, "NodeProto.input"))
        elif number == 2:
            outputs.append(read_text(value, "NodeProto.output"))
        elif number == 3:
            name = read_text(value, "NodeProto.name")
        elif number == 4:
            op_type = read_text(value, "NodeProto.op_type")
        elif number == 7:
            domain = read_text(value, "NodeProto.domain")
        elif number == 5:
            key, attribute = _parse_attribute(read_message(value, "NodeProto.attribute"))
            attributes[key] = attribute
    if not op_type:
        raise ModelError(f"corrupt_onnx: node {name!r} has no op_type")
    return Node(op_type, tuple(inputs), tuple(outputs), name, domain, MappingProxyType(attributes))


def parse_value_info(data: memoryview) -> ValueInfo:
    name = ""
    dtype: np.dtype[Any] | None = None
    shape: tuple[int | str | None, ...] | None = None
    for number, _wire, value in pb.iter_fields(data):
        if number == 1:
            name = read_text(value, "ValueInfoProto.name")
        elif number == 2:
            for t_number, _t_wire, t_value in pb.iter_fields(read_message(value, "TypeProto")):
                if t_number != 1:  # only tensor types
                    continue
                for f_number, f_wire, f_value in pb.iter_fields(read_message(t_value, "TypeProto.Tensor")):
                    if f_number == 1:
                        dtype = _DTYPES.get(read_int(f_wire, f_value, "elem_type"))
                    elif f_number == 2:
                        shape = _parse_shape(read_message(f_value, "TensorShapeProto"))
    return ValueInfo(name, None if dtype is None else dtype.newbyteorder("="), shape)


def _parse_shape(data: memoryview) -> tuple[int | str | None, ...]:
    dims: list[int | str | None] = []
    for number, _wire, value in pb.iter_fields(data):
        if number != 1:
            continue
        dim: int | str | None = None
        for d_number, d_wire, d_value in pb.iter_fields(read_message(value, "Dimension")):
            if d_number == 1:
                dim = read_int(d_wire, d_value, "dim_value")
            elif d_number == 2:
                dim = read_text(d_value, "dim_param") or None
        dims.append(dim)
    return tuple(dims)

# ----------------------------------------------------------------------------------- writing


def encode_tensor(name: str, array: NDArray[Any]) -> pb.Writer:
    code = _DTYPE_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ModelError(f"unsupported_tensor: cannot write {name!r} of dtype {array.dtype}")
    writer = pb.Writer()
    for dim in array.shape:
        writer.varint(1, dim)
    writer.varint(2, code)
    if name:
        writer.string(8, name)
    writer.bytes_field(9, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return writer


def _encode_attribute(key: str, value: AttributeValue | RawAttribute) -> bytes:
    if isinstance(value, RawAttribute):
        return value.data
    writer = pb.Writer()
    writer.string(1, key)
    if isinstance(value, bool | int | np.integer):
        writer.varint(3, int(value))
        kind = _A_INT
    elif isinstance(value, float | np.floating):
        writer.fixed32_float(2, float(value))
        kind = _A_FLOAT
    elif isinstance(value, str):
        writer.string(4, value)
        kind = _A_STRING
    elif isinstance(value, np.ndarray):
        writer.message(5, encode_tensor("", value))
        kind = _A_TENSOR
    elif all(isinstance(v, int | np.integer) for v in value):  # an empty tuple is INTS
        for item in value:
            writer.varint(8, int(item))
        kind = _A_INTS
    elif all(isinstance(v, str) for v in value):
        for item in value:
            writer.string(9, str(item))
        kind = _A_STRINGS
    else:
        for item in value:
            writer.fixed32_float(7, float(item))
        kind = _A_FLOATS
    writer.varint(20, kind)
    return writer.getvalue()


def encode_node(node: Node) -> pb.Writer:
    writer = pb.Writer()
    for name in node.inputs:
        writer.string(1, name)
    for name in node.outputs:
        writer.string(2, name)
    if node.name:
        writer.string(3, node.name)
    writer.string(4, node.op_type)
    for key, value in node.attributes.items():
        writer.bytes_field(5, _encode_attribute(key, value))
    if node.domain:
        writer.string(7, node.domain)
    return writer


def encode_value_info(info: ValueInfo) -> pb.Writer:
    tensor = pb.Writer()
    if info.dtype is not None:
        tensor.varint(1, _DTYPE_CODES[info.dtype.newbyteorder("=")])
    if info.shape is not None:
        shape = pb.Writer()
        for dim in info.shape:
            dimension = pb.Writer()
            if isinstance(dim, int):
                dimension.varint(1, dim)
            elif isinstance(dim, str):
                dimension.string(2, dim)
            shape.message(1, dimension)
        tensor.message(2, shape)
    type_proto = pb.Writer()
    type_proto.message(1, tensor)
    writer = pb.Writer()
    writer.string(1, info.name)
    writer.message(2, type_proto)
    return writer
