"""Read, write, fingerprint and evaluate ONNX models without the ``onnx`` package.

A device has numpy and paho-mqtt, nothing else, so this module parses the ONNX protobuf
schema itself on top of :mod:`unus_edge._protobuf`. Design decisions:

* **An immutable parsed view.** :func:`load_model` returns an :class:`OnnxModel`: nodes,
  initializers (read-only arrays), graph inputs/outputs with dtypes and shapes, the default
  opset. Only the fields the engine needs are decoded; every other field (doc strings,
  metadata, value_info, training_info, unknown future fields) is skipped on reading and
  **copied byte for byte** on writing, so a model written back by :func:`model_bytes` keeps
  everything the user put in it.
* **Parameters are the floating-point initializers**; their names are the wire keys the
  federated protocol exchanges. Integer initializers (a Reshape's target shape...) are part of
  the structure, never exchanged.
* **Writing replaces only the parameter initializers.** :func:`model_bytes` re-encodes the
  ``TensorProto`` of each parameter (dims, data_type, name, raw_data, in field-number order as
  the reference serializer does) and copies every other field verbatim.
* **The fingerprint hashes structure, not weights**: a canonical JSON of opsets, nodes
  (op, domain, edges, attributes), graph inputs/outputs, initializer names, shapes and dtypes,
  and the *values* of non-parameter initializers. Node names, doc strings, producer fields and
  protobuf field order do not enter it.
* **Evaluation** prefers onnxruntime when it is installed (one ``InferenceSession`` built from a
  rewrite of the model in which the parameters are graph inputs, so new weights are fed per
  call without rebuilding the session) and otherwise runs the NumPy engine of
  :mod:`unus_edge.nn`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from unus_edge import _protobuf as pb
from unus_edge.errors import DataError, ModelError, ParameterError

__all__ = [
    "AttributeValue",
    "EvalResult",
    "Evaluator",
    "Node",
    "OnnxModel",
    "RawAttribute",
    "ValueInfo",
    "check_parameters",
    "encode_model",
    "fingerprint",
    "load_model",
    "model_bytes",
    "prepare_input",
    "read_parameters",
    "save_model",
]

logger = logging.getLogger(__name__)

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


class EvalResult(NamedTuple):
    """Mean softmax cross-entropy, accuracy and the number of examples evaluated."""

    loss: float
    accuracy: float
    num_examples: int


@dataclass(frozen=True, eq=False)
class OnnxModel:
    """A parsed, immutable ONNX model (arrays are read-only; copy them to change them).

    * ``name``: given to :func:`load_model`, else the file's stem, else the graph's name.
    * ``opset``: the version of the default ONNX domain; ``opset_imports`` has every domain.
    * ``nodes``: in file order; ``initializers``: every initializer by name, read-only.
    * ``inputs``/``outputs``: the graph's inputs that are not initializers, and its outputs.
    * ``parameter_names``: the floating-point initializers, in file order: trainable weights and
      buffers (BatchNorm statistics), exchanged as the wire keys of updates.
    * ``raw``: the bytes the model was parsed from (written back by :func:`model_bytes`).
    """

    name: str
    opset: int
    opset_imports: Mapping[str, int]
    ir_version: int
    nodes: tuple[Node, ...]
    initializers: Mapping[str, NDArray[Any]]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    parameter_names: tuple[str, ...]
    raw: bytes = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"OnnxModel(name={self.name!r}, opset={self.opset}, nodes={len(self.nodes)}, "
            f"parameters={len(self.parameter_names)})"
        )


# ----------------------------------------------------------------------------------- reading


def _text(value: pb.FieldValue, what: str) -> str:
    if not isinstance(value, memoryview):
        raise ModelError(f"corrupt_onnx: {what} is not a length-delimited field")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelError(f"corrupt_onnx: {what} is not valid UTF-8") from error


def _int(wire: int, value: pb.FieldValue, what: str) -> int:
    if wire != pb.VARINT or not isinstance(value, int):
        raise ModelError(f"corrupt_onnx: {what} is not a varint")
    return pb.to_signed64(value)


def _message(value: pb.FieldValue, what: str) -> memoryview:
    if not isinstance(value, memoryview):
        raise ModelError(f"corrupt_onnx: {what} is not an embedded message")
    return value


def _ints(wire: int, value: pb.FieldValue, what: str) -> list[int]:
    """A repeated int field, packed (LEN) or not (VARINT)."""
    if wire == pb.LEN:
        assert isinstance(value, memoryview)
        return [pb.to_signed64(v) for v in pb.packed_varints(value)]
    return [_int(wire, value, what)]


def _float32(wire: int, value: pb.FieldValue, what: str) -> float:
    if wire != pb.FIXED32 or not isinstance(value, int):
        raise ModelError(f"corrupt_onnx: {what} is not a fixed32 float")
    return float(np.array([value], dtype="<u4").view("<f4")[0])


def _parse_tensor(data: memoryview) -> tuple[str, NDArray[Any]]:
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
            code = _int(wire, value, "TensorProto.data_type")
        elif number == 8:
            name = _text(value, "TensorProto.name")
        elif number == 9:
            raw = _message(value, "TensorProto.raw_data")
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
            external = _int(wire, value, "TensorProto.data_location") == _EXTERNAL
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
            name = _text(value, "AttributeProto.name")
        elif number == 20:
            kind = _int(wire, value, "AttributeProto.type")
        elif number == 2:
            scalars[_A_FLOAT] = _float32(wire, value, "AttributeProto.f")
        elif number == 3:
            scalars[_A_INT] = _int(wire, value, "AttributeProto.i")
        elif number == 4:
            scalars[_A_STRING] = _text(value, "AttributeProto.s")
        elif number == 5:
            scalars[_A_TENSOR] = _parse_tensor(_message(value, "AttributeProto.t"))[1]
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
            strings.append(_text(value, "AttributeProto.strings"))
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


def _parse_node(data: memoryview) -> Node:
    inputs: list[str] = []
    outputs: list[str] = []
    name = op_type = domain = ""
    attributes: dict[str, AttributeValue | RawAttribute] = {}
    for number, _wire, value in pb.iter_fields(data):
        if number == 1:
            inputs.append(_text(value, "NodeProto.input"))
        elif number == 2:
            outputs.append(_text(value, "NodeProto.output"))
        elif number == 3:
            name = _text(value, "NodeProto.name")
        elif number == 4:
            op_type = _text(value, "NodeProto.op_type")
        elif number == 7:
            domain = _text(value, "NodeProto.domain")
        elif number == 5:
            key, attribute = _parse_attribute(_message(value, "NodeProto.attribute"))
            attributes[key] = attribute
    if not op_type:
        raise ModelError(f"corrupt_onnx: node {name!r} has no op_type")
    return Node(op_type, tuple(inputs), tuple(outputs), name, domain, MappingProxyType(attributes))


def _parse_value_info(data: memoryview) -> ValueInfo:
    name = ""
    dtype: np.dtype[Any] | None = None
    shape: tuple[int | str | None, ...] | None = None
    for number, _wire, value in pb.iter_fields(data):
        if number == 1:
            name = _text(value, "ValueInfoProto.name")
        elif number == 2:
            for t_number, _t_wire, t_value in pb.iter_fields(_message(value, "TypeProto")):
                if t_number != 1:  # only tensor types
                    continue
                for f_number, f_wire, f_value in pb.iter_fields(_message(t_value, "TypeProto.Tensor")):
                    if f_number == 1:
                        dtype = _DTYPES.get(_int(f_wire, f_value, "elem_type"))
                    elif f_number == 2:
                        shape = _parse_shape(_message(f_value, "TensorShapeProto"))
    return ValueInfo(name, None if dtype is None else dtype.newbyteorder("="), shape)


def _parse_shape(data: memoryview) -> tuple[int | str | None, ...]:
    dims: list[int | str | None] = []
    for number, _wire, value in pb.iter_fields(data):
        if number != 1:
            continue
        dim: int | str | None = None
        for d_number, d_wire, d_value in pb.iter_fields(_message(value, "Dimension")):
            if d_number == 1:
                dim = _int(d_wire, d_value, "dim_value")
            elif d_number == 2:
                dim = _text(d_value, "dim_param") or None
        dims.append(dim)
    return tuple(dims)


def _parse(data: bytes, name: str) -> OnnxModel:
    ir_version = 0
    opsets: dict[str, int] = {}
    graph: memoryview | None = None
    for number, wire, value in pb.iter_fields(data):
        if number == 1:
            ir_version = _int(wire, value, "ModelProto.ir_version")
        elif number == 7:
            graph = _message(value, "ModelProto.graph")
        elif number == 8:
            domain, version = "", 0
            for o_number, o_wire, o_value in pb.iter_fields(_message(value, "OperatorSetIdProto")):
                if o_number == 1:
                    domain = _text(o_value, "OperatorSetIdProto.domain")
                elif o_number == 2:
                    version = _int(o_wire, o_value, "OperatorSetIdProto.version")
            opsets["" if domain == "ai.onnx" else domain] = version
    if graph is None:
        raise ModelError("corrupt_onnx: no graph (is this an ONNX file?)", model=name)
    if "" not in opsets:
        raise ModelError("corrupt_onnx: no opset_import for the default ONNX domain", model=name)
    nodes: list[Node] = []
    initializers: dict[str, NDArray[Any]] = {}
    inputs: list[ValueInfo] = []
    outputs: list[ValueInfo] = []
    graph_name = ""
    for number, _wire, value in pb.iter_fields(graph):
        if number == 1:
            nodes.append(_parse_node(_message(value, "GraphProto.node")))
        elif number == 5:
            key, array = _parse_tensor(_message(value, "GraphProto.initializer"))
            if key in initializers:
                raise ModelError(f"corrupt_onnx: duplicate initializer {key!r}", model=name)
            initializers[key] = array
        elif number == 11:
            inputs.append(_parse_value_info(_message(value, "GraphProto.input")))
        elif number == 12:
            outputs.append(_parse_value_info(_message(value, "GraphProto.output")))
        elif number == 2:
            graph_name = _text(value, "GraphProto.name")
    parameter_names = tuple(k for k, v in initializers.items() if v.dtype.kind == "f")
    return OnnxModel(
        name=name or graph_name or "model",
        opset=opsets[""],
        opset_imports=MappingProxyType(opsets),
        ir_version=ir_version,
        nodes=tuple(nodes),
        initializers=MappingProxyType(initializers),
        inputs=tuple(i for i in inputs if i.name not in initializers),
        outputs=tuple(outputs),
        parameter_names=parameter_names,
        raw=data,
    )


def load_model(source: str | os.PathLike[str] | bytes, *, name: str = "") -> OnnxModel:
    """Parse an ONNX model from a path or from bytes; :class:`ModelError` when it is unusable."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        path = Path(source)
        name = name or path.stem
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ModelError(f"unreadable: {path}: {error.strerror or error}", model=name) from error
    try:
        return _parse(data, name)
    except ModelError as error:
        if error.model or not name:
            raise
        raise ModelError(error.reason, model=name) from error


