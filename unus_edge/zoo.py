"""The model zoo: the MNIST models of McMahan et al. (2017), built as ONNX without the onnx package.

=========== ======================================================== ==========
name        architecture                                             parameters
=========== ======================================================== ==========
logreg      784 -> 10 (multinomial logistic regression)                   7,850
mnist_2nn   784 -> 200 -> 200 -> 10, ReLU ("2NN")                       199,210
mnist_cnn   conv5x5x32 same, ReLU, maxpool 2 / conv5x5x64 same, ReLU,  1,663,370
            maxpool 2 / FC 512, ReLU / FC 10 ("CNN")
=========== ======================================================== ==========

Design decisions:

* **Opset 13** (IR version 8): supported by onnxruntime 1.32 and by the engine's parser, and the
  first opset with today's Softmax/Dropout semantics. Every op used here is unchanged from 13 to
  the latest opsets.
* **PyTorch layout and names**, so a ``torch.nn`` twin can load the same weights:
  ``Gemm(transB=1)`` with ``fc1.weight`` of shape (out, in), ``Conv`` weights (M, C, kh, kw),
  initializer names ``conv1.weight``, ``fc2.bias``... These names are the wire keys.
* Input ``x`` is float32 with a symbolic batch dimension ``N`` (``[N, 784]`` for the dense
  models, ``[N, 1, 28, 28]`` for the CNN); the output ``logits`` is ``[N, 10]``.
* **Initialisation** is seeded with a NumPy ``Generator``: He-normal (``std = sqrt(2/fan_in)``)
  for layers followed by a ReLU, Glorot-uniform for the output layer, zero biases. The same name
  and seed give identical bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from unus_edge.errors import ModelError
from unus_edge.onnx_io import Node, OnnxModel, ValueInfo, encode_model, load_model

__all__ = ["OPSET", "ZOO_NAMES", "build_mlp", "build_model", "build_zoo", "resolve_model"]

OPSET = 13
ZOO_NAMES: tuple[str, ...] = ("logreg", "mnist_2nn", "mnist_cnn")

_F32 = np.dtype(np.float32)


class _Builder:
    """Accumulates nodes and seeded initializers for one model."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Node] = []
        self.initializers: dict[str, NDArray[Any]] = {}

    def he_normal(self, key: str, shape: tuple[int, ...], fan_in: int) -> str:
        std = math.sqrt(2.0 / fan_in)
        self.initializers[key] = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        return key

    def glorot_uniform(self, key: str, shape: tuple[int, ...], fan_in: int, fan_out: int) -> str:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        self.initializers[key] = self.rng.uniform(-limit, limit, shape).astype(np.float32)
        return key

    def zeros(self, key: str, shape: tuple[int, ...]) -> str:
        self.initializers[key] = np.zeros(shape, np.float32)
        return key

    def node(self, op_type: str, name: str, inputs: tuple[str, ...], output: str = "", **attributes: Any) -> str:
        output = output or f"{name}.out"
        self.nodes.append(Node(op_type, inputs, (output,), name, "", attributes))
        return output

    def dense(self, name: str, x: str, fan_in: int, fan_out: int, *, relu: bool, output: str = "") -> str:
        if relu:
            weight = self.he_normal(f"{name}.weight", (fan_out, fan_in), fan_in)
        else:
            weight = self.glorot_uniform(f"{name}.weight", (fan_out, fan_in), fan_in, fan_out)
        bias = self.zeros(f"{name}.bias", (fan_out,))
        y = self.node("Gemm", name, (x, weight, bias), output=output, transB=1)
        return self.node("Relu", f"{name}.relu", (y,)) if relu else y

    def conv_relu_pool(self, name: str, x: str, channels: int, filters: int) -> str:
        weight = self.he_normal(f"{name}.weight", (filters, channels, 5, 5), channels * 25)
        bias = self.zeros(f"{name}.bias", (filters,))
        y = self.node("Conv", name, (x, weight, bias), kernel_shape=(5, 5), pads=(2, 2, 2, 2), strides=(1, 1))
        y = self.node("Relu", f"{name}.relu", (y,))
        return self.node("MaxPool", f"{name}.pool", (y,), kernel_shape=(2, 2), strides=(2, 2))

    def finish(self, name: str, input_shape: tuple[int | str, ...], *, outputs: int = 10,
               output: str = "logits") -> bytes:
        return encode_model(
            nodes=self.nodes,
            initializers=self.initializers,
            inputs=[ValueInfo("x", _F32, input_shape)],
            outputs=[ValueInfo(output, _F32, ("N", outputs))],
            opset=OPSET,
            graph_name=name,
        )


