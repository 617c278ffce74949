"""ONNX to TFLite without TensorFlow, run by LiteRT (issue 15, and issue 16's LiteRT predictions).

The reference is onnxruntime on the same ONNX model and weights; fp32 must match it within
1e-5. Refusals name the node and what is unsupported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
helper = pytest.importorskip("onnx.helper")
onnx = pytest.importorskip("onnx")

from tests.brokers import python_env  # noqa: E402
from unus_edge.errors import ModelError  # noqa: E402
from unus_edge.onnx_io import Evaluator, OnnxModel, load_model, prepare_input, read_parameters  # noqa: E402
from unus_edge.tflite import LiteRTRunner, from_tflite, to_tflite  # noqa: E402
from unus_edge.zoo import resolve_model  # noqa: E402


def params_of(model: OnnxModel, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's parameters, perturbed so that a stale copy of the weights would show."""
    rng = np.random.default_rng(seed)
    return {name: (np.asarray(model.initializers[name]) + rng.normal(0, 0.01, model.initializers[name].shape))
            .astype(np.float32) for name in model.parameter_names}


def litert_vs_onnxruntime(model: OnnxModel, x: np.ndarray, weights: Any = "fp32") -> tuple[float, float, int]:
    params = params_of(model)
    content = to_tflite(model, params, weights=weights)
    expected = Evaluator(model, backend="onnxruntime").predict(params, x)
    got = LiteRTRunner(content).run(prepare_input(model, x))
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max()), float(np.abs(expected).max()), len(content)


@pytest.mark.parametrize("name", ["logreg", "mnist_2nn", "mnist_cnn"])
def test_the_zoo_in_fp32_matches_onnxruntime(name: str) -> None:
    x = np.random.default_rng(1).random((37, 784), np.float32)  # an odd batch: the input is resized
    difference, _, _ = litert_vs_onnxruntime(resolve_model(name), x)
    assert difference < 1e-5, difference


@pytest.mark.parametrize(("weights", "shrink", "tolerance"), [("fp16", 0.52, 0.01), ("int8", 0.27, 0.05)])
def test_small_weights_shrink_the_file_and_stay_close(weights: str, shrink: float, tolerance: float) -> None:
    model = resolve_model("mnist_2nn")
    x = np.random.default_rng(2).random((64, 784), np.float32)
    _, _, full = litert_vs_onnxruntime(model, x)
    difference, scale, size = litert_vs_onnxruntime(model, x, weights)
    assert size < shrink * full, (size, full)
    assert difference < tolerance * scale, (difference, scale)


def graph_model(nodes: list[Any], initializers: dict[str, np.ndarray], input_shape: list[Any],
                output_shape: list[Any]) -> OnnxModel:
    graph = helper.make_graph(
        nodes, "case", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, output_shape)],
        [onnx.numpy_helper.from_array(value, name) for name, value in initializers.items()])
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())


def test_strided_padded_convolutions_pooling_reshape_and_the_activations() -> None:
    rng = np.random.default_rng(3)
    init = {"w1": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, 4).astype(np.float32),
            "w2": rng.normal(0, 0.3, (16, 5)).astype(np.float32), "b2": rng.normal(0, 0.1, 5).astype(np.float32),
            "shape": np.asarray([-1, 16], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", strides=[2, 2], pads=[1, 0, 2, 1]),
        helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
        helper.make_node("AveragePool", ["t"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b2"], ["a"], name="bias"),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sigmoid"),
        helper.make_node("Softmax", ["s"], ["y"], name="softmax", axis=-1),
    ]
    # (N, 3, 9, 9): padded to 12 x 10, conv stride 2 -> 5 x 4, pool 2 -> 2 x 2, x 4 channels = 16.
    model = graph_model(nodes, init, ["N", 3, 9, 9], ["N", 5])
    x = rng.random((7, 3, 9, 9), np.float32)
    difference, _, _ = litert_vs_onnxruntime(model, x)
    assert difference < 1e-5, difference


@pytest.mark.parametrize(("node", "why"), [
    (helper.make_node("LeakyRelu", ["h"], ["y"], name="leaky"), "node leaky (LeakyRelu): not among the ops"),
    (helper.make_node("Softmax", ["h"], ["y"], name="soft0", axis=0), "node soft0 (Softmax): only over the last axis"),
])
def test_an_unsupported_node_is_refused_by_name(node: Any, why: str) -> None:
    init = {"w": np.ones((4, 4), np.float32)}
    model = graph_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), node], init, ["N", 4], ["N", 4])
    with pytest.raises(ModelError, match="tflite_unsupported") as refused:
        to_tflite(model, read_parameters(model))
    assert why in str(refused.value)


