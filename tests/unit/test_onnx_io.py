"""ONNX I/O without the onnx package, checked against the onnx package and onnxruntime."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unus_edge import _protobuf as pb
from unus_edge import onnx_io, zoo
from unus_edge.errors import DataError, ModelError, ParameterError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
helper = onnx.helper
numpy_helper = onnx.numpy_helper
TP = onnx.TensorProto


def _small_model(**graph_kwargs: object) -> onnx.ModelProto:
    """x[N,4] -> Gemm(W[3,4], b[3], transB) -> Relu -> Reshape(shape const) -> y[N,3]."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w")
    bias = helper.make_tensor("b", TP.FLOAT, [3], [0.1, -0.2, 0.3])  # float_data, not raw_data
    shape = helper.make_tensor("shape", TP.INT64, [2], [-1, 3])  # int64_data
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm", transB=1, alpha=1.0),
        helper.make_node("Relu", ["h"], ["r"], name="relu", doc_string="a doc string"),
        helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 3])],
        [weight, bias, shape],
        **graph_kwargs,  # type: ignore[arg-type]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], doc_string="model doc")
    helper.set_model_props(model, {"owner": "tests"})
    onnx.checker.check_model(model)
    return model


def test_load_zoo_model_structure() -> None:
    model = onnx_io.load_model(zoo.build_model("mnist_2nn"), name="2nn")
    assert model.name == "2nn"
    assert model.opset == zoo.OPSET
    assert model.inputs == (onnx_io.ValueInfo("x", np.dtype(np.float32), ("N", 784)),)
    assert model.outputs == (onnx_io.ValueInfo("logits", np.dtype(np.float32), ("N", 10)),)
    assert [node.op_type for node in model.nodes] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert model.nodes[0].attributes == {"transB": 1}
    assert model.parameter_names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias")
    assert not model.initializers["fc1.weight"].flags.writeable


def test_parsed_values_equal_the_onnx_package() -> None:
    proto = _small_model()
    model = onnx_io.load_model(proto.SerializeToString())
    for tensor in proto.graph.initializer:
        expected = numpy_helper.to_array(tensor)
        got = model.initializers[tensor.name]
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert model.parameter_names == ("w", "b")  # the int64 shape is structure, not a parameter
    assert model.nodes[0].attributes == {"transB": 1, "alpha": 1.0}
    assert model.nodes[1].name == "relu"


def test_all_attribute_kinds_parse() -> None:
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3))
    node = helper.make_node(
        "Custom",
        ["a"],
        ["b"],
        domain="example",
        f=0.5,
        i=-7,
        s="text",
        t=tensor,
        floats=[1.5, 2.5],
        ints=[-1, 2, 3],
        strings=["p", "q"],
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TP.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TP.FLOAT, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("example", 1)])
    model = onnx_io.load_model(proto.SerializeToString())
    attributes = dict(model.nodes[0].attributes)
    np.testing.assert_array_equal(attributes.pop("t"), np.arange(6).reshape(2, 3))
    assert attributes == {
        "f": 0.5,
        "i": -7,
        "s": "text",
        "floats": (1.5, 2.5),
        "ints": (-1, 2, 3),
        "strings": ("p", "q"),
    }
    assert model.nodes[0].domain == "example"
    assert model.opset_imports == {"": 13, "example": 1}
    assert model.outputs[0].shape is None


@pytest.mark.parametrize(
    ("dtype", "code"),
    [
        (np.float32, TP.FLOAT),
        (np.float64, TP.DOUBLE),
        (np.float16, TP.FLOAT16),
        (np.int64, TP.INT64),
        (np.int32, TP.INT32),
        (np.int8, TP.INT8),
        (np.uint8, TP.UINT8),
        (np.bool_, TP.BOOL),
    ],
)
@pytest.mark.parametrize("raw", [True, False])
def test_tensor_storage_variants(dtype: type, code: int, raw: bool) -> None:
    values = np.array([[0, 1, 2], [3, 4, 5]]).astype(dtype)
    if raw:
        tensor = numpy_helper.from_array(values, "t")
    else:
        tensor = helper.make_tensor("t", code, values.shape, values.flatten().tolist())
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1])],
        [tensor],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    got = onnx_io.load_model(proto.SerializeToString()).initializers["t"]
    assert got.dtype == values.dtype
    np.testing.assert_array_equal(got, values)


def test_initializers_listed_as_inputs_are_not_inputs() -> None:
    """IR < 4 models list every initializer in graph.input too."""
    proto = _small_model()
    for tensor in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    model = onnx_io.load_model(proto.SerializeToString())
    assert [i.name for i in model.inputs] == ["x"]


