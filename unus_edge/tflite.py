"""TFLite without TensorFlow: an ONNX model with its weights written as a ``.tflite``, and run by LiteRT.

:func:`to_tflite` writes the flatbuffer with ``ai_edge_litert``'s generated schema and the
``flatbuffers`` package (both come with the ``litert`` extra, ``pip install
'unus-edge[litert]'``); :class:`LiteRTRunner` runs one with ``ai_edge_litert``'s
``Interpreter``, the maintained successor of tflite-runtime (which fails under numpy 2).

Decisions:

* **Exact, or refused.** Each ONNX node maps to TFLite builtins with the same arithmetic
  (``Gemm``/``MatMul`` to ``FULLY_CONNECTED``, ``Conv`` to ``CONV_2D``...). A node, attribute
  or shape outside :data:`SUPPORTED` raises ``ModelError("tflite_unsupported")`` naming the
  node and what is unsupported, never a file that computes something else.
* **Layout.** TFLite convolutions are NHWC, ONNX's NCHW. The input stays NCHW, as the ONNX
  model's, and a ``TRANSPOSE`` turns it NHWC before the first convolution; convolution
  weights are written OHWI; before a ``Flatten``/``Reshape`` or at an output the tensor is
  transposed back, so the flattened order, and so the following weights, are ONNX's.
* **Batch.** Tensors are written with batch 1 and a ``shape_signature`` of -1 in the batch
  dimension; the runner resizes the input to each batch.
* **Weights** of ``FULLY_CONNECTED`` and ``CONV_2D`` in fp32, fp16 or int8 (symmetric, per
  output channel), the last two stored small and widened by a ``DEQUANTIZE`` op, so the
  compute stays fp32 (LiteRT refuses an fp16 weight fed to a float32 ``FULLY_CONNECTED``).
  Biases stay fp32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from unus_edge._onnx_model import OnnxModel, check_parameters
from unus_edge.errors import ModelError

__all__ = ["SUPPORTED", "WEIGHT_FORMATS", "LiteRTRunner", "from_tflite", "litert_available", "to_tflite"]

SUPPORTED = ("Add", "AveragePool", "Conv", "Dropout", "Flatten", "Gemm", "Identity", "MatMul", "MaxPool", "Relu",
             "Reshape", "Sigmoid", "Softmax", "Tanh")
"""The ONNX ops :func:`to_tflite` writes."""

WEIGHT_FORMATS = ("fp32", "fp16", "int8")
WeightFormat = Literal["fp32", "fp16", "int8"]

_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def litert_available() -> bool:
    """Whether ``ai_edge_litert`` (and ``flatbuffers``) can be imported."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        import flatbuffers  # noqa: F401
    except ImportError:
        return False
    return True


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as error:
        raise ModelError("litert_missing", "writing or running .tflite needs ai-edge-litert: "
                         "pip install 'unus-edge[litert]'") from error
    return schema_py_generated


class _Value:
    """A tensor of the TFLite graph: its index, its shape (batch 1) and its layout."""

    def __init__(self, index: int, shape: tuple[int, ...], nhwc: bool = False) -> None:
        self.index, self.shape, self.nhwc = index, shape, nhwc


