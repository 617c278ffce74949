"""The training loop: SGD semantics, hooks, determinism, losses, and learning on real MNIST."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from unus_edge import onnx_io, zoo
from unus_edge.errors import ConfigError, DataError, ParameterError
from unus_edge.nn import SGD, Graph, TrainConfig, TrainHook, loss_and_grad, loss_value_and_grad, train

Array = np.ndarray


def _blobs(num_examples: int, seed: int = 0) -> tuple[Array, Array]:
    """Ten well-separated Gaussian blobs in 784 dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((10, 784)).astype(np.float32)
    y = rng.integers(0, 10, num_examples)
    x = centers[y] + 0.5 * rng.standard_normal((num_examples, 784)).astype(np.float32)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def two_nn() -> tuple[Graph, dict[str, Array]]:
    model = zoo.resolve_model("mnist_2nn")
    return Graph(model), onnx_io.read_parameters(model)


def test_loss_decreases_and_result_fields(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    graph, params = two_nn
    x, y = _blobs(230)
    config = TrainConfig(epochs=3, batch_size=20, learning_rate=0.05)
    before, _ = loss_and_grad(graph, params, x, y, training=False)
    result = train(graph, params, x, y, config)
    after, _ = loss_and_grad(graph, result.params, x, y, training=False)
    assert after < 0.2 * before
    assert result.num_examples == 230
    assert result.steps == 3 * 12  # ceil(230 / 20) per epoch
    assert 0 < result.mean_loss < before
    assert set(result.params) == set(params)
    assert all(v.dtype == np.float32 for v in result.params.values())


def test_train_does_not_mutate_the_callers_parameters(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    graph, params = two_nn
    snapshot = {k: v.copy() for k, v in params.items()}
    x, y = _blobs(40)
    train(graph, params, x, y, TrainConfig(epochs=1, batch_size=8, learning_rate=0.1, momentum=0.9))
    for key, value in params.items():
        np.testing.assert_array_equal(value, snapshot[key])


def test_same_seed_is_bit_identical_and_another_seed_is_not() -> None:
    model = onnx_io.load_model(_dropout_mlp())
    graph = Graph(model)
    params = onnx_io.read_parameters(model)
    x, y = _blobs(64)
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9, weight_decay=1e-4, seed=7)
    first = train(graph, params, x, y, config)
    second = train(Graph(model), params, x, y, config)
    for key in params:
        assert first.params[key].tobytes() == second.params[key].tobytes()
    assert first.mean_loss == second.mean_loss
    other = train(graph, params, x, y, TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, seed=8))
    assert not np.array_equal(first.params["w1"], other.params["w1"])