def test_model_bytes_writes_new_weights_and_keeps_everything_else() -> None:
    proto = _small_model()
    model = onnx_io.load_model(proto.SerializeToString())
    params = onnx_io.read_parameters(model)
    params["w"] += 1.0
    params["b"][:] = [7.0, 8.0, 9.0]
    written = onnx.load_from_string(onnx_io.model_bytes(model, params))
    onnx.checker.check_model(written, full_check=True)
    tensors = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    np.testing.assert_array_equal(tensors["w"], params["w"])
    np.testing.assert_array_equal(tensors["b"], [7.0, 8.0, 9.0])
    np.testing.assert_array_equal(tensors["shape"], [-1, 3])
    assert written.doc_string == "model doc"
    assert written.metadata_props[0].key == "owner"
    assert written.graph.node[1].doc_string == "a doc string"
    # identical to what the reference serializer produces for the same message
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(params["w"], "w"))
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(params["b"], "b"))
    assert onnx_io.model_bytes(model, params) == proto.SerializeToString()


def test_model_bytes_without_params_is_the_model() -> None:
    data = zoo.build_model("logreg")
    assert onnx_io.model_bytes(onnx_io.load_model(data)) == data


def test_model_bytes_checks_parameters() -> None:
    model = onnx_io.load_model(zoo.build_model("logreg"))
    params = onnx_io.read_parameters(model)
    params["fc.weight"] = params["fc.weight"][:5]
    with pytest.raises(ParameterError, match=r"fc\.weight.*shape"):
        onnx_io.model_bytes(model, params)


def test_save_model_round_trip(tmp_path: Path) -> None:
    model = onnx_io.load_model(zoo.build_model("logreg"), name="logreg")
    params = onnx_io.read_parameters(model)
    params["fc.bias"][:] = 3.0
    path = tmp_path / "out.onnx"
    onnx_io.save_model(model, path, params)
    loaded = onnx_io.load_model(path)
    assert loaded.name == "out"
    np.testing.assert_array_equal(loaded.initializers["fc.bias"], np.full(10, 3.0, np.float32))
    assert list(tmp_path.iterdir()) == [path]


def test_save_model_to_missing_folder_is_model_error(tmp_path: Path) -> None:
    model = onnx_io.load_model(zoo.build_model("logreg"))
    with pytest.raises(ModelError, match="unwritable"):
        onnx_io.save_model(model, tmp_path / "missing" / "m.onnx")


def test_read_parameters_returns_writable_copies() -> None:
    model = onnx_io.load_model(zoo.build_model("logreg"))
    params = onnx_io.read_parameters(model)
    params["fc.weight"][:] = 0
    assert np.any(model.initializers["fc.weight"] != 0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p: p.pop("fc.bias"), "'fc.bias': missing"),
        (lambda p: p.__setitem__("extra", np.zeros(1, np.float32)), "'extra': extra"),
        (lambda p: p.__setitem__("fc.bias", np.zeros(11, np.float32)), r"'fc\.bias': wrong shape \(11,\)"),
        (lambda p: p.__setitem__("fc.bias", np.zeros(10, np.float64)), "'fc.bias': wrong dtype float64"),
        (lambda p: p.__setitem__("fc.bias", [0.0] * 10), "not an array"),
    ],
)
def test_check_parameters_names_the_key(change: object, match: str) -> None:
    model = onnx_io.load_model(zoo.build_model("logreg"))
    params = onnx_io.read_parameters(model)
    change(params)  # type: ignore[operator]
    with pytest.raises(ParameterError, match=match) as info:
        onnx_io.check_parameters(model, params)
    assert info.value.name in params or info.value.name == "fc.bias"


# --------------------------------------------------------------------------- corrupt input


def test_every_truncation_of_a_model_is_a_model_error() -> None:
    data = _small_model().SerializeToString()
    for cut in range(len(data)):
        try:
            onnx_io.load_model(data[:cut])
        except ModelError:
            continue
        # a cut between two complete top-level fields is a valid (smaller) message
        assert cut > 0


def test_truncated_file_names_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(zoo.build_model("mnist_2nn")[:5000])
    with pytest.raises(ModelError, match="truncated") as info:
        onnx_io.load_model(path)
    assert info.value.model == "cut"