def _logreg(builder: _Builder) -> bytes:
    builder.dense("fc", "x", 784, 10, relu=False, output="logits")
    return builder.finish("logreg", ("N", 784))


def _mlp(builder: _Builder, hidden: Sequence[int], name: str, *, inputs: int = 784, outputs: int = 10,
         output: str = "logits") -> bytes:
    """inputs -> hidden... -> outputs with ReLU: layers ``fc1``... as the 2NN's."""
    h, width = "x", inputs
    for index, size in enumerate(hidden, start=1):
        h, width = builder.dense(f"fc{index}", h, width, size, relu=True), size
    builder.dense(f"fc{len(hidden) + 1}", h, width, outputs, relu=False, output=output)
    return builder.finish(name, ("N", inputs), outputs=outputs, output=output)


def _mnist_2nn(builder: _Builder) -> bytes:
    return _mlp(builder, (200, 200), "mnist_2nn")


def _mnist_cnn(builder: _Builder) -> bytes:
    h = builder.conv_relu_pool("conv1", "x", 1, 32)
    h = builder.conv_relu_pool("conv2", h, 32, 64)
    h = builder.node("Flatten", "flatten", (h,), axis=1)
    h = builder.dense("fc1", h, 64 * 7 * 7, 512, relu=True)
    builder.dense("fc2", h, 512, 10, relu=False, output="logits")
    return builder.finish("mnist_cnn", ("N", 1, 28, 28))


_BUILDERS: dict[str, Callable[[_Builder], bytes]] = {
    "logreg": _logreg,
    "mnist_2nn": _mnist_2nn,
    "mnist_cnn": _mnist_cnn,
}


def build_model(name: str, *, seed: int = 0) -> bytes:
    """The ONNX bytes of zoo model ``name`` initialised from ``seed`` (deterministic)."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ModelError(f"unknown_model: {name!r} is not in the zoo ({', '.join(ZOO_NAMES)})", model=name)
    return builder(_Builder(seed))


def build_mlp(hidden: Sequence[int], *, seed: int = 0, inputs: int = 784, outputs: int = 10,
              regression: bool = False) -> bytes:
    """The ONNX bytes of an MLP ``inputs -> hidden... -> outputs`` in the 2NN's layout and
    initialisation (``build_mlp((200, 200))`` is the zoo's ``mnist_2nn``, but for its graph name).

    ``regression=True`` names the output ``prediction`` instead of ``logits`` (a model trained with
    ``train.loss = "mse"``); ``hidden = ()`` is then a linear regression."""
    if (not hidden and not regression) or any(size < 1 for size in hidden) or inputs < 1 or outputs < 1:
        raise ModelError(f"bad_model: widths must be >= 1 (and hidden layers given for a classifier), got "
                         f"{inputs} -> {list(hidden)} -> {outputs}", model="mlp")
    name = "mlp_" + "_".join(str(size) for size in (inputs, *hidden, outputs))
    if (inputs, outputs, regression) == (784, 10, False):
        name = "mlp_" + "_".join(str(size) for size in hidden)
    return _mlp(_Builder(seed), hidden, name, inputs=inputs, outputs=outputs,
                output="prediction" if regression else "logits")


def build_zoo(out_dir: str | os.PathLike[str], *, seed: int = 0) -> list[Path]:
    """Write ``<name>.onnx`` for every zoo model into ``out_dir`` (created if needed)."""
    directory = Path(out_dir)
    written = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ZOO_NAMES:
            path = directory / f"{name}.onnx"
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_bytes(build_model(name, seed=seed))
            temporary.replace(path)
            written.append(path)
    except OSError as error:
        raise ModelError(f"unwritable: {directory}: {error.strerror or error}") from error
    return written


def resolve_model(name_or_path: str, *, seed: int = 0) -> OnnxModel:
    """A zoo model by name (built in memory), the ONNX file at a path, or a ``.tflite`` (read into
    ONNX: :func:`unus_edge.tflite.from_tflite`, with the ``litert`` extra)."""
    if name_or_path in _BUILDERS:
        return load_model(build_model(name_or_path, seed=seed), name=name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ModelError(
            f"unknown_model: {name_or_path!r} is neither a zoo model ({', '.join(ZOO_NAMES)}) "
            "nor an existing .onnx or .tflite file"
        )
    if path.suffix == ".tflite":
        from unus_edge.tflite import from_tflite

        return from_tflite(path)
    return load_model(path)