def test_a_grouped_convolution_and_padded_pooling_are_refused() -> None:
    grouped = graph_model([helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=2)],
                          {"w": np.ones((2, 1, 3, 3), np.float32)}, ["N", 2, 5, 5], ["N", 2, 3, 3])
    with pytest.raises(ModelError, match=r"node dw \(Conv\): needs a constant .* group 1"):
        to_tflite(grouped, read_parameters(grouped))
    pooled = graph_model([helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2], pads=[1, 1, 1, 1])],
                         {}, ["N", 1, 4, 4], ["N", 1, 3, 3])
    with pytest.raises(ModelError, match=r"node mp \(MaxPool\): pooling with pads"):
        to_tflite(pooled, {})


def test_the_litert_backend_follows_new_weights() -> None:
    model = resolve_model("mnist_2nn")
    evaluator = Evaluator(model, backend="litert")
    assert evaluator.backend == "litert"
    x = np.random.default_rng(4).random((20, 784), np.float32)
    for seed in (0, 1):
        params = params_of(model, seed)
        expected = Evaluator(model, backend="onnxruntime").predict(params, x)
        assert np.abs(evaluator.predict(params, x, batch_size=8) - expected).max() < 1e-5
    labels = np.arange(20) % 10
    litert, reference = evaluator.evaluate(params, x, labels), Evaluator(model).evaluate(params, x, labels)
    assert litert.accuracy == reference.accuracy and abs(litert.loss - reference.loss) < 1e-5


def test_export_writes_a_checked_tflite_and_onnx(tmp_path: Path) -> None:
    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "unus_edge.cli", "export", *args], capture_output=True,
                              text=True, env=python_env(), timeout=120, check=False)

    done = export("mnist_2nn", "--weights", "int8", "--out", str(tmp_path / "m.tflite"))
    assert done.returncode == 0, done.stderr
    assert "int8" in done.stdout and "LiteRT's outputs are within" in done.stdout
    assert LiteRTRunner(tmp_path / "m.tflite").run(np.zeros((3, 784), np.float32)).shape == (3, 10)
    done = export("mnist_2nn", "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert done.returncode == 0, done.stderr
    assert load_model((tmp_path / "m.onnx").read_bytes()).parameter_names == resolve_model("mnist_2nn").parameter_names
    refused = export("mnist_2nn", "--format", "onnx", "--weights", "fp16", "--out", str(tmp_path / "x.onnx"))
    assert refused.returncode != 0 and "for --format tflite" in refused.stderr
    missing = export("mnist_2nn", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.tflite"))
    assert missing.returncode != 0 and "no checkpoint in" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x.tflite").exists()


@pytest.mark.parametrize("name", ["logreg", "mnist_2nn", "mnist_cnn"])
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_a_tflite_reads_back_into_a_graph_that_predicts_the_same(tmp_path: Path, name: str, weights: Any) -> None:
    model = resolve_model(name)
    params = params_of(model)
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(to_tflite(model, params, weights=weights))
    back = resolve_model(str(path))  # a .tflite is accepted wherever a model is
    assert set(back.parameter_names) == set(params)  # the wire keys survive
    x = np.random.default_rng(5).random((9, 784), np.float32)
    expected = LiteRTRunner(path).run(prepare_input(model, x))
    for backend in ("onnxruntime", "numpy"):  # the engine runs the imported graph too
        got = Evaluator(back, backend=backend).predict(read_parameters(back), x)
        assert np.abs(got - expected).max() < 1e-5, backend


def test_an_imported_tflite_trains_with_the_engine(tmp_path: Path) -> None:
    from unus_edge.nn import Graph, TrainConfig, loss_and_grad, train

    model = resolve_model("mnist_cnn")
    back = from_tflite(to_tflite(model, params_of(model)))
    graph, params = Graph(back), read_parameters(back)
    rng = np.random.default_rng(6)
    x = rng.random((40, 28, 28, 1), np.float32)  # TFLite's NHWC input, as the file says
    y = (x.reshape(40, -1).mean(axis=1) > 0.5).astype(np.int64) + (np.arange(40) % 3)
    before, _ = loss_and_grad(graph, params, x, y, training=False)
    result = train(graph, params, x, y, TrainConfig(epochs=3, batch_size=10, learning_rate=0.05))
    after, _ = loss_and_grad(graph, result.params, x, y, training=False)
    assert after < before and set(result.params) == set(params)


def test_a_tflite_outside_the_reader_is_refused_by_operator() -> None:
    from unus_edge.tflite import _schema

    s = _schema()
    model = s.ModelT.InitFromPackedBuf(bytearray(to_tflite(resolve_model("mnist_2nn"),
                                                           read_parameters(resolve_model("mnist_2nn")))), 0)
    relu = next(i for i, code in enumerate(model.operatorCodes) if code.builtinCode == s.BuiltinOperator.RELU)
    model.operatorCodes[relu].builtinCode = model.operatorCodes[relu].deprecatedBuiltinCode = \
        s.BuiltinOperator.RELU6
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    with pytest.raises(ModelError, match=r"tflite_unsupported: operator \d+ \(RELU6\): not among the operators"):
        from_tflite(bytes(builder.Output()))
    with pytest.raises(ModelError, match="tflite_invalid"):
        from_tflite(b"not a flatbuffer at all")