# ----------------------------------------------------------------------------------- parameters


def read_parameters(model: OnnxModel) -> dict[str, NDArray[Any]]:
    """Fresh, writable copies of the floating-point initializers, keyed by initializer name."""
    return {key: np.array(model.initializers[key], copy=True) for key in model.parameter_names}


def check_parameters(model: OnnxModel, params: Mapping[str, NDArray[Any]]) -> None:
    """Raise :class:`ParameterError` naming the first key that is missing, extra or mismatched."""
    for key in model.parameter_names:
        if key not in params:
            raise ParameterError(key, "missing", model=model.name)
    for key in params:
        if key not in model.initializers or key not in model.parameter_names:
            raise ParameterError(key, "extra: the model has no such parameter", model=model.name)
    for key in model.parameter_names:
        expected = model.initializers[key]
        value = params[key]
        if not isinstance(value, np.ndarray):
            raise ParameterError(key, f"not an array but {type(value).__name__}", model=model.name)
        if value.shape != expected.shape:
            raise ParameterError(
                key, f"wrong shape {value.shape}, the model expects {expected.shape}", model=model.name
            )
        if value.dtype != expected.dtype:
            raise ParameterError(
                key, f"wrong dtype {value.dtype}, the model expects {expected.dtype}", model=model.name
            )