def _dropout_mlp() -> bytes:
    """784 -> 32 ReLU -> Dropout(0.3) -> 10, written with the engine's own encoder."""
    rng = np.random.default_rng(0)
    nodes = [
        onnx_io.Node("Gemm", ("x", "w1", "b1"), ("h",), "fc1", "", {"transB": 1}),
        onnx_io.Node("Relu", ("h",), ("r",), "relu"),
        onnx_io.Node("Dropout", ("r", "ratio"), ("d",), "dropout"),
        onnx_io.Node("Gemm", ("d", "w2", "b2"), ("logits",), "fc2", "", {"transB": 1}),
    ]
    initializers = {
        "w1": (rng.standard_normal((32, 784)) * 0.05).astype(np.float32),
        "b1": np.zeros(32, np.float32),
        "ratio": np.array(0.3, np.float32),
        "w2": (rng.standard_normal((10, 32)) * 0.2).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    f32 = np.dtype(np.float32)
    return onnx_io.encode_model(
        nodes=nodes,
        initializers=initializers,
        inputs=[onnx_io.ValueInfo("x", f32, ("N", 784))],
        outputs=[onnx_io.ValueInfo("logits", f32, ("N", 10))],
        opset=13,
        graph_name="dropout_mlp",
    )


def test_dropout_ratio_constant_is_not_trained() -> None:
    """A float initializer used as Dropout's ratio is a parameter but gets no gradient."""
    graph = Graph(onnx_io.load_model(_dropout_mlp()))
    assert "ratio" in graph.buffers
    assert "ratio" not in graph.trainable


class Recorder(TrainHook):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_train_begin(self, params: dict[str, Array]) -> None:
        self.calls.append("begin")

    def on_gradients(self, params: dict[str, Array], grads: dict[str, Array]) -> None:
        self.calls.append("grads")

    def on_train_end(self, initial: Mapping[str, Array], final: dict[str, Array]) -> None:
        self.calls.append("end")


class FedProx(TrainHook):
    """Adds mu * (w - w_global) to every gradient, in place."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.global_params: dict[str, Array] = {}

    def on_train_begin(self, params: dict[str, Array]) -> None:
        self.global_params = {k: v.copy() for k, v in params.items()}

    def on_gradients(self, params: dict[str, Array], grads: dict[str, Array]) -> None:
        for key, grad in grads.items():
            grad += self.mu * (params[key] - self.global_params[key])


class KeepLargest(TrainHook):
    """Distributed Selective SGD: keep only the largest 10% of each delta, in place."""

    def on_train_end(self, initial: Mapping[str, Array], final: dict[str, Array]) -> None:
        for key, value in final.items():
            delta = value - initial[key]
            threshold = np.quantile(np.abs(delta), 0.9)
            value[...] = initial[key] + np.where(np.abs(delta) >= threshold, delta, 0)


def test_hooks_are_called_in_order(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    graph, params = two_nn
    recorder = Recorder()
    x, y = _blobs(30)
    result = train(graph, params, x, y, TrainConfig(epochs=2, batch_size=10, learning_rate=0.01), hooks=[recorder])
    assert recorder.calls == ["begin"] + ["grads"] * result.steps + ["end"]


def test_fedprox_hook_changes_gradients_in_place(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    graph, params = two_nn
    x, y = _blobs(60)
    config = TrainConfig(epochs=3, batch_size=10, learning_rate=0.05)
    plain = train(graph, params, x, y, config)
    proximal = train(graph, params, x, y, config, hooks=[FedProx(mu=5.0)])

    def drift(result_params: dict[str, Array]) -> float:
        return sum(float(np.sum((result_params[k] - params[k]) ** 2)) for k in params)

    assert drift(proximal.params) < 0.7 * drift(plain.params)


def test_train_end_hook_can_mask_the_delta(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    graph, params = two_nn
    x, y = _blobs(40)
    result = train(graph, params, x, y, TrainConfig(epochs=1, batch_size=10, learning_rate=0.05), hooks=[KeepLargest()])
    changed = np.count_nonzero(result.params["fc1.weight"] != params["fc1.weight"])
    assert 0 < changed <= 0.1 * params["fc1.weight"].size + 1


def test_sgd_matches_the_pytorch_update_rule() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(5).astype(np.float32)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(3)]
    params = {"w": weight.copy()}
    optimizer = SGD(0.1, momentum=0.9, weight_decay=0.01)
    expected = weight.astype(np.float64)
    velocity = None
    for grad in grads:
        before = grad.copy()
        optimizer.step(params, {"w": grad})
        np.testing.assert_array_equal(grad, before)  # gradients are not modified
        direction = grad + 0.01 * expected
        velocity = direction if velocity is None else 0.9 * velocity + direction
        expected = expected - 0.1 * velocity
    np.testing.assert_allclose(params["w"], expected, rtol=1e-6)
    assert params["w"].dtype == np.float32


def test_cross_entropy_is_stable_and_its_gradient_is_softmax_minus_onehot() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value, grad = loss_value_and_grad(logits, np.array([0, 2]), "softmax_cross_entropy")
    assert value == pytest.approx(np.log(3) / 2, rel=1e-6)
    np.testing.assert_allclose(grad, [[0, 0, 0], [1 / 6, 1 / 6, -1 / 3]], atol=1e-7)
    assert grad.dtype == np.float32


def test_mse_loss_learns_a_linear_map() -> None:
    model = zoo.resolve_model("logreg")
    graph = Graph(model)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 784)).astype(np.float32)
    target_weight = (rng.standard_normal((784, 10)) * 0.05).astype(np.float32)
    y = x @ target_weight
    params = onnx_io.read_parameters(model)
    before, _ = loss_and_grad(graph, params, x, y, loss="mse", training=False)
    result = train(graph, params, x, y, TrainConfig(epochs=20, batch_size=20, learning_rate=0.01, loss="mse"))
    after, _ = loss_and_grad(graph, result.params, x, y, loss="mse", training=False)
    assert after < 0.1 * before


def test_cnn_accepts_flat_rows(tmp_path: Path) -> None:
    model = zoo.resolve_model("mnist_cnn")
    graph = Graph(model)
    x, y = _blobs(6)
    result = train(graph, onnx_io.read_parameters(model), x, y, TrainConfig(epochs=1, batch_size=3, learning_rate=0.01))
    assert result.steps == 2
    value, grads = loss_and_grad(graph, result.params, x, y)
    assert np.isfinite(value) and grads["conv1.weight"].shape == (32, 1, 5, 5)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"epochs": -1}, "train.epochs"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"learning_rate": 0.0}, "train.learning_rate"),
        ({"learning_rate": float("nan")}, "train.learning_rate"),
        ({"momentum": 1.0}, "train.momentum"),
        ({"weight_decay": -1.0}, "train.weight_decay"),
        ({"loss": "hinge"}, "train.loss"),
    ],
)
def test_config_validation(kwargs: dict[str, object], key: str) -> None:
    settings: dict[str, object] = {"epochs": 1, "batch_size": 1, "learning_rate": 0.1} | kwargs
    with pytest.raises(ConfigError) as info:
        TrainConfig(**settings)  # type: ignore[arg-type]
    assert info.value.key == key


def test_bad_inputs(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    graph, params = two_nn
    x, y = _blobs(10)
    config = TrainConfig(epochs=1, batch_size=5, learning_rate=0.1)
    with pytest.raises(DataError, match="bad_labels"):
        train(graph, params, x, y[:5], config)
    with pytest.raises(DataError, match="integer labels"):
        train(graph, params, x, y.astype(np.float32), config)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
        train(graph, params, x, np.full(10, 10), config)
    with pytest.raises(DataError, match="bad_shape"):
        train(graph, params, x[:, :700], y, config)
    wrong = dict(params)
    wrong["fc2.weight"] = wrong["fc2.weight"].astype(np.float64)
    with pytest.raises(ParameterError, match=r"'fc2\.weight': wrong dtype"):
        train(graph, wrong, x, y, config)


def test_2nn_learns_mnist(mnist_dir: Path) -> None:
    """2NN, 5,000 training images, 2 epochs (a step decay between them), >= 90% on 1,000 test images."""
    from unus_edge.data import load_mnist

    train_set = load_mnist(mnist_dir, "train", num_examples=5000)
    test_set = load_mnist(mnist_dir, "test", num_examples=1000)
    model = zoo.resolve_model("mnist_2nn")
    graph = Graph(model)
    params = onnx_io.read_parameters(model)
    for epoch, learning_rate in enumerate((0.1, 0.02)):
        config = TrainConfig(epochs=1, batch_size=10, learning_rate=learning_rate, seed=epoch)
        params = train(graph, params, train_set.x, train_set.y, config).params
    result = onnx_io.Evaluator(model, backend="numpy").evaluate(params, test_set.x, test_set.y)
    assert result.num_examples == 1000
    assert result.accuracy >= 0.90, result


def test_device_install_needs_no_onnx_onnxruntime_or_torch(tmp_path: Path) -> None:
    """The core install has numpy only: load, train, evaluate and write with those imports blocked."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnx", "onnxruntime", "torch", "google"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import numpy as np
from unus_edge import onnx_io, zoo
from unus_edge.nn import Graph, TrainConfig, train
model = zoo.resolve_model("mnist_cnn")
params = onnx_io.read_parameters(model)
x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
y = np.arange(8) % 10
result = train(Graph(model), params, x, y, TrainConfig(epochs=1, batch_size=4, learning_rate=0.01))
evaluator = onnx_io.Evaluator(model)
assert evaluator.backend == "numpy", evaluator.backend
print(evaluator.evaluate(result.params, x, y).num_examples)
onnx_io.save_model(model, sys.argv[1], result.params)
assert not any(m.split(".")[0] in ("onnx", "onnxruntime", "torch") for m in sys.modules)
"""
    path = tmp_path / "trained.onnx"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8"
    assert onnx_io.load_model(path).parameter_names == zoo.resolve_model("mnist_cnn").parameter_names


# ------------------------------------------------------------------------------ the folded learning rate


class ReadsGradients(TrainHook):
    """Looks at the gradients without changing them: the trainer must hand over true gradients."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_gradients(self, params: dict[str, Array], grads: dict[str, Array]) -> None:
        self.norms.append(float(np.linalg.norm(grads["fc3.bias"])))


def test_a_late_label_out_of_range_is_refused_before_training(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    graph, params = two_nn
    x, y = _blobs(10)
    y[7] = 10
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
        train(graph, params, x, y, TrainConfig(epochs=1, batch_size=5, learning_rate=0.1))


def test_plain_sgd_folds_the_learning_rate_within_rounding(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    """w -= (lr/n * dL/dz) backpropagated equals w -= lr * g, up to float32 rounding."""
    graph, params = two_nn
    x, y = _blobs(200)
    config = TrainConfig(epochs=2, batch_size=10, learning_rate=0.1, seed=5)
    folded = train(graph, params, x, y, config)
    hook = ReadsGradients()
    classic = train(graph, params, x, y, config, hooks=[hook])
    assert len(hook.norms) == classic.steps == folded.steps
    for key in params:
        assert not np.array_equal(params[key], folded.params[key])
        np.testing.assert_allclose(folded.params[key], classic.params[key], rtol=1e-4, atol=2e-6)
    assert folded.mean_loss == pytest.approx(classic.mean_loss, rel=1e-5)


def test_a_hook_that_reads_gradients_sees_true_gradients(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    """With such a hook the update is PyTorch's w -= lr * g, bit for bit, from loss_and_grad's g."""
    graph, params = two_nn
    x, y = _blobs(20)
    config = TrainConfig(epochs=1, batch_size=20, learning_rate=0.1, seed=1)
    hook = ReadsGradients()
    trained = train(graph, params, x, y, config, hooks=[hook])
    order = np.random.default_rng(np.random.SeedSequence(1).spawn(2)[0]).permutation(20)
    _, grads = loss_and_grad(graph, params, x[order], y[order])
    assert hook.norms == [float(np.linalg.norm(grads["fc3.bias"]))]
    for key in params:
        expected = params[key] - np.multiply(grads[key], np.float32(0.1))
        assert np.array_equal(trained.params[key], expected), key


def test_on_step_begin_can_abandon_training(two_nn: tuple[Graph, dict[str, Array]]) -> None:
    class StopTrainingError(Exception):
        pass

    class StopAtThree(TrainHook):
        def on_step_begin(self, step: int) -> None:
            if step == 3:
                raise StopTrainingError

    graph, params = two_nn
    x, y = _blobs(100)
    with pytest.raises(StopTrainingError):
        train(graph, params, x, y, TrainConfig(epochs=1, batch_size=10, learning_rate=0.1), hooks=[StopAtThree()])