class _Writer:
    def __init__(self, model: OnnxModel, params: Mapping[str, NDArray[Any]], weights: WeightFormat) -> None:
        self.s = _schema()
        self.model, self.weights = model, weights
        self.constants = {**{k: np.asarray(v) for k, v in model.initializers.items()},
                          **{k: np.asarray(v) for k, v in params.items()}}
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [self.s.BufferT()]  # buffer 0: the empty sentinel
        self.codes: dict[int, int] = {}
        self.operators: list[Any] = []
        self.values: dict[str, _Value] = {}

    # ------------------------------------------------------------------ building blocks

    def tensor(self, name: str, shape: Sequence[int], dtype: int | None = None, data: NDArray[Any] | None = None,
               *, batch: bool = True, quantization: Any = None) -> int:
        t = self.s.TensorT()
        t.name, t.shape = name, list(shape)
        t.type = self.s.TensorType.FLOAT32 if dtype is None else dtype
        if data is not None:
            buffer = self.s.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        else:
            t.buffer = 0
            if batch and shape:
                t.shapeSignature = [-1, *list(shape)[1:]]
        t.quantization = quantization
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, name: str, array: NDArray[Any]) -> int:
        array = np.asarray(array)
        kinds = {np.dtype(np.float32): self.s.TensorType.FLOAT32, np.dtype(np.int32): self.s.TensorType.INT32}
        return self.tensor(name, array.shape, kinds[array.dtype], array)

    def weight(self, name: str, array: NDArray[Any]) -> int:
        """A weight tensor in the chosen format (output channels on axis 0), as a float32 tensor."""
        array = np.ascontiguousarray(array, np.float32)
        if self.weights == "fp32":
            return self.constant(name, array)
        if self.weights == "fp16":
            stored = self.tensor(f"{name}.fp16", array.shape, self.s.TensorType.FLOAT16, array.astype(np.float16))
        else:
            flat = np.abs(array.reshape(array.shape[0], -1)).max(axis=1)
            scale = np.where(flat > 0, flat / 127.0, 1.0).astype(np.float32)
            shaped = scale.reshape((-1,) + (1,) * (array.ndim - 1))
            q = np.clip(np.rint(array / shaped), -127, 127).astype(np.int8)
            quantization = self.s.QuantizationParametersT()
            quantization.scale, quantization.zeroPoint = [float(v) for v in scale], [0] * len(scale)
            quantization.quantizedDimension = 0
            stored = self.tensor(f"{name}.int8", array.shape, self.s.TensorType.INT8, q, quantization=quantization)
        widened = self.tensor(name, array.shape, batch=False)
        self.op("DEQUANTIZE", [stored], [widened])
        return widened

    def op(self, code: str, inputs: Sequence[int], outputs: Sequence[int], options: Any = None,
           options_type: str = "") -> None:
        builtin = getattr(self.s.BuiltinOperator, code)
        self.codes.setdefault(builtin, len(self.codes))
        operator = self.s.OperatorT()
        operator.opcodeIndex = self.codes[builtin]
        operator.inputs, operator.outputs = list(inputs), list(outputs)
        if options is not None:
            operator.builtinOptionsType = getattr(self.s.BuiltinOptions, options_type)
            operator.builtinOptions = options
        self.operators.append(operator)

    def emit(self, code: str, name: str, source: _Value, shape: tuple[int, ...], *, nhwc: bool,
             extra: Sequence[int] = (), options: Any = None, options_type: str = "") -> _Value:
        out = self.tensor(name, shape)
        self.op(code, [source.index, *extra], [out], options, options_type)
        return _Value(out, shape, nhwc)

    def transposed(self, value: _Value, name: str, to_nhwc: bool) -> _Value:
        perm = _TO_NHWC if to_nhwc else _TO_NCHW
        shape = tuple(value.shape[p] for p in perm)
        return self.emit("TRANSPOSE", f"{name}.{'nhwc' if to_nhwc else 'nchw'}", value, shape, nhwc=to_nhwc,
                         extra=[self.constant(f"{name}.perm", np.asarray(perm, np.int32))])

    def plain(self, value: _Value, name: str) -> _Value:
        return self.transposed(value, name, to_nhwc=False) if value.nhwc else value

    # ------------------------------------------------------------------ the graph

    def build(self) -> bytes:
        import flatbuffers

        s = self.s
        if len(self.model.inputs) != 1:
            raise ModelError("tflite_unsupported", f"{len(self.model.inputs)} graph inputs (one is supported)",
                             model=self.model.name)
        source = self.model.inputs[0]
        dims = source.shape or ()
        shape = (1, *(int(d) for d in dims[1:] if isinstance(d, int)))
        if not dims or len(shape) != len(dims):
            raise ModelError("tflite_unsupported", f"input {source.name} has symbolic dimensions beyond the batch",
                             model=self.model.name)
        inputs = [self.tensor(source.name, shape)]
        self.values[source.name] = _Value(inputs[0], shape)
        for node in self.model.nodes:
            self.node(node)
        outputs = []
        for output in self.model.outputs:
            value = self.values[output.name]
            if value.nhwc:
                value = self.transposed(value, output.name, to_nhwc=False)
            outputs.append(value.index)
        subgraph = s.SubGraphT()
        subgraph.tensors, subgraph.inputs, subgraph.outputs = self.tensors, inputs, outputs
        subgraph.operators, subgraph.name = self.operators, "main"
        codes = sorted(self.codes, key=self.codes.__getitem__)
        tflite = s.ModelT()
        tflite.version, tflite.description = 3, f"unus-edge: {self.model.name}"
        tflite.operatorCodes = []
        for builtin in codes:
            code = s.OperatorCodeT()
            code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
            tflite.operatorCodes.append(code)
        tflite.subgraphs, tflite.buffers = [subgraph], self.buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(tflite.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def refuse(self, node: Any, why: str) -> ModelError:
        return ModelError("tflite_unsupported", f"node {node.name or node.outputs[0]} ({node.op_type}): {why}",
                          model=self.model.name)

    def node(self, node: Any) -> None:
        s, a, op = self.s, node.attributes, node.op_type
        if op not in SUPPORTED or node.domain not in ("", "ai.onnx"):
            raise self.refuse(node, f"not among the ops written to TFLite ({', '.join(SUPPORTED)})")
        name, out = node.name or node.outputs[0], node.outputs[0]
        if op in ("Identity", "Dropout"):
            self.values[out] = self.values[node.inputs[0]]
            return
        x = self.values.get(node.inputs[0])
        if x is None:
            raise self.refuse(node, f"input {node.inputs[0]} is a constant or unknown")
        if op in ("Gemm", "MatMul"):
            if op == "Gemm" and (a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0)):
                raise self.refuse(node, "alpha, beta and transA must be 1, 1 and 0")
            w = self.constants.get(node.inputs[1])
            if w is None or w.ndim != 2 or len(x.shape) != 2:
                raise self.refuse(node, "needs a 2-D input and a constant 2-D weight")
            w = w if (op == "Gemm" and a.get("transB", 0)) else w.T  # (out, in)
            bias = -1
            if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2]:
                b = self.constants.get(node.inputs[2])
                if b is None or b.size != w.shape[0]:
                    raise self.refuse(node, "the bias must be a constant of one value per output")
                bias = self.constant(node.inputs[2], b.reshape(-1).astype(np.float32))
            options = s.FullyConnectedOptionsT()
            self.values[out] = self.emit("FULLY_CONNECTED", out, self.plain(x, name), (1, w.shape[0]), nhwc=False,
                                         extra=[self.weight(node.inputs[1], w), bias], options=options,
                                         options_type="FullyConnectedOptions")
        elif op == "Add":
            other = self.constants.get(node.inputs[1])
            if other is None or x.nhwc or np.broadcast_shapes(other.shape, x.shape) != x.shape:
                raise self.refuse(node, "only a constant that broadcasts to a non-convolution input")
            self.values[out] = self.emit("ADD", out, x, x.shape, nhwc=False,
                                         extra=[self.constant(node.inputs[1], other.astype(np.float32))],
                                         options=s.AddOptionsT(), options_type="AddOptions")
        elif op in ("Relu", "Sigmoid", "Tanh"):
            code = {"Relu": "RELU", "Sigmoid": "LOGISTIC", "Tanh": "TANH"}[op]
            self.values[out] = self.emit(code, out, x, x.shape, nhwc=x.nhwc)
        elif op == "Softmax":
            if a.get("axis", -1) not in (-1, len(x.shape) - 1) or x.nhwc:
                raise self.refuse(node, "only over the last axis")
            options = s.SoftmaxOptionsT()
            options.beta = 1.0
            self.values[out] = self.emit("SOFTMAX", out, x, x.shape, nhwc=False, options=options,
                                         options_type="SoftmaxOptions")
        elif op in ("Flatten", "Reshape"):
            self.values[out] = self.reshape(node, x)
        else:
            self.values[out] = self.spatial(node, x)

    def reshape(self, node: Any, x: _Value) -> _Value:
        flat = self.plain(x, node.name or node.outputs[0])
        if node.op_type == "Flatten":
            axis = node.attributes.get("axis", 1)
            if axis != 1:
                raise self.refuse(node, "only axis 1")
            target: tuple[int, ...] = (1, int(np.prod(flat.shape[1:])))
        else:
            given = self.constants.get(node.inputs[1])
            if given is None:
                raise self.refuse(node, "the shape must be a constant")
            dims = [int(d) for d in given.reshape(-1)]
            dims = [flat.shape[i] if d == 0 and i < len(flat.shape) else d for i, d in enumerate(dims)]
            rest = dims[1:]
            if not dims or dims[0] not in (-1, 1) or rest.count(-1) > (dims[0] == 1):
                raise self.refuse(node, "the first dimension must stay the batch")
            if -1 in rest:
                known = int(np.prod([d for d in rest if d != -1]))
                rest[rest.index(-1)] = int(np.prod(flat.shape[1:])) // known
            target = (1, *rest)
            if int(np.prod(target)) != int(np.prod(flat.shape)):
                raise self.refuse(node, f"cannot reshape {flat.shape} to {target}")
        shape = self.constant(f"{node.outputs[0]}.shape", np.asarray([-1, *target[1:]], np.int32))
        return self.emit("RESHAPE", node.outputs[0], flat, target, nhwc=False, extra=[shape])

    def spatial(self, node: Any, x: _Value) -> _Value:
        """``Conv``, ``MaxPool`` and ``AveragePool`` over NCHW inputs, written NHWC."""
        s, a, op, out = self.s, node.attributes, node.op_type, node.outputs[0]
        if len(x.shape) != 4:
            raise self.refuse(node, f"only 2-D spatial inputs (N, C, H, W), got rank {len(x.shape)}")
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or a.get("ceil_mode", 0):
            raise self.refuse(node, "auto_pad and ceil_mode are not supported")
        if any(d != 1 for d in a.get("dilations", (1, 1))):
            raise self.refuse(node, "dilations must be 1")
        nhwc = x if x.nhwc else self.transposed(x, node.name or out, to_nhwc=True)
        _, height, width, channels = nhwc.shape
        strides = tuple(a.get("strides", (1, 1)))
        pads = tuple(a.get("pads", (0, 0, 0, 0)))
        if op == "Conv":
            w = self.constants.get(node.inputs[1])
            if w is None or w.ndim != 4 or a.get("group", 1) != 1 or w.shape[1] != channels:
                raise self.refuse(node, "needs a constant (O, C, kH, kW) weight and group 1")
            kernel = w.shape[2:]
        else:
            kernel = tuple(a["kernel_shape"])
            if any(pads):
                raise self.refuse(node, "pooling with pads is not supported")
        if any(pads):
            paddings = np.asarray([[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]], np.int32)
            height, width = height + pads[0] + pads[2], width + pads[1] + pads[3]
            nhwc = self.emit("PAD", f"{out}.pad", nhwc, (1, height, width, channels), nhwc=True,
                             extra=[self.constant(f"{out}.paddings", paddings)])
        out_h, out_w = (height - kernel[0]) // strides[0] + 1, (width - kernel[1]) // strides[1] + 1
        if op == "Conv":
            bias = -1
            if len(node.inputs) > 2 and node.inputs[2]:
                bias = self.constant(node.inputs[2], np.asarray(self.constants[node.inputs[2]], np.float32))
            options = s.Conv2DOptionsT()
            options.padding, options.strideH, options.strideW = s.Padding.VALID, strides[0], strides[1]
            options.dilationHFactor = options.dilationWFactor = 1
            assert w is not None  # checked above
            weight = self.weight(node.inputs[1], np.transpose(w, (0, 2, 3, 1)))
            return self.emit("CONV_2D", out, nhwc, (1, out_h, out_w, w.shape[0]), nhwc=True,
                             extra=[weight, bias], options=options, options_type="Conv2DOptions")
        options = s.Pool2DOptionsT()
        options.padding, options.strideH, options.strideW = s.Padding.VALID, strides[0], strides[1]
        options.filterHeight, options.filterWidth = kernel
        code = "MAX_POOL_2D" if op == "MaxPool" else "AVERAGE_POOL_2D"
        return self.emit(code, out, nhwc, (1, out_h, out_w, channels), nhwc=True, options=options,
                         options_type="Pool2DOptions")