def test_random_corruption_raises_only_model_error() -> None:
    data = bytearray(_small_model().SerializeToString())
    rng = np.random.default_rng(0)
    for _ in range(300):
        corrupt = bytearray(data)
        for position in rng.integers(0, len(data), 3):
            corrupt[position] = int(rng.integers(0, 256))
        try:
            onnx_io.load_model(bytes(corrupt))
        except ModelError:
            pass


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "no graph"),
        (b"this is not an onnx file", "corrupt|truncated|bad_"),
        (b"\x3a\x00", "no opset_import"),  # an empty graph and no opset
    ],
)
def test_not_a_model(data: bytes, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        onnx_io.load_model(data)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unreadable"):
        onnx_io.load_model(tmp_path / "nope.onnx")


def test_raw_data_size_mismatch() -> None:
    proto = _small_model()
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-4]
    with pytest.raises(ModelError, match="raw_data holds 44 bytes"):
        onnx_io.load_model(proto.SerializeToString())


def test_external_data_is_rejected() -> None:
    proto = _small_model()
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TP.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    with pytest.raises(ModelError, match="external data"):
        onnx_io.load_model(proto.SerializeToString())


def test_string_tensor_is_rejected() -> None:
    proto = _small_model()
    proto.graph.initializer.append(helper.make_tensor("names", TP.STRING, [1], [b"a"]))
    with pytest.raises(ModelError, match="data type 8"):
        onnx_io.load_model(proto.SerializeToString())


# --------------------------------------------------------------------------- fingerprint


def _reorder_graph_fields(data: bytes) -> bytes:
    """The same model with the graph's repeated fields written in reverse field order."""
    top = list(pb.iter_fields(data))
    out = pb.Writer()
    for number, _wire, value in top:
        if number == 7:
            assert isinstance(value, memoryview)
            graph = pb.Writer()
            for g_number, g_wire, g_value in sorted(pb.iter_fields(value), key=lambda f: -f[0]):
                graph.raw(pb.encode_field_raw(g_number, g_wire, g_value))
            out.message(7, graph)
    for number, wire, value in reversed(top):
        if number != 7:
            out.raw(pb.encode_field_raw(number, wire, value))
    return out.getvalue()


def test_fingerprint_ignores_weights_and_field_order() -> None:
    model = onnx_io.load_model(zoo.build_model("mnist_2nn", seed=0))
    other_seed = onnx_io.load_model(zoo.build_model("mnist_2nn", seed=1))
    reordered_bytes = _reorder_graph_fields(zoo.build_model("mnist_2nn", seed=2))
    assert reordered_bytes != zoo.build_model("mnist_2nn", seed=2)
    reordered = onnx_io.load_model(reordered_bytes)
    onnx.checker.check_model(onnx.load_from_string(reordered_bytes))
    assert onnx_io.fingerprint(model) == onnx_io.fingerprint(other_seed) == onnx_io.fingerprint(reordered)
    assert onnx_io.fingerprint(model).startswith("sha256:")
    assert len(onnx_io.fingerprint(model)) == len("sha256:") + 64


def test_fingerprint_does_not_depend_on_the_hosts_byte_order() -> None:
    """A big-endian host holds native arrays in '>' order: the hash is of the little-endian bytes."""
    model = onnx_io.load_model(zoo.build_model("mnist_cnn"))
    as_big_endian = {
        key: array.astype(array.dtype.newbyteorder(">")) for key, array in model.initializers.items()
    }
    inputs = tuple(i._replace(dtype=None if i.dtype is None else i.dtype.newbyteorder(">")) for i in model.inputs)
    swapped = dataclasses.replace(model, initializers=as_big_endian, inputs=inputs)
    assert any(a.dtype.byteorder == ">" for a in as_big_endian.values())
    assert onnx_io.fingerprint(swapped) == onnx_io.fingerprint(model)


def test_fingerprint_is_stable_across_processes() -> None:
    code = (
        "from unus_edge import zoo, onnx_io;"
        "print(onnx_io.fingerprint(onnx_io.load_model(zoo.build_model('mnist_cnn'))))"
    )
    env_hash = {"PYTHONHASHSEED": "123"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**env_hash})
    assert result.stdout.strip() == onnx_io.fingerprint(onnx_io.load_model(zoo.build_model("mnist_cnn")))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.graph.node[1].__setattr__("op_type", "Sigmoid"),
        lambda m: next(a for a in m.graph.node[0].attribute if a.name == "transB").__setattr__("i", 0),
        lambda m: m.graph.node[2].input.__setitem__(0, "h"),  # an edge
        lambda m: m.graph.initializer[2].int64_data.__setitem__(1, 1),  # a structural constant
        lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 5),
        lambda m: m.opset_import[0].__setattr__("version", 14),
    ],
)
def test_fingerprint_changes_with_structure(mutate: object) -> None:
    proto = _small_model()
    before = onnx_io.fingerprint(onnx_io.load_model(proto.SerializeToString()))
    mutate(proto)  # type: ignore[operator]
    assert onnx_io.fingerprint(onnx_io.load_model(proto.SerializeToString())) != before