# ----------------------------------------------------------------------------------- writing


def _encode_tensor(name: str, array: NDArray[Any]) -> pb.Writer:
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
        writer.message(5, _encode_tensor("", value))
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


def _encode_node(node: Node) -> pb.Writer:
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


def _encode_value_info(info: ValueInfo) -> pb.Writer:
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


def encode_model(
    *,
    nodes: Sequence[Node],
    initializers: Mapping[str, NDArray[Any]],
    inputs: Sequence[ValueInfo],
    outputs: Sequence[ValueInfo],
    opset: int,
    graph_name: str,
    ir_version: int = 8,
    producer_name: str = "unus-edge",
) -> bytes:
    """Encode a single-graph model (used by the zoo); fields are written in field-number order."""
    graph = pb.Writer()
    for node in nodes:
        graph.message(1, _encode_node(node))
    graph.string(2, graph_name)
    for key, array in initializers.items():
        graph.message(5, _encode_tensor(key, array))
    for info in inputs:
        graph.message(11, _encode_value_info(info))
    for info in outputs:
        graph.message(12, _encode_value_info(info))
    opset_id = pb.Writer()
    opset_id.string(1, "")
    opset_id.varint(2, opset)
    model = pb.Writer()
    model.varint(1, ir_version)
    model.string(2, producer_name)
    model.message(7, graph)
    model.message(8, opset_id)
    return model.getvalue()


