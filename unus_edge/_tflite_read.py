"""A ``.tflite`` read into an ONNX graph the engine trains (issue 15): :func:`from_tflite`.

Private to :mod:`unus_edge.tflite`. Decisions:

* **Same values, same names.** Every TFLite tensor becomes an ONNX value of the same shape and
  layout (a convolution's tensors stay NHWC): a ``CONV_2D`` or a pooling op becomes ``Transpose``
  to NCHW, the ONNX op, ``Transpose`` back. The extra transposes cost some time; they keep the
  import exact without reasoning about layouts across the graph. Weight tensors keep their
  TFLite names, which become the parameters' wire keys.
* **Weights stored small are widened at import**: a ``DEQUANTIZE`` of a constant (fp16, or int8
  with its scales) becomes a float32 initializer, so the engine trains them in fp32.
* ``PAD`` is folded into the convolution it feeds (the engine has no ``Pad``); ``SAME`` padding
  becomes explicit pads from the static input size. A fused ``RELU`` becomes a ``Relu`` node.
* Anything else (another builtin, a custom op, a fused activation other than ``RELU``, a
  ``PAD`` that feeds no convolution, several subgraphs) raises ``ModelError("tflite_unsupported")``
  naming the operator and the reason.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from unus_edge._onnx_model import OnnxModel, encode_model, load_model
from unus_edge._onnx_schema import Node, ValueInfo
from unus_edge.errors import ModelError

__all__ = ["from_tflite"]

_NUMPY = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64, 9: np.int8}


class _Reader:
    def __init__(self, content: bytes, name: str) -> None:
        from unus_edge.tflite import _schema

        self.s, self.name = _schema(), name
        model = self.s.ModelT.InitFromPackedBuf(bytearray(content), 0)
        if not model.subgraphs or len(model.subgraphs) != 1:
            raise ModelError("tflite_unsupported", "only single-subgraph models", model=name)
        self.model, self.graph = model, model.subgraphs[0]
        codes = {value: key for key, value in vars(self.s.BuiltinOperator).items() if not key.startswith("_")}
        self.ops = [codes.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM") if not code.customCode
                    else "CUSTOM" for code in model.operatorCodes]
        self.constants: dict[int, NDArray[Any]] = {}
        for index, tensor in enumerate(self.graph.tensors):
            data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
            if data is not None and len(data):
                dtype = _NUMPY.get(tensor.type)
                if dtype is None:
                    raise ModelError("tflite_unsupported", f"tensor {self.tensor_name(index)} of type {tensor.type}",
                                     model=name)
                raw = np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype)
                self.constants[index] = raw.reshape([int(d) for d in tensor.shape])
        self.nodes: list[Node] = []
        self.initializers: dict[str, NDArray[Any]] = {}
        self.padded: dict[int, tuple[int, NDArray[Any]]] = {}
        self.count = 0

    def tensor_name(self, index: int) -> str:
        name = self.graph.tensors[index].name
        return name.decode() if isinstance(name, bytes) else str(name)

    def node(self, op: str, inputs: list[str], attributes: dict[str, Any] | None = None, output: str = "") -> str:
        self.count += 1
        output = output or f"tflite.{self.count}.{op.lower()}"
        self.nodes.append(Node(op, tuple(inputs), (output,), f"tflite.{self.count}", "", attributes or {}))
        return output

    def constant(self, index: int, array: NDArray[Any] | None = None) -> str:
        name = self.tensor_name(index)
        self.initializers[name] = np.ascontiguousarray(self.constants[index] if array is None else array)
        return name

    def refuse(self, position: int, op: str, why: str) -> ModelError:
        return ModelError("tflite_unsupported", f"operator {position} ({op}): {why}", model=self.name)

    def activation(self, position: int, op: str, options: Any, value: str, output: str) -> None:
        fused = getattr(options, "fusedActivationFunction", 0) if options is not None else 0
        if fused == 0:
            self.node("Identity", [value], output=output)
        elif fused == 1:
            self.node("Relu", [value], output=output)
        else:
            raise self.refuse(position, op, f"fused activation {fused} (only RELU)")

    def spatial(self, op: str, x: str, inputs: list[str], attributes: dict[str, Any], output: str) -> None:
        nchw = self.node("Transpose", [x], {"perm": (0, 3, 1, 2)})
        out = self.node(op, [nchw, *inputs], attributes)
        self.node("Transpose", [out], {"perm": (0, 2, 3, 1)}, output=output)

    def build(self) -> OnnxModel:
        for position, operator in enumerate(self.graph.operators):
            self.operator(position, self.ops[operator.opcodeIndex], operator)
        for index in [*self.graph.outputs]:
            if index in self.padded:
                raise ModelError("tflite_unsupported", "a PAD that feeds no convolution", model=self.name)
        inputs = [self.value_info(index) for index in self.graph.inputs]
        outputs = [self.value_info(index) for index in self.graph.outputs]
        content = encode_model(nodes=self.nodes, initializers=self.initializers, inputs=inputs, outputs=outputs,
                               opset=13, graph_name=self.name)
        return load_model(content, name=self.name)

    def value_info(self, index: int) -> ValueInfo:
        tensor = self.graph.tensors[index]
        return ValueInfo(self.tensor_name(index), np.dtype(np.float32), ("N", *(int(d) for d in tensor.shape[1:])))

    def operator(self, position: int, op: str, operator: Any) -> None:
        inputs, outputs, options = list(operator.inputs), list(operator.outputs), operator.builtinOptions
        names = [self.tensor_name(i) if i >= 0 else "" for i in inputs]
        out = self.tensor_name(outputs[0])
        if op != "CONV_2D" and any(index in self.padded for index in inputs):
            raise self.refuse(position, op, "its input is a PAD, which only folds into a convolution")
        if op == "DEQUANTIZE":
            source = self.constants.get(inputs[0])
            if source is None:
                raise self.refuse(position, op, "only of constants (stored weights)")
            tensor = self.graph.tensors[inputs[0]]
            values = source.astype(np.float32)
            if tensor.quantization is not None and tensor.quantization.scale is not None:
                scale = np.asarray(tensor.quantization.scale, np.float32)
                given = tensor.quantization.zeroPoint
                zero = np.asarray([0] if given is None or len(given) == 0 else given, np.float32)
                axis = tensor.quantization.quantizedDimension if scale.size > 1 else 0
                shape = [1] * values.ndim
                shape[axis] = -1 if scale.size > 1 else 1
                values = (values - zero.reshape(shape)) * scale.reshape(shape)
            self.constants[outputs[0]] = values
        elif op == "FULLY_CONNECTED":
            if inputs[1] not in self.constants or len(self.graph.tensors[inputs[0]].shape) != 2:
                raise self.refuse(position, op, "needs a 2-D input and constant weights")
            gemm = [names[0], self.constant(inputs[1])]
            if len(inputs) > 2 and inputs[2] >= 0:
                gemm.append(self.constant(inputs[2]))
            self.activation(position, op, options, self.node("Gemm", gemm, {"transB": 1}), out)
        elif op == "CONV_2D":
            x, pads = inputs[0], np.zeros((4, 2), np.int64)
            if x in self.padded:
                x, pads = self.padded[x]
            weight = np.transpose(self.constants[inputs[1]], (0, 3, 1, 2))  # OHWI -> OIHW
            height, width = (int(d) for d in self.graph.tensors[x].shape[1:3])
            if getattr(options, "dilationHFactor", 1) != 1 or getattr(options, "dilationWFactor", 1) != 1:
                raise self.refuse(position, op, "dilations must be 1")
            strides = (options.strideH, options.strideW)
            padding = self.pads(options.padding, (height, width), weight.shape[2:], strides, pads)
            conv = [self.tensor_name(x), self.constant(inputs[1], weight)]
            if len(inputs) > 2 and inputs[2] >= 0:
                conv.append(self.constant(inputs[2]))
            temporary = f"{out}.linear"
            self.spatial("Conv", conv[0], conv[1:], {"kernel_shape": tuple(weight.shape[2:]), "strides": strides,
                                                   "pads": padding}, temporary)
            self.activation(position, op, options, temporary, out)
        elif op in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            height, width = (int(d) for d in self.graph.tensors[inputs[0]].shape[1:3])
            kernel, strides = (options.filterHeight, options.filterWidth), (options.strideH, options.strideW)
            padding = self.pads(options.padding, (height, width), kernel, strides, np.zeros((4, 2), np.int64))
            temporary = f"{out}.linear"
            self.spatial("MaxPool" if op == "MAX_POOL_2D" else "AveragePool", names[0], [],
                         {"kernel_shape": kernel, "strides": strides, "pads": padding}, temporary)
            self.activation(position, op, options, temporary, out)
        elif op == "PAD":
            self.padded[outputs[0]] = (inputs[0], self.constants[inputs[1]].astype(np.int64))
        elif op in ("RELU", "LOGISTIC", "TANH"):
            self.node({"RELU": "Relu", "LOGISTIC": "Sigmoid", "TANH": "Tanh"}[op], [names[0]], output=out)
        elif op == "SOFTMAX":
            if abs(getattr(options, "beta", 1.0) - 1.0) > 1e-12:
                raise self.refuse(position, op, "beta must be 1")
            self.node("Softmax", [names[0]], {"axis": -1}, output=out)
        elif op == "TRANSPOSE":
            perm = tuple(int(v) for v in self.constants[inputs[1]])
            self.node("Transpose", [names[0]], {"perm": perm}, output=out)
        elif op == "RESHAPE":
            shape = [int(d) for d in self.graph.tensors[outputs[0]].shape]
            target = f"{out}.shape"
            self.initializers[target] = np.asarray([-1, *shape[1:]], np.int64)
            self.node("Reshape", [names[0], target], output=out)
        elif op == "ADD":
            operands = [self.constant(i) if i in self.constants else self.tensor_name(i) for i in inputs]
            self.activation(position, op, options, self.node("Add", operands), out)
        else:
            raise self.refuse(position, op, "not among the operators read (FULLY_CONNECTED, CONV_2D, pooling, "
                              "PAD, DEQUANTIZE, RELU, LOGISTIC, TANH, SOFTMAX, TRANSPOSE, RESHAPE, ADD)")

    def pads(self, padding: int, size: tuple[int, int], kernel: Any, strides: tuple[int, int],
             explicit: NDArray[Any]) -> tuple[int, int, int, int]:
        """ONNX pads (top, left, bottom, right) for TFLite's padding, with a folded PAD's added."""
        begin, end = [int(explicit[1][0]), int(explicit[2][0])], [int(explicit[1][1]), int(explicit[2][1])]
        if padding == self.s.Padding.SAME:
            for axis in (0, 1):
                extent = size[axis] + begin[axis] + end[axis]
                total = max((-(-extent // strides[axis]) - 1) * strides[axis] + int(kernel[axis]) - extent, 0)
                begin[axis] += total // 2
                end[axis] += total - total // 2
        return begin[0], begin[1], end[0], end[1]


def from_tflite(source: bytes | str | os.PathLike[str], *, name: str = "") -> OnnxModel:
    """The ``.tflite`` at ``source`` (a path, or its bytes) as an ONNX model (see the decisions)."""
    if isinstance(source, bytes):
        content = source
    else:
        path = Path(source)
        try:
            content = path.read_bytes()
        except OSError as error:
            raise ModelError("unreadable", f"{path}: {error.strerror}") from error
        name = name or path.stem
    try:
        return _Reader(content, name or "tflite").build()
    except (ValueError, IndexError, KeyError, AttributeError, TypeError, struct.error) as error:
        raise ModelError("tflite_invalid", f"cannot read the flatbuffer: {error}", model=name) from error
