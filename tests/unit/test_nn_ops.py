"""Every op of the NumPy engine: forward against onnxruntime, backward against finite differences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from unus_edge.nn._base import OPS, Build, Op, Run

# Every case runs with NumPy's products and with onnxruntime's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernels")

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
helper = onnx.helper
TP = onnx.TensorProto


@dataclass
class Case:
    op_type: str
    shapes: Sequence[tuple[int, ...] | None]  # None: an omitted optional input
    attrs: dict[str, Any] = field(default_factory=dict)
    constants: dict[int, np.ndarray] = field(default_factory=dict)  # input index -> constant value
    opset: int = 13
    outputs: int = 1
    positive: Sequence[int] = ()  # inputs that must be positive (variances)
    training: bool = False  # also check the training-mode backward
    float_output: bool = True  # False for Shape (int64)

    def __str__(self) -> str:
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.op_type}[{attrs}]{list(self.shapes)}@{self.opset}"


CASES = [
    Case("Gemm", [(3, 4), (4, 5), (5,)]),
    Case("Gemm", [(4, 3), (5, 4), (1, 5)], {"transA": 1, "transB": 1, "alpha": 0.7, "beta": 1.3}),
    Case("Gemm", [(3, 4), (4, 5), (3, 5)], {"beta": 0.5}),
    Case("Gemm", [(3, 4), (5, 4)], {"transB": 1}),
    Case("MatMul", [(3, 4), (4, 5)]),
    Case("MatMul", [(2, 3, 4), (4, 5)]),
    Case("MatMul", [(2, 1, 3, 4), (3, 4, 2)]),
    Case("MatMul", [(4,), (4, 5)]),
    Case("MatMul", [(3, 4), (4,)]),
    Case("Add", [(2, 3, 4), (3, 1)]),
    Case("Add", [(2, 3), (2, 3)]),
    Case("Sub", [(1, 4), (3, 1)]),
    Case("Mul", [(2, 3, 4), (4,)]),
    Case("Mul", [(3, 1), (1, 5)]),
    Case("Relu", [(3, 7)]),
    Case("LeakyRelu", [(3, 7)], {"alpha": 0.2}),
    Case("LeakyRelu", [(2, 5)]),
    Case("Sigmoid", [(3, 7)]),
    Case("Tanh", [(3, 7)]),
    Case("Softmax", [(3, 7)]),
    Case("Softmax", [(2, 3, 4)], {"axis": 1}),
    Case("Softmax", [(2, 3, 4)], {"axis": 1}, opset=11),
    Case("LogSoftmax", [(3, 7)]),
    Case("LogSoftmax", [(2, 3, 4)], {"axis": 0}),
    Case("LogSoftmax", [(2, 3, 4)], {"axis": 1}, opset=11),
    Case("Identity", [(2, 3)]),
    Case("Dropout", [(4, 6)], training=True),
    Case("Dropout", [(4, 6), ()], constants={1: np.array(0.25, np.float32)}, outputs=2, training=True),
    Case("Flatten", [(2, 3, 4, 5)]),
    Case("Flatten", [(2, 3, 4, 5)], {"axis": 0}),
    Case("Flatten", [(2, 3, 4, 5)], {"axis": -1}),
    Case("Flatten", [(2, 3, 4, 5)], {"axis": 3}),
    Case("Reshape", [(2, 3, 4), (3,)], constants={1: np.array([0, -1, 2], np.int64)}),
    Case("Reshape", [(2, 12), (2,)], constants={1: np.array([4, 6], np.int64)}),
    Case("Transpose", [(2, 3, 4)], {"perm": (1, 2, 0)}),
    Case("Transpose", [(2, 3, 4)]),
    Case("Concat", [(2, 3), (2, 1), (2, 4)], {"axis": 1}),
    Case("Concat", [(1, 3), (2, 3)], {"axis": -2}),
    Case("Gather", [(4, 5), (3,)], {"axis": 1}, constants={1: np.array([0, 4, 0], np.int64)}),
    Case("Gather", [(4, 5), ()], constants={1: np.array(2, np.int64)}),
    Case("Gather", [(3, 4, 2), (2, 2)], {"axis": -2}, constants={1: np.array([[0, -1], [1, 1]], np.int64)}),
    Case("Unsqueeze", [(2, 3), (2,)], constants={1: np.array([0, -1], np.int64)}),
    Case("Unsqueeze", [(2, 3)], {"axes": (1,)}, opset=11),
    Case("Squeeze", [(2, 1, 3, 1), (1,)], constants={1: np.array([3], np.int64)}),
    Case("Squeeze", [(2, 1, 3, 1)]),
    Case("Squeeze", [(2, 1, 3, 1)], {"axes": (1,)}, opset=11),
    Case("Shape", [(2, 3, 4)], float_output=False),
    Case("Shape", [(2, 3, 4)], {"start": 1}, opset=15, float_output=False),
    Case("Conv", [(2, 3, 7, 6), (4, 3, 3, 3), (4,)]),
    Case("Conv", [(2, 3, 7, 6), (4, 3, 3, 2)], {"strides": (2, 2), "pads": (1, 0, 2, 1)}),
    Case("Conv", [(1, 2, 6, 6), (3, 2, 3, 3), (3,)], {"auto_pad": "SAME_UPPER", "strides": (2, 1)}),
    Case("Conv", [(1, 2, 6, 5), (3, 2, 2, 2), (3,)], {"auto_pad": "SAME_LOWER"}),
    Case("Conv", [(1, 2, 5, 5), (3, 2, 5, 5), (3,)], {"auto_pad": "VALID", "kernel_shape": (5, 5)}),
    Case("MaxPool", [(2, 3, 6, 6)], {"kernel_shape": (2, 2), "strides": (2, 2)}),
    Case("MaxPool", [(2, 3, 7, 7)], {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
    Case("MaxPool", [(1, 2, 5, 6)], {"kernel_shape": (2, 3)}),
    Case("AveragePool", [(2, 3, 6, 6)], {"kernel_shape": (2, 2), "strides": (2, 2)}),
    Case("AveragePool", [(1, 2, 5, 5)], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1)}),
    Case("AveragePool", [(1, 2, 5, 5)], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1), "count_include_pad": 1}),
    Case("GlobalAveragePool", [(2, 3, 4, 5)]),
    Case("BatchNormalization", [(4, 3, 2, 2), (3,), (3,), (3,), (3,)], positive=(4,), training=True),
    Case("BatchNormalization", [(6, 3), (3,), (3,), (3,), (3,)], {"epsilon": 1e-3}, positive=(4,), training=True),
]


def _inputs(case: Case, dtype: type, seed: int = 0) -> list[np.ndarray | None]:
    rng = np.random.default_rng(seed)
    values: list[np.ndarray | None] = []
    for index, shape in enumerate(case.shapes):
        if index in case.constants:
            values.append(case.constants[index])
        elif shape is None:
            values.append(None)
        else:
            value = rng.standard_normal(shape)
            if index in case.positive:
                value = np.abs(value) + 0.5
            elif case.op_type in ("Relu", "LeakyRelu", "MaxPool"):
                value = np.sign(value) * (np.abs(value) + 0.05)  # no kinks within the FD step
            values.append(value.astype(dtype))
    return values


def _node(case: Case) -> Any:
    names = [f"in{i}" if s is not None else "" for i, s in enumerate(case.shapes)]
    return helper.make_node(
        case.op_type, names, [f"out{i}" for i in range(case.outputs)], name=f"the_{case.op_type}", **case.attrs
    )


def _op(case: Case) -> Op:
    from unus_edge.onnx_io import load_model

    proto = _model(case)
    model = load_model(proto.SerializeToString())
    constants = {k: v for k, v in model.initializers.items()}
    return OPS[case.op_type](Build(model.nodes[0], case.opset, constants, model.initializers))


def _model(case: Case) -> Any:
    node = _node(case)
    inputs, initializers = [], []
    for index, shape in enumerate(case.shapes):
        name = f"in{index}"
        if index in case.constants:
            initializers.append(onnx.numpy_helper.from_array(case.constants[index], name))
        elif shape is not None:
            inputs.append(helper.make_tensor_value_info(name, TP.FLOAT, list(shape)))
    out_type = TP.FLOAT if case.float_output else TP.INT64
    outputs = [helper.make_tensor_value_info("out0", out_type, None)]
    graph = helper.make_graph([node], "case", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)], ir_version=8)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_onnxruntime(case: Case) -> None:
    values = _inputs(case, np.float32)
    session = ort.InferenceSession(_model(case).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {f"in{i}": v for i, v in enumerate(values) if v is not None and i not in case.constants}
    expected = session.run(["out0"], feeds)[0]
    outputs, _ = _op(case).forward(values, Run(False, None, record=False))
    got = outputs[0]
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype == (np.float32 if case.float_output else np.int64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _check_gradients(case: Case, training: bool) -> None:
    op = _op(case)
    values = _inputs(case, np.float64, seed=1)
    seed_rng = np.random.default_rng(2)

    def run(inputs: list[np.ndarray | None], record: bool) -> tuple[np.ndarray, Any]:
        copies = [None if v is None else v.copy() for v in inputs]  # BN updates buffers in place
        outputs, cache = op.forward(copies, Run(training, np.random.default_rng(7), record=record))
        return outputs[0], cache

    output, cache = run(values, record=True)
    weights = seed_rng.standard_normal(output.shape)
    needs = tuple(op.differentiable[i] and i not in case.constants and v is not None for i, v in enumerate(values))
    grads = op.backward(weights, cache, needs)
    step = 1e-6
    for index, value in enumerate(values):
        if not needs[index]:
            continue
        assert value is not None
        grad = grads[index]
        assert grad is not None and grad.shape == value.shape
        numeric = np.zeros_like(value)
        for position in np.ndindex(value.shape):
            plus = [None if v is None else v.copy() for v in values]
            minus = [None if v is None else v.copy() for v in values]
            plus[index][position] += step  # type: ignore[index]
            minus[index][position] -= step  # type: ignore[index]
            numeric[position] = ((run(plus, False)[0] * weights).sum() - (run(minus, False)[0] * weights).sum()) / (
                2 * step
            )
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=f"input {index}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_finite_differences(case: Case) -> None:
    _check_gradients(case, training=False)


@pytest.mark.parametrize("case", [c for c in CASES if c.training], ids=str)
def test_training_backward_matches_finite_differences(case: Case) -> None:
    _check_gradients(case, training=True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_stays_float32(case: Case) -> None:
    op = _op(case)
    values = _inputs(case, np.float32)
    outputs, cache = op.forward(values, Run(case.training, np.random.default_rng(0), record=True))
    assert outputs[0].dtype == (np.float32 if case.float_output else np.int64)
    needs = tuple(op.differentiable[i] and i not in case.constants and v is not None for i, v in enumerate(values))
    for grad in op.backward(np.ones_like(outputs[0]), cache, needs):
        assert grad is None or grad.dtype == np.float32


def test_sigmoid_does_not_overflow() -> None:
    op = _op(Case("Sigmoid", [(4,)]))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        (y,), _ = op.forward([np.array([-1000.0, -50.0, 50.0, 1000.0], np.float32)], Run(False, None, False))
    np.testing.assert_allclose(y, [0.0, 0.0, 1.0, 1.0], atol=1e-20)


def test_softmax_is_stable_for_large_logits() -> None:
    op = _op(Case("LogSoftmax", [(1, 3)]))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        (y,), _ = op.forward([np.array([[1000.0, 0.0, -1000.0]], np.float32)], Run(False, None, False))
    np.testing.assert_allclose(y, [[0.0, -1000.0, -2000.0]])


def test_dropout_training_is_seeded_and_inference_is_identity() -> None:
    op = _op(Case("Dropout", [(100, 100)]))
    x = np.ones((100, 100), np.float32)
    (inference, mask), _ = op.forward([x], Run(False, None, False))
    assert inference is x and mask.all()
    (a, mask_a), _ = op.forward([x], Run(True, np.random.default_rng(5), False))
    (b, _), _ = op.forward([x], Run(True, np.random.default_rng(5), False))
    np.testing.assert_array_equal(a, b)
    assert 0.45 < 1 - mask_a.mean() < 0.55  # ratio 0.5
    np.testing.assert_allclose(a[mask_a], 2.0)
    assert np.all(a[~mask_a] == 0)


def test_maxpool_ties_go_to_the_first_maximum_like_pytorch() -> None:
    op = _op(Case("MaxPool", [(1, 1, 2, 2)], {"kernel_shape": (2, 2), "strides": (2, 2)}))
    x = np.zeros((1, 1, 2, 2), np.float32)
    (_,), cache = op.forward([x], Run(False, None, True))
    (dx,) = op.backward(np.ones((1, 1, 1, 1), np.float32), cache, (True,))
    np.testing.assert_array_equal(dx, [[[[1.0, 0.0], [0.0, 0.0]]]])


def test_batchnorm_training_updates_running_statistics_like_pytorch() -> None:
    op = _op(Case("BatchNormalization", [(4, 3, 2, 2), (3,), (3,), (3,), (3,)], {"momentum": 0.9}))
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    scale, bias = np.ones(3, np.float32), np.zeros(3, np.float32)
    (y, _, _, _, _), _ = op.forward([x, scale, bias, mean, var], Run(True, None, False))
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var, 0.9 + 0.1 * x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1.0, rtol=1e-3)
    (y_eval, *_), _ = op.forward([x, scale, bias, mean, var], Run(False, None, False))
    np.testing.assert_allclose(
        y_eval, (x - mean.reshape(1, 3, 1, 1)) / np.sqrt(var + 1e-5).reshape(1, 3, 1, 1), rtol=1e-5, atol=1e-6
    )