def _rewrite(model: OnnxModel, graph_fields: Iterator[tuple[int, int, pb.FieldValue]], out: pb.Writer) -> None:
    """Copy the model's top-level fields, writing ``graph_fields`` in place of its graph."""
    for number, wire, value in pb.iter_fields(model.raw):
        if number == 7:
            graph = pb.Writer()
            for g_number, g_wire, g_value in graph_fields:
                graph.raw(pb.encode_field_raw(g_number, g_wire, g_value))
            out.message(7, graph)
        else:
            out.raw(pb.encode_field_raw(number, wire, value))


def _graph_fields(model: OnnxModel) -> memoryview:
    for number, _wire, value in pb.iter_fields(model.raw):
        if number == 7:
            assert isinstance(value, memoryview)
            return value
    raise ModelError("corrupt_onnx: no graph", model=model.name)  # pragma: no cover - checked at load


def _initializer_name(data: memoryview) -> str:
    for number, _wire, value in pb.iter_fields(data):
        if number == 8:
            return _text(value, "TensorProto.name")
    return ""


def model_bytes(model: OnnxModel, params: Mapping[str, NDArray[Any]] | None = None) -> bytes:
    """The model as ONNX bytes carrying ``params`` (checked) instead of its own weights."""
    if params is None:
        return model.raw
    check_parameters(model, params)
    wanted = set(model.parameter_names)

    def fields() -> Iterator[tuple[int, int, pb.FieldValue]]:
        for number, wire, value in pb.iter_fields(_graph_fields(model)):
            if number == 5:
                assert isinstance(value, memoryview)
                key = _initializer_name(value)
                if key in wanted:
                    yield number, wire, memoryview(_encode_tensor(key, params[key]).getvalue())
                    continue
            yield number, wire, value

    out = pb.Writer()
    _rewrite(model, fields(), out)
    return out.getvalue()


def save_model(
    model: OnnxModel, path: str | os.PathLike[str], params: Mapping[str, NDArray[Any]] | None = None
) -> None:
    """Write :func:`model_bytes` to ``path`` (atomically: a temporary file, then a rename)."""
    target = Path(path)
    data = model_bytes(model, params)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        temporary.write_bytes(data)
        temporary.replace(target)
    except OSError as error:
        raise ModelError(f"unwritable: {target}: {error.strerror or error}", model=model.name) from error


