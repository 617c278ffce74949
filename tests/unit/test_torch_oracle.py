"""PyTorch as a test oracle: same weights and batch, same gradients; models exported from PyTorch train.

PyTorch is never imported by the library; these tests skip when it is not installed.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pytest

from unus_edge import onnx_io, zoo
from unus_edge.nn import Graph, TrainConfig, loss_and_grad, train

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

pytestmark = [  # every test runs with NumPy's products and with onnxruntime's (tests/conftest.py)
    pytest.mark.usefixtures("kernels"),
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class LogReg(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: Any) -> Any:
        return self.fc(x)


class TwoNN(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 200), nn.Linear(200, 200), nn.Linear(200, 10)

    def forward(self, x: Any) -> Any:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1, self.fc2 = nn.Linear(3136, 512), nn.Linear(512, 10)

    def forward(self, x: Any) -> Any:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


TWINS = {"logreg": LogReg, "mnist_2nn": TwoNN, "mnist_cnn": CNN}


def _twin(name: str, params: dict[str, np.ndarray]) -> Any:
    net = TWINS[name]()
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()}, strict=True)
    return net


def _assert_grads_close(ours: np.ndarray, theirs: np.ndarray, key: str, scale: float | None = None) -> None:
    """rtol 1e-4, with an absolute floor of 1e-4 of ``scale`` (the tensor's largest gradient) near 0."""
    scale = float(np.abs(theirs).max()) if scale is None else scale
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale, err_msg=key)


def _batch(model: onnx_io.OnnxModel, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = onnx_io.prepare_input(model, rng.random((size, 784), dtype=np.float32))
    return x, rng.integers(0, 10, size)


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_zoo_gradients_match_pytorch(name: str) -> None:
    model = zoo.resolve_model(name, seed=1)
    params = onnx_io.read_parameters(model)
    x, y = _batch(model, 16, seed=2)
    loss, grads = loss_and_grad(Graph(model), params, x, y)
    net = _twin(name, params)
    torch_loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-5)
    assert set(grads) == set(params)
    for key, parameter in net.named_parameters():
        _assert_grads_close(grads[key], parameter.grad.numpy(), key)


@pytest.mark.parametrize("name", ["mnist_2nn", "mnist_cnn"])
def test_sgd_trajectory_matches_pytorch(name: str) -> None:
    """Five SGD steps with momentum and weight decay, in the same order, land on the same weights."""
    model = zoo.resolve_model(name, seed=3)
    params = onnx_io.read_parameters(model)
    x, y = _batch(model, 20, seed=4)
    config = TrainConfig(epochs=1, batch_size=4, learning_rate=0.05, momentum=0.9, weight_decay=1e-3, seed=5)
    result = train(Graph(model), params, x, y, config)
    order = np.random.default_rng(np.random.SeedSequence(5).spawn(2)[0]).permutation(20)  # the trainer's shuffle
    net = _twin(name, params)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for start in range(0, 20, 4):
        index = order[start : start + 4]
        optimizer.zero_grad()
        F.cross_entropy(net(torch.from_numpy(x[index])), torch.from_numpy(y[index])).backward()
        optimizer.step()
    for key, parameter in net.named_parameters():
        np.testing.assert_allclose(result.params[key], parameter.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


# --------------------------------------------------------------------------- bring your own model


class SmallMLP(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: Any) -> Any:
        return self.body(x)


class SmallCNN(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.LeakyReLU(0.1),
            nn.AvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 3 * 3, 10))

    def forward(self, x: Any) -> Any:
        return self.head(self.features(x))


class ViewNet(nn.Module):  # type: ignore[misc]
    """``x.view(x.size(0), -1)`` exports Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x: Any) -> Any:
        x = torch.sigmoid(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def _export(net: Any, *, dynamo: bool = False) -> bytes:
    """``torch.onnx.export`` as documented in models/README.md: keep BatchNorm and Dropout trainable."""
    example = torch.zeros(2, 1, 28, 28)
    if dynamo:
        program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("N")},))
        return program.model_proto.SerializeToString()  # type: ignore[no-any-return]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
        )
    return buffer.getvalue()


def _sync(net: Any, params: dict[str, np.ndarray]) -> None:
    """Load the exported initializers back into the module (export may have run a training step)."""
    state = net.state_dict()
    for key, value in params.items():
        if key in state:
            state[key] = torch.from_numpy(value.copy())
    net.load_state_dict(state)


def _learnable_blobs(shape: tuple[int, ...], num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.random((10, *shape), dtype=np.float32)
    y = rng.integers(0, 10, num_examples)
    x = centers[y] + 0.1 * rng.standard_normal((num_examples, *shape)).astype(np.float32)
    return x.astype(np.float32), y


@pytest.mark.parametrize("factory", [SmallMLP, SmallCNN, ViewNet], ids=["mlp", "cnn", "view"])
def test_exported_model_loads_matches_and_trains(factory: type) -> None:
    torch.manual_seed(0)
    net = factory()
    model = onnx_io.load_model(_export(net), name=factory.__name__)
    graph = Graph(model)
    params = onnx_io.read_parameters(model)
    _sync(net, params)
    x, y = _learnable_blobs((1, 28, 28), 120)
    # inference: running statistics, no dropout
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(x[:8])).numpy()
    np.testing.assert_allclose(graph.forward(params, x[:8]), expected, rtol=1e-4, atol=1e-5)
    # training-mode gradients (batch statistics); the MLP's dropout makes its gradients random
    if factory is not SmallMLP:
        net.train()
        buffers = {k: v.copy() for k, v in params.items()}
        loss, grads = loss_and_grad(graph, buffers, x[:8], y[:8])
        torch_loss = F.cross_entropy(net(torch.from_numpy(x[:8])), torch.from_numpy(y[:8]))
        torch_loss.backward()
        assert loss == pytest.approx(torch_loss.item(), rel=1e-5)
        # the conv bias before BatchNorm has a zero gradient in exact arithmetic: compare it at model scale
        scale = max(float(p.grad.abs().max()) for p in net.parameters())
        for key, parameter in net.named_parameters():
            _assert_grads_close(grads[key], parameter.grad.numpy(), key, scale)
        state = net.state_dict()
        for key in ("features.1.running_mean", "features.1.running_var") if factory is SmallCNN else ():
            np.testing.assert_allclose(buffers[key], state[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    before, _ = loss_and_grad(graph, params, x, y, training=False)
    result = train(graph, params, x, y, TrainConfig(epochs=5, batch_size=10, learning_rate=0.05, momentum=0.9))
    after, _ = loss_and_grad(graph, result.params, x, y, training=False)
    assert after < 0.5 * before


def test_exported_unsupported_layer_is_named() -> None:
    from unus_edge.errors import UnsupportedOpError

    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.GELU())
    with pytest.raises(UnsupportedOpError) as info:
        Graph(onnx_io.load_model(_export(net)))
    assert info.value.op_type in ("Gelu", "Erf", "Div", "Mul", "Tanh", "Pow")
    assert info.value.node_name


def test_dynamo_exporter_with_onnxscript() -> None:
    """The default (dynamo) exporter of torch 2.9+ needs the onnxscript package (pip install onnxscript)."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(784, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = onnx_io.load_model(_export(net, dynamo=True))
    graph = Graph(model)
    x, _ = _learnable_blobs((1, 28, 28), 4)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(graph.forward(onnx_io.read_parameters(model), x), expected, rtol=1e-4, atol=1e-5)
