"""Graph planning, DAG gradient routing and validation errors of the NumPy engine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from unus_edge.errors import ModelError, ParameterError, UnsupportedOpError
from unus_edge.nn import SUPPORTED_OPS, Graph
from unus_edge.onnx_io import load_model, read_parameters

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
helper = onnx.helper
numpy_helper = onnx.numpy_helper
TP = onnx.TensorProto


def _build(nodes: list[Any], initializers: dict[str, np.ndarray], x_shape: list[Any], *, opset: int = 13) -> bytes:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TP.FLOAT, x_shape)],
        [helper.make_tensor_value_info("out", TP.FLOAT, ["N", "K"])],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()  # type: ignore[no-any-return]


def _weights(rng: np.random.Generator, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in shapes.items()}


def residual_model() -> bytes:
    """x -> Gemm -> Relu = h; h feeds both the second layer and the skip Add (fan-out)."""
    rng = np.random.default_rng(0)
    weights = _weights(rng, w1=(6, 4), b1=(6,), w2=(6, 6), b2=(6,), w3=(3, 6), b3=(3,))
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="fc1", transB=1),
        helper.make_node("Relu", ["a"], ["h"], name="relu1"),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["c"], name="fc2", transB=1),
        helper.make_node("Relu", ["c"], ["r"], name="relu2"),
        helper.make_node("Add", ["h", "r"], ["s"], name="skip"),
        helper.make_node("Gemm", ["s", "w3", "b3"], ["out"], name="fc3", transB=1),
    ]
    return _build(nodes, weights, ["N", 4])


def every_op_model() -> bytes:
    """One graph that uses every supported op, with two branches joined by Concat and Add."""
    rng = np.random.default_rng(1)
    weights = _weights(rng, w1=(3, 2, 3, 3), b1=(3,), w2=(8, 54), b2=(8,), w3=(6, 8), c=(8,), w4=(5, 8), w5=(8, 5))
    weights |= {
        "bn_scale": np.array([1.0, 0.5, 2.0], np.float32),
        "bn_bias": np.array([0.1, -0.1, 0.0], np.float32),
        "bn_mean": np.array([0.2, 0.0, -0.3], np.float32),
        "bn_var": np.array([1.5, 0.5, 1.0], np.float32),
        "shape3": np.array([0, 2, 3], np.int64),
        "zero": np.array(0, np.int64),
        "axes0": np.array([0], np.int64),
        "axes23": np.array([2, 3], np.int64),
        "minus1": np.array([-1], np.int64),
        "perm8": np.array([1, 3, 5, 7, 0, 2, 4, 6], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn"),
        helper.make_node("LeakyRelu", ["bn"], ["a"], name="leaky", alpha=0.1),
        helper.make_node("MaxPool", ["a"], ["p"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["a"], ["q"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["p", "q"], ["cat"], name="concat", axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"], name="gap"),
        helper.make_node("Flatten", ["cat"], ["f1"], name="flatten"),
        # x.view(x.size(0), -1) as PyTorch exports it: a reshape to a shape computed at run time
        helper.make_node("Shape", ["cat"], ["cat_shape"], name="shape"),
        helper.make_node("Gather", ["cat_shape", "zero"], ["batch"], name="gather_batch", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="unsqueeze"),
        helper.make_node("Concat", ["batch1", "minus1"], ["view_shape"], name="concat_shape", axis=0),
        helper.make_node("Reshape", ["cat", "view_shape"], ["f2"], name="view"),
        helper.make_node("Add", ["f1", "f2"], ["f"], name="add_views"),
        helper.make_node(
            "Constant", [], ["shape2"], name="const", value=numpy_helper.from_array(np.array([-1, 6], np.int64))
        ),
        helper.make_node("Reshape", ["g", "shape2"], ["r0"], name="reshape"),
        helper.make_node("Squeeze", ["g", "axes23"], ["sq"], name="squeeze"),
        helper.make_node("Add", ["r0", "sq"], ["r"], name="add_squeeze"),
        helper.make_node("Reshape", ["r", "shape3"], ["r3"], name="reshape3"),
        helper.make_node("Transpose", ["r3"], ["t"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("Flatten", ["t"], ["tf"], name="flatten2"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["h1"], name="gemm", transB=1),
        helper.make_node("MatMul", ["tf", "w3"], ["h2"], name="matmul"),
        helper.make_node("Gather", ["h2", "perm8"], ["h2p"], name="gather", axis=1),
        helper.make_node("Add", ["h1", "h2p"], ["s"], name="add"),
        helper.make_node("Sub", ["s", "c"], ["d"], name="sub"),
        helper.make_node("Sigmoid", ["h2"], ["sg"], name="sigmoid"),
        helper.make_node("Mul", ["d", "sg"], ["m"], name="mul"),
        helper.make_node("Tanh", ["m"], ["th"], name="tanh"),
        helper.make_node("Relu", ["th"], ["rl"], name="relu"),
        helper.make_node("Identity", ["rl"], ["idt"], name="identity"),
        helper.make_node("Dropout", ["idt"], ["dr"], name="dropout"),
        helper.make_node("Softmax", ["dr"], ["sm"], name="softmax"),
        helper.make_node("Gemm", ["dr", "w4"], ["z"], name="gemm2", transB=1),
        helper.make_node("LogSoftmax", ["z"], ["ls"], name="logsoftmax"),
        helper.make_node("MatMul", ["sm", "w5"], ["z2"], name="matmul2"),
        helper.make_node("Add", ["ls", "z2"], ["out"], name="out"),
    ]
    return _build(nodes, weights, ["N", 2, 6, 6])


MODELS = {"residual": (residual_model, (5, 4)), "every_op": (every_op_model, (4, 2, 6, 6))}


def test_every_supported_op_is_exercised() -> None:
    used = {node.op_type for node in load_model(every_op_model()).nodes}
    assert used == set(SUPPORTED_OPS)


@pytest.mark.parametrize("name", MODELS)
def test_forward_matches_onnxruntime(name: str) -> None:
    build, shape = MODELS[name]
    data = build()
    model = load_model(data)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Graph(model).forward(read_parameters(model), x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_graph_gradients_match_finite_differences(name: str, training: bool) -> None:
    build, shape = MODELS[name]
    model = load_model(build())
    graph = Graph(model)
    params = {k: v.astype(np.float64) for k, v in read_parameters(model).items()}
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    output, tape = graph.forward_with_tape(params, x, training=training, rng=np.random.default_rng(9))
    weights = rng.standard_normal(output.shape)
    grads = graph.backward(tape, weights)
    assert set(grads) == set(graph.trainable)

    def objective(p: dict[str, np.ndarray]) -> float:
        copies = {k: v.copy() for k, v in p.items()}  # training mode updates BN buffers
        y = graph.forward(copies, x, training=training, rng=np.random.default_rng(9))
        return float((y * weights).sum())

    step = 1e-6
    for key in graph.trainable:
        for position in list(np.ndindex(params[key].shape))[:: max(1, params[key].size // 12)]:
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[key][position] += step
            minus[key][position] -= step
            numeric = (objective(plus) - objective(minus)) / (2 * step)
            assert grads[key][position] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (key, position)


def test_fan_out_gradients_are_accumulated() -> None:
    """Without summing both consumers' gradients of ``h``, fc1's gradient would be wrong."""
    model = load_model(residual_model())
    graph = Graph(model)
    params = read_parameters(model)
    x = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    _, tape = graph.forward_with_tape(params, x)
    full = graph.backward(tape, np.ones((5, 3), np.float32))["w1"]
    # the skip path alone: d out / d h through fc3 only
    assert not np.allclose(full, 0)
    w3 = params["w3"]
    a = x @ params["w1"].T + params["b1"]
    skip_only = ((np.ones((5, 3)) @ w3) * (a > 0)).T @ x
    assert not np.allclose(full, skip_only, atol=1e-4)


def test_float32_in_float32_out() -> None:
    model = load_model(every_op_model())
    graph = Graph(model)
    params = read_parameters(model)
    x = np.random.default_rng(5).standard_normal((3, 2, 6, 6)).astype(np.float32)
    output, tape = graph.forward_with_tape(params, x, rng=np.random.default_rng(0))
    assert output.dtype == np.float32
    for key, grad in graph.backward(tape, np.ones_like(output)).items():
        assert grad.dtype == np.float32, key
        assert grad.shape == params[key].shape
        assert grad.flags.writeable


def test_trainable_and_buffers() -> None:
    graph = Graph(load_model(every_op_model()))
    assert set(graph.buffers) == {"bn_mean", "bn_var"}
    assert "bn_scale" in graph.trainable and "w1" in graph.trainable
    assert "shape3" not in graph.trainable + graph.buffers  # int64: structure, not a parameter


def test_training_forward_updates_batchnorm_buffers_in_place() -> None:
    model = load_model(every_op_model())
    graph = Graph(model)
    params = read_parameters(model)
    before = params["bn_mean"].copy()
    x = np.random.default_rng(6).standard_normal((3, 2, 6, 6)).astype(np.float32)
    graph.forward(params, x)
    np.testing.assert_array_equal(params["bn_mean"], before)
    graph.forward(params, x, training=True, rng=np.random.default_rng(0))
    assert not np.array_equal(params["bn_mean"], before)
    with pytest.raises(ModelError, match="read_only_buffer"):
        graph.forward(dict(model.initializers), x, training=True)


def test_nodes_out_of_order_are_sorted() -> None:
    proto = onnx.load_from_string(residual_model())
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    model = load_model(proto.SerializeToString())
    x = np.ones((2, 4), np.float32)
    expected = Graph(load_model(residual_model())).forward(read_parameters(model), x)
    np.testing.assert_array_equal(Graph(model).forward(read_parameters(model), x), expected)


def test_missing_parameter_is_a_parameter_error() -> None:
    model = load_model(residual_model())
    params = read_parameters(model)
    del params["w2"]
    with pytest.raises(ParameterError, match="'w2': missing"):
        Graph(model).forward(params, np.ones((1, 4), np.float32))


def _single(node: Any, x_shape: list[Any], initializers: dict[str, np.ndarray] | None = None, **kw: Any) -> bytes:
    graph = helper.make_graph(
        [node],
        "single",
        [helper.make_tensor_value_info("x", TP.FLOAT, x_shape)],
        [helper.make_tensor_value_info(node.output[0], TP.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", kw.get("opset", 13))]).SerializeToString()  # type: ignore[no-any-return]


W = {"w": np.zeros((4, 2, 3, 3), np.float32)}


@pytest.mark.parametrize(
    ("node", "initializers", "detail"),
    [
        (helper.make_node("Erf", ["x"], ["y"], name="the_erf"), {}, "supported ops"),
        (helper.make_node("Relu", ["x"], ["y"], name="ms", domain="com.microsoft"), {}, "domain 'com.microsoft'"),
        (helper.make_node("Conv", ["x", "w"], ["y"], name="grouped", group=2), W, "group=2"),
        (helper.make_node("Conv", ["x", "w"], ["y"], name="dilated", dilations=[2, 2]), W, "dilations"),
        (
            helper.make_node("Conv", ["x", "w1d"], ["y"], name="conv1d"),
            {"w1d": np.zeros((4, 2, 3), np.float32)},
            "only 2-D",
        ),
        (
            helper.make_node("MaxPool", ["x"], ["y"], name="ceil", kernel_shape=[2, 2], ceil_mode=1),
            {},
            "ceil_mode",
        ),
        (
            helper.make_node("MaxPool", ["x"], ["y", "idx"], name="indices", kernel_shape=[2, 2]),
            {},
            "output",
        ),
        (
            helper.make_node("Reshape", ["x", "shape"], ["y"], name="floatshape"),
            {"shape": np.array([-1.0], np.float32)},
            "float initializer",
        ),
        (helper.make_node("Unsqueeze", ["x", "x"], ["y"], name="dynamic_axes"), {}, "must be a constant"),
        (helper.make_node("Concat", ["x", "x"], ["y"], name="noaxis"), {}, "axis attribute is required"),
    ],
)
def test_unsupported_is_reported_at_build_time(node: Any, initializers: dict[str, np.ndarray], detail: str) -> None:
    model = load_model(_single(node, ["N", 2, 5, 5], initializers))
    with pytest.raises(UnsupportedOpError, match=detail) as info:
        Graph(model)
    assert info.value.op_type == node.op_type
    assert info.value.node_name == node.name
    assert repr(node.op_type) in str(info.value) and repr(node.name) in str(info.value)


def test_unsupported_op_in_a_zoo_sized_graph_is_found_before_training() -> None:
    proto = onnx.load_from_string(residual_model())
    proto.graph.node[3].op_type = "Gelu"
    with pytest.raises(UnsupportedOpError, match="unsupported op 'Gelu' at node 'relu2'"):
        Graph(load_model(proto.SerializeToString()))


def test_graph_shape_errors() -> None:
    two_inputs = onnx.load_from_string(residual_model())
    two_inputs.graph.input.append(helper.make_tensor_value_info("z", TP.FLOAT, [1]))
    with pytest.raises(ModelError, match="one input and one output"):
        Graph(load_model(two_inputs.SerializeToString()))
    dangling = onnx.load_from_string(residual_model())
    dangling.graph.node[4].input[1] = "nowhere"
    with pytest.raises(ModelError, match="'nowhere' of node 'skip'"):
        Graph(load_model(dangling.SerializeToString()))
    cycle = onnx.load_from_string(residual_model())
    cycle.graph.node[0].input[0] = "s"
    with pytest.raises(ModelError, match="cycle"):
        Graph(load_model(cycle.SerializeToString()))
    doubles = onnx.load_from_string(residual_model())
    doubles.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((6, 4)), "w1"))
    with pytest.raises(ModelError, match="float64"):
        Graph(load_model(doubles.SerializeToString()))


def test_constants_are_folded_out_of_the_plan() -> None:
    graph = Graph(load_model(every_op_model()))
    planned = [op.node.op_type for op in graph.ops]
    assert "Constant" not in planned
    assert len(planned) == len(load_model(every_op_model()).nodes) - 1


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_with_all_five_outputs_of_opset_9(training: bool) -> None:
    """Opset 9-13 training graphs declare mean, var, saved_mean and saved_var outputs."""
    node = helper.make_node(
        "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "m_out", "v_out", "saved_m", "saved_v"], name="bn"
    )
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    data = _single(node, ["N", 3, 2, 2], {"s": ones, "b": zeros, "m": zeros, "v": ones}, opset=9)
    model = load_model(data)
    graph = Graph(model)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    y = graph.forward(read_parameters(model), x, training=training)
    assert y.shape == (4, 3, 2, 2)


# ------------------------------------------------------------------------------ in place, owned gradients


def _relu_inplace(graph: Graph) -> dict[str, bool]:
    return {op.node.name: op.inplace for op in graph.ops if op.node.op_type == "Relu"}


def test_relus_after_gemms_run_in_place() -> None:
    from unus_edge.zoo import resolve_model

    assert _relu_inplace(Graph(resolve_model("mnist_2nn"))) == {"fc1.relu": True, "fc2.relu": True}
    assert _relu_inplace(Graph(resolve_model("mnist_cnn"))) == {"conv1.relu": True, "conv2.relu": True,
                                                                 "fc1.relu": True}


def test_a_relu_never_overwrites_a_value_someone_else_reads() -> None:
    """Gemm's output feeds the ReLU and the skip Add: the ReLU must make its own array."""
    rng = np.random.default_rng(4)
    weights = _weights(rng, w1=(5, 4), b1=(5,), w2=(3, 5), b2=(3,))
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="fc1", transB=1),
        helper.make_node("Relu", ["a"], ["h"], name="relu"),
        helper.make_node("Add", ["a", "h"], ["s"], name="skip"),
        helper.make_node("Gemm", ["s", "w2", "b2"], ["out"], name="fc2", transB=1),
    ]
    model = load_model(_build(nodes, weights, ["N", 4]))
    graph = Graph(model)
    assert _relu_inplace(graph) == {"relu": False}
    x = rng.standard_normal((7, 4)).astype(np.float32)
    session = ort.InferenceSession(_build(nodes, weights, ["N", 4]), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(graph.forward(read_parameters(model), x), expected, rtol=1e-5, atol=1e-6)


def _plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off every in-place and ownership property: the engine's unoptimised paths."""
    from unus_edge.nn._base import OPS, Op

    for cls in {*OPS.values(), Op}:
        for flag in ("private_output", "inplace_capable", "fresh_grads", "view_grads"):
            if flag in vars(cls):
                monkeypatch.setattr(cls, flag, False)


@pytest.mark.parametrize("name", ["residual", "every_op", "mnist_2nn", "mnist_cnn"])
@pytest.mark.parametrize("batch", [1, 5])
def test_in_place_paths_are_bit_identical_to_the_plain_ones(
    name: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In place and owned gradients change where results are written, never their bits."""
    from unus_edge.nn import loss_and_grad
    from unus_edge.zoo import resolve_model

    model = {"residual": lambda: load_model(residual_model()), "every_op": lambda: load_model(every_op_model()),
             "mnist_2nn": lambda: resolve_model("mnist_2nn"), "mnist_cnn": lambda: resolve_model("mnist_cnn")}[name]()
    rng = np.random.default_rng(batch)
    shape = [batch, *(d if isinstance(d, int) else 1 for d in model.inputs[0].shape[1:])]
    x = rng.standard_normal(shape).astype(np.float32)
    classes = Graph(model).forward(read_parameters(model), x).shape[1]
    y = rng.integers(0, classes, batch)

    def run() -> tuple[float, dict[str, np.ndarray], np.ndarray]:
        graph = Graph(model)
        params = read_parameters(model)
        loss, grads = loss_and_grad(graph, params, x, y, rng=np.random.default_rng(0))
        return loss, grads, graph.forward(params, x)

    fast = run()
    with monkeypatch.context() as patch:
        _plain(patch)
        plain = run()
    assert fast[0] == plain[0]
    assert fast[1].keys() == plain[1].keys()
    for key in fast[1]:
        assert np.array_equal(fast[1][key], plain[1][key]), key
    assert np.array_equal(fast[2], plain[2])


def test_relu_gradient_at_exactly_zero_is_zero_in_place_too() -> None:
    """A batch of one whose pre-activations are exactly 0: no gradient flows through them."""
    weights = {"w1": np.array([[1.0, -1.0], [2.0, 0.0]], np.float32), "b1": np.zeros(2, np.float32),
               "w2": np.array([[1.0, 1.0]], np.float32), "b2": np.zeros(1, np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="fc1", transB=1),
        helper.make_node("Relu", ["a"], ["h"], name="relu"),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["out"], name="fc2", transB=1),
    ]
    model = load_model(_build(nodes, weights, ["N", 2]))
    graph = Graph(model)
    assert _relu_inplace(graph) == {"relu": True}
    params = read_parameters(model)
    x = np.array([[0.0, 0.0]], np.float32)  # a = [0, 0]: both units exactly at the kink
    for owned in (False, True):
        output, tape = graph.forward_with_tape(params, x)
        grads = graph.backward(tape, np.ones_like(output), owned=owned)
        assert not grads["w1"].any() and not grads["b1"].any()
        assert not grads["w2"].any()