def _parameters_as_inputs(model: OnnxModel) -> bytes:
    """The model with its parameters turned into graph inputs and a symbolic batch dimension."""
    wanted = set(model.parameter_names)
    first_input = model.inputs[0].name if model.inputs else ""

    def fields() -> Iterator[tuple[int, int, pb.FieldValue]]:
        listed: set[str] = set()
        for number, wire, value in pb.iter_fields(_graph_fields(model)):
            if number == 5:
                assert isinstance(value, memoryview)
                if _initializer_name(value) in wanted:
                    continue
            if number == 11:
                info = _parse_value_info(_message(value, "GraphProto.input"))
                listed.add(info.name)
                if info.name == first_input and info.shape:
                    info = info._replace(shape=("batch", *info.shape[1:]))
                    value = memoryview(_encode_value_info(info).getvalue())
            yield number, wire, value
        for key in model.parameter_names:
            if key not in listed:
                array = model.initializers[key]
                info = ValueInfo(key, array.dtype, tuple(array.shape))
                yield 11, pb.LEN, memoryview(_encode_value_info(info).getvalue())

    out = pb.Writer()
    _rewrite(model, fields(), out)
    return out.getvalue()


# ----------------------------------------------------------------------------------- fingerprint


def _canonical(value: object) -> object:
    if isinstance(value, RawAttribute):
        return {"raw_attribute": value.type, "sha256": hashlib.sha256(value.data).hexdigest()}
    if isinstance(value, np.ndarray):
        return _tensor_summary(value, with_values=True)
    if isinstance(value, float):
        return repr(float(np.float32(value)))
    if isinstance(value, tuple):
        return [_canonical(v) for v in value]
    return value


def _tensor_summary(array: NDArray[Any], *, with_values: bool) -> dict[str, object]:
    summary: dict[str, object] = {"dtype": array.dtype.str, "shape": list(array.shape)}
    if with_values:
        summary["sha256"] = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    return summary


def _value_info_summary(info: ValueInfo) -> list[object]:
    return [info.name, None if info.dtype is None else info.dtype.str, info.shape and list(info.shape)]


