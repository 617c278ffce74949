"""The parsed ONNX model: loading, parameters, writing back, and the structure fingerprint.

Private to :mod:`unus_edge.onnx_io`, which re-exports its public names and documents the design: an
immutable :class:`OnnxModel` parsed without the ``onnx`` package (the message-level schema is
:mod:`unus_edge._onnx_schema`), parameters as the floating-point initializers, writing that
replaces only those initializers and copies every other field byte for byte, and a
fingerprint of the structure, not the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from unus_edge import _protobuf as pb
from unus_edge._onnx_schema import (
    Node,
    RawAttribute,
    ValueInfo,
    encode_node,
    encode_tensor,
    encode_value_info,
    parse_node,
    parse_tensor,
    parse_value_info,
    read_int,
    read_message,
    read_text,
)
from unus_edge.errors import ModelError, ParameterError

__all__ = [
    "OnnxModel",
    "check_parameters",
    "encode_model",
    "fingerprint",
    "load_model",
    "model_bytes",
    "parameters_as_inputs",
    "read_parameters",
    "save_model",
]


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


def _parse(data: bytes, name: str) -> OnnxModel:
    ir_version = 0
    opsets: dict[str, int] = {}
    graph: memoryview | None = None
    for number, wire, value in pb.iter_fields(data):
        if number == 1:
            ir_version = read_int(wire, value, "ModelProto.ir_version")
        elif number == 7:
            graph = read_message(value, "ModelProto.graph")
        elif number == 8:
            domain, version = "", 0
            for o_number, o_wire, o_value in pb.iter_fields(read_message(value, "OperatorSetIdProto")):
                if o_number == 1:
                    domain = read_text(o_value, "OperatorSetIdProto.domain")
                elif o_number == 2:
                    version = read_int(o_wire, o_value, "OperatorSetIdProto.version")
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
            nodes.append(parse_node(read_message(value, "GraphProto.node")))
        elif number == 5:
            key, array = parse_tensor(read_message(value, "GraphProto.initializer"))
            if key in initializers:
                raise ModelError(f"corrupt_onnx: duplicate initializer {key!r}", model=name)
            initializers[key] = array
        elif number == 11:
            inputs.append(parse_value_info(read_message(value, "GraphProto.input")))
        elif number == 12:
            outputs.append(parse_value_info(read_message(value, "GraphProto.output")))
        elif number == 2:
            graph_name = read_text(value, "GraphProto.name")
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
    path: Path | None = None
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
        if path is None and (error.model or not name):
            raise
        detail = error.detail
        if error.reason in _NOT_PROTOBUF:  # the bytes are not a protobuf message at all
            detail = f"{detail}; is it an ONNX file?" if detail else "is it an ONNX file?"
        if path is not None:
            detail = f"{path}: {detail}" if detail else str(path)
        raise ModelError(error.reason, detail, model=error.model or name) from error


_NOT_PROTOBUF = frozenset({"truncated", "bad_varint", "bad_wire_type"})


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
        graph.message(1, encode_node(node))
    graph.string(2, graph_name)
    for key, array in initializers.items():
        graph.message(5, encode_tensor(key, array))
    for info in inputs:
        graph.message(11, encode_value_info(info))
    for info in outputs:
        graph.message(12, encode_value_info(info))
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
            return read_text(value, "TensorProto.name")
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
                    yield number, wire, memoryview(encode_tensor(key, params[key]).getvalue())
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


def parameters_as_inputs(model: OnnxModel) -> bytes:
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
                info = parse_value_info(read_message(value, "GraphProto.input"))
                listed.add(info.name)
                if info.name == first_input and info.shape:
                    info = info._replace(shape=("batch", *info.shape[1:]))
                    value = memoryview(encode_value_info(info).getvalue())
            yield number, wire, value
        for key in model.parameter_names:
            if key not in listed:
                array = model.initializers[key]
                info = ValueInfo(key, array.dtype, tuple(array.shape))
                yield 11, pb.LEN, memoryview(encode_value_info(info).getvalue())

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


def _little_endian(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The same type in little-endian order (ONNX's), so a big-endian host computes the same hash."""
    return dtype.newbyteorder("<")


def _tensor_summary(array: NDArray[Any], *, with_values: bool) -> dict[str, object]:
    dtype = _little_endian(array.dtype)
    summary: dict[str, object] = {"dtype": dtype.str, "shape": list(array.shape)}
    if with_values:
        summary["sha256"] = hashlib.sha256(np.ascontiguousarray(array, dtype=dtype).tobytes()).hexdigest()
    return summary


def _value_info_summary(info: ValueInfo) -> list[object]:
    dtype = None if info.dtype is None else _little_endian(info.dtype).str
    return [info.name, dtype, info.shape and list(info.shape)]


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