def to_tflite(model: OnnxModel, params: Mapping[str, NDArray[Any]], *, weights: WeightFormat = "fp32") -> bytes:
    """``model`` with the weights ``params`` as a ``.tflite`` flatbuffer (see the module's decisions)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    check_parameters(model, params)
    return _Writer(model, params, weights).build()


class LiteRTRunner:
    """One LiteRT ``Interpreter`` over a ``.tflite``; :meth:`run` takes any batch size."""

    def __init__(self, content: bytes | str | os.PathLike[str], *, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as error:
            raise ModelError("litert_missing", "running .tflite needs ai-edge-litert: "
                             "pip install 'unus-edge[litert]'") from error
        try:
            if isinstance(content, bytes):
                self._interpreter = Interpreter(model_content=content, num_threads=threads)
            else:
                self._interpreter = Interpreter(model_path=os.fspath(content), num_threads=threads)
        except (ValueError, RuntimeError) as error:
            raise ModelError("tflite_invalid", str(error)) from error
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._shape: tuple[int, ...] = ()

    def run(self, x: NDArray[Any]) -> NDArray[Any]:
        """The model's first output for the batch ``x`` (float32, the input tensor's shape past the batch)."""
        batch = np.ascontiguousarray(x, np.float32)
        if batch.shape != self._shape:
            try:
                self._interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
                self._interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as error:
                raise ModelError("tflite_failed", f"input {batch.shape}: {error}") from error
            self._shape = batch.shape
        try:
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
        except (ValueError, RuntimeError) as error:
            raise ModelError("tflite_failed", str(error)) from error
        return np.array(self._interpreter.get_tensor(self._output["index"]))


def from_tflite(source: bytes | str | os.PathLike[str], *, name: str = "") -> OnnxModel:
    """A ``.tflite`` (a path or its bytes) as an ONNX model the engine trains (:mod:`unus_edge._tflite_read`)."""
    from unus_edge._tflite_read import from_tflite as read

    return read(source, name=name)