def fingerprint(model: OnnxModel) -> str:
    """``"sha256:<hex>"`` of the graph structure, independent of weight values and field order."""
    parameters = set(model.parameter_names)
    structure = {
        "opsets": sorted([domain, version] for domain, version in model.opset_imports.items()),
        "inputs": [_value_info_summary(i) for i in model.inputs],
        "outputs": [_value_info_summary(o) for o in model.outputs],
        "initializers": {
            key: _tensor_summary(array, with_values=key not in parameters)
            for key, array in sorted(model.initializers.items())
        },
        "nodes": [
            [
                node.op_type,
                node.domain,
                list(node.inputs),
                list(node.outputs),
                {key: _canonical(value) for key, value in sorted(node.attributes.items())},
            ]
            for node in model.nodes
        ],
    }
    text = json.dumps(structure, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------- evaluation


def prepare_input(model: OnnxModel, x: NDArray[Any]) -> NDArray[Any]:
    """``x`` (any shape with n rows) as a C-contiguous float32 batch of the model's input shape."""
    array = np.asarray(x)
    if array.ndim == 0:
        raise DataError("bad_shape", f"expected a batch of inputs for model {model.name}, got a scalar")
    if not model.inputs:
        raise ModelError("no_input: the graph has no non-initializer input", model=model.name)
    shape = model.inputs[0].shape
    if shape and all(isinstance(d, int) for d in shape[1:]):
        target = (array.shape[0], *(int(d) for d in shape[1:]))  # type: ignore[arg-type]
        if array.shape != target:
            if array.size != int(np.prod(target)):
                raise DataError(
                    "bad_shape", f"input {array.shape} cannot be reshaped to {target} for model {model.name}"
                )
            array = array.reshape(target)
    return np.ascontiguousarray(array, dtype=np.float32)


def softmax_cross_entropy(logits: NDArray[Any], labels: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Per-example cross-entropy (log-sum-exp, stable) and the softmax probabilities."""
    if logits.ndim != 2:
        raise ModelError(f"bad_output: cross-entropy needs (n, classes) logits, got {logits.shape}")
    labels = np.asarray(labels)
    if labels.shape != (logits.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError("bad_labels", f"expected {logits.shape[0]} integer labels, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise DataError("bad_labels", f"labels must lie in [0, {logits.shape[1]})")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(logits.shape[0])
    losses = np.log(total[:, 0]) - shifted[rows, labels]
    exp /= total
    return losses, exp


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    """The exception classes onnxruntime raises (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented", "RuntimeException")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


class Evaluator:
    """Predict and evaluate a model with any weights; the backend is built once."""

    def __init__(self, model: OnnxModel, *, backend: Literal["auto", "onnxruntime", "numpy"] = "auto") -> None:
        self.model = model
        self._session: Any = None
        self._graph: Any = None
        self._errors: tuple[type[Exception], ...] = ()
        if backend not in ("auto", "onnxruntime", "numpy"):
            raise ValueError(f"unknown backend {backend!r}")
        if backend in ("auto", "onnxruntime"):
            try:
                import onnxruntime  # optional accelerator, imported lazily
            except ImportError as error:
                if backend == "onnxruntime":
                    raise ModelError("onnxruntime is not installed", model=model.name) from error
                logger.debug("onnxruntime not installed: evaluating %s with numpy", model.name)
            else:
                self._errors = _onnxruntime_errors()
                options = onnxruntime.SessionOptions()
                options.log_severity_level = 3
                try:
                    self._session = onnxruntime.InferenceSession(
                        _parameters_as_inputs(model), options, providers=["CPUExecutionProvider"]
                    )
                except self._errors as error:
                    if backend == "onnxruntime":
                        raise ModelError(f"onnxruntime_failed: {error}", model=model.name) from error
                    logger.warning("onnxruntime cannot run %s (%s): evaluating with numpy", model.name, error)
                else:
                    self._input = self._session.get_inputs()[0].name
                    self.backend = "onnxruntime"
                    return
        from unus_edge.nn import Graph  # nn imports this module: no cycle at load

        self._graph = Graph(model)
        self.backend = "numpy"

    def predict(self, params: Mapping[str, NDArray[Any]], x: NDArray[Any], *, batch_size: int = 1000) -> NDArray[Any]:
        """The model's output (logits) for every row of ``x``, computed ``batch_size`` rows at a time."""
        check_parameters(self.model, params)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        inputs = prepare_input(self.model, x)
        chunks = []
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size]
            if self._session is not None:
                feeds = {key: np.asarray(params[key]) for key in self.model.parameter_names}
                feeds[self._input] = batch
                try:
                    chunks.append(self._session.run(None, feeds)[0])
                except self._errors as error:
                    raise ModelError(f"onnxruntime_failed: {error}", model=self.model.name) from error
            else:
                chunks.append(self._graph.forward(params, batch))
        if not chunks:
            return np.zeros((0,), np.float32)
        return np.concatenate(chunks)

    def evaluate(
        self, params: Mapping[str, NDArray[Any]], x: NDArray[Any], y: NDArray[Any], *, batch_size: int = 1000
    ) -> EvalResult:
        """Mean softmax cross-entropy and accuracy of the model on ``(x, y)``."""
        labels = np.asarray(y)
        if labels.shape[:1] != np.shape(x)[:1]:
            raise DataError("bad_labels", f"{np.shape(x)[0]} inputs but {labels.shape} labels")
        num_examples = int(labels.shape[0])
        if num_examples == 0:
            return EvalResult(0.0, 0.0, 0)
        loss_sum = 0.0
        correct = 0
        for start in range(0, num_examples, batch_size):
            logits = self.predict(params, np.asarray(x)[start : start + batch_size], batch_size=batch_size)
            batch_labels = labels[start : start + batch_size]
            losses, _ = softmax_cross_entropy(logits, batch_labels)
            loss_sum += float(losses.sum(dtype=np.float64))
            correct += int((logits.argmax(axis=1) == batch_labels).sum())
        return EvalResult(loss_sum / num_examples, correct / num_examples, num_examples)