def test_fingerprint_ignores_names_and_docs() -> None:
    proto = _small_model()
    before = onnx_io.fingerprint(onnx_io.load_model(proto.SerializeToString()))
    proto.graph.node[0].name = "renamed"
    proto.graph.node[0].doc_string = "docs"
    proto.producer_name = "someone"
    assert onnx_io.fingerprint(onnx_io.load_model(proto.SerializeToString())) == before


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_evaluator_backends_agree_with_a_fresh_session(name: str) -> None:
    model = onnx_io.load_model(zoo.build_model(name))
    rng = np.random.default_rng(3)
    params = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in model.initializers.items()}
    x = rng.random((37, 784), dtype=np.float32)  # flat rows are reshaped to the input shape
    y = rng.integers(0, 10, 37)
    fresh = ort.InferenceSession(onnx_io.model_bytes(model, params), providers=["CPUExecutionProvider"])
    expected = fresh.run(None, {"x": onnx_io.prepare_input(model, x)})[0]
    fast = onnx_io.Evaluator(model, backend="onnxruntime")
    numpy = onnx_io.Evaluator(model, backend="numpy")
    assert (fast.backend, numpy.backend) == ("onnxruntime", "numpy")
    np.testing.assert_allclose(fast.predict(params, x, batch_size=10), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(numpy.predict(params, x, batch_size=10), expected, rtol=0, atol=1e-5)
    shifted = expected - expected.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(37), y].mean()
    accuracy = (expected.argmax(axis=1) == y).mean()
    for evaluator in (fast, numpy):
        result = evaluator.evaluate(params, x, y, batch_size=16)
        assert result.num_examples == 37
        assert result.loss == pytest.approx(loss, rel=1e-5)
        assert result.accuracy == pytest.approx(accuracy)


def test_evaluator_feeds_new_weights_to_the_same_session() -> None:
    model = onnx_io.load_model(zoo.build_model("logreg"))
    evaluator = onnx_io.Evaluator(model, backend="onnxruntime")
    session = evaluator._session
    x = np.ones((2, 784), np.float32)
    params = onnx_io.read_parameters(model)
    first = evaluator.predict(params, x)
    params["fc.bias"] += 1.0
    second = evaluator.predict(params, x)
    np.testing.assert_allclose(second - first, 1.0, rtol=0, atol=1e-5)
    assert evaluator._session is session


def test_evaluator_auto_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    model = onnx_io.load_model(zoo.build_model("logreg"))
    assert onnx_io.Evaluator(model).backend == "numpy"
    with pytest.raises(ModelError, match="onnxruntime is not installed"):
        onnx_io.Evaluator(model, backend="onnxruntime")


def test_evaluator_checks_inputs() -> None:
    model = onnx_io.load_model(zoo.build_model("logreg"))
    evaluator = onnx_io.Evaluator(model, backend="numpy")
    params = onnx_io.read_parameters(model)
    with pytest.raises(DataError, match="bad_shape"):
        evaluator.predict(params, np.zeros((3, 5), np.float32))
    with pytest.raises(DataError, match="bad_labels"):
        evaluator.evaluate(params, np.zeros((3, 784), np.float32), np.array([0, 1, 10]))
    with pytest.raises(ParameterError, match="missing"):
        evaluator.predict({}, np.zeros((3, 784), np.float32))
    assert evaluator.evaluate(params, np.zeros((0, 784), np.float32), np.zeros(0, np.int64)).num_examples == 0


def test_prepare_input() -> None:
    model = onnx_io.load_model(zoo.build_model("mnist_cnn"))
    flat = np.arange(2 * 784, dtype=np.float64).reshape(2, 784)
    prepared = onnx_io.prepare_input(model, flat)
    assert prepared.shape == (2, 1, 28, 28)
    assert prepared.dtype == np.float32
    assert prepared.flags.c_contiguous


def test_evaluator_reports_onnxruntime_failures() -> None:
    from unus_edge.errors import UnsupportedOpError

    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], name="mystery", domain="example")],
        "custom",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("example", 1)])
    model = onnx_io.load_model(proto.SerializeToString())
    with pytest.raises(ModelError, match="onnxruntime_failed"):
        onnx_io.Evaluator(model, backend="onnxruntime")
    with pytest.raises(UnsupportedOpError, match="Mystery"):  # auto falls back to numpy, which says why
        onnx_io.Evaluator(model)
