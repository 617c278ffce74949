"""The model zoo: exact architectures, determinism, validity for onnx and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unus_edge import onnx_io, zoo
from unus_edge.errors import ModelError
from unus_edge.nn import Graph

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

PARAMETERS = {"logreg": 7_850, "mnist_2nn": 199_210, "mnist_cnn": 1_663_370}
INPUT_SHAPES = {"logreg": ("N", 784), "mnist_2nn": ("N", 784), "mnist_cnn": ("N", 1, 28, 28)}


def test_zoo_names() -> None:
    assert zoo.ZOO_NAMES == ("logreg", "mnist_2nn", "mnist_cnn")


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_parameter_counts_and_interface(name: str) -> None:
    model = onnx_io.load_model(zoo.build_model(name), name=name)
    params = onnx_io.read_parameters(model)
    assert sum(v.size for v in params.values()) == PARAMETERS[name]
    assert all(v.dtype == np.float32 for v in params.values())
    assert model.inputs == (onnx_io.ValueInfo("x", np.dtype(np.float32), INPUT_SHAPES[name]),)
    assert model.outputs == (onnx_io.ValueInfo("logits", np.dtype(np.float32), ("N", 10)),)
    assert model.opset == zoo.OPSET == 13


def test_cnn_architecture() -> None:
    model = onnx_io.load_model(zoo.build_model("mnist_cnn"))
    assert [n.op_type for n in model.nodes] == [
        "Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"
    ]  # fmt: skip
    shapes = {k: v.shape for k, v in model.initializers.items()}
    assert shapes == {
        "conv1.weight": (32, 1, 5, 5),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 5, 5),
        "conv2.bias": (64,),
        "fc1.weight": (512, 3136),
        "fc1.bias": (512,),
        "fc2.weight": (10, 512),
        "fc2.bias": (10,),
    }
    conv = model.nodes[0].attributes
    assert conv["pads"] == (2, 2, 2, 2) and conv["kernel_shape"] == (5, 5)
    assert model.nodes[2].attributes == {"kernel_shape": (2, 2), "strides": (2, 2)}


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_deterministic_bytes_and_seeded_weights(name: str) -> None:
    first = zoo.build_model(name, seed=3)
    assert first == zoo.build_model(name, seed=3)
    other = zoo.build_model(name, seed=4)
    assert first != other
    assert onnx_io.fingerprint(onnx_io.load_model(first)) == onnx_io.fingerprint(onnx_io.load_model(other))


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_valid_for_onnx_and_canonically_encoded(name: str) -> None:
    data = zoo.build_model(name)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.SerializeToString() == data  # byte-identical to the reference serializer


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_numpy_forward_matches_onnxruntime(name: str) -> None:
    data = zoo.build_model(name)
    model = onnx_io.load_model(data)
    x = onnx_io.prepare_input(model, np.random.default_rng(0).random((16, 784), dtype=np.float32))
    expected = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Graph(model).forward(onnx_io.read_parameters(model), x)
    assert got.shape == (16, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_initialisation_scales() -> None:
    params = onnx_io.read_parameters(onnx_io.load_model(zoo.build_model("mnist_2nn")))
    assert params["fc1.weight"].std() == pytest.approx(np.sqrt(2 / 784), rel=0.02)  # He
    assert np.abs(params["fc3.weight"]).max() <= np.sqrt(6 / 210)  # Glorot-uniform
    assert not params["fc1.bias"].any()


def test_build_zoo_writes_every_model(tmp_path: Path) -> None:
    paths = zoo.build_zoo(tmp_path / "models")
    assert [p.name for p in paths] == ["logreg.onnx", "mnist_2nn.onnx", "mnist_cnn.onnx"]
    for path in paths:
        assert path.read_bytes() == zoo.build_model(path.stem)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [p.name for p in paths]


def test_resolve_model(tmp_path: Path) -> None:
    by_name = zoo.resolve_model("mnist_2nn")
    assert by_name.name == "mnist_2nn"
    path = tmp_path / "mine.onnx"
    path.write_bytes(zoo.build_model("logreg", seed=5))
    by_path = zoo.resolve_model(str(path))
    assert by_path.name == "mine"
    assert zoo.resolve_model("logreg", seed=5).raw == by_path.raw
    with pytest.raises(ModelError, match="logreg, mnist_2nn, mnist_cnn") as info:
        zoo.resolve_model("resnet50")
    assert "neither a zoo model" in str(info.value)
    with pytest.raises(ModelError, match="not in the zoo"):
        zoo.build_model("resnet50")


def test_build_mlp_makes_the_2nn_for_its_widths_and_refuses_bad_ones() -> None:
    def params(model: bytes) -> dict[str, np.ndarray]:
        return onnx_io.read_parameters(onnx_io.load_model(model))

    ours, theirs = params(zoo.build_mlp((200, 200), seed=3)), params(zoo.build_model("mnist_2nn", seed=3))
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert params(zoo.build_mlp((50,)))["fc2.weight"].shape == (10, 50)
    with pytest.raises(ModelError):
        zoo.build_mlp(())
