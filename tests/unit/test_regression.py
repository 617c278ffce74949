"""Regression data, losses and evaluations (issue 16: "or MSE for regression"); no sockets.

The end-to-end job through a broker is ``tests/integration/test_regression.py``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from unus_edge.aggregator._fedeval import _Request, combine
from unus_edge.data import REGRESSION, Dataset, load_partition, load_source, save_partition, write_source
from unus_edge.device._training import check_dataset, task_loss, train_task
from unus_edge.errors import DataError, MessageError
from unus_edge.messages import EvaluationResult, Task
from unus_edge.nn import Graph
from unus_edge.onnx_io import Evaluator, load_model, read_parameters
from unus_edge.zoo import build_mlp, resolve_model


def readings(count: int, targets: int = 1, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(count, 3)) * 50).astype(np.float32)  # sensor units, not pixels in [0, 1]
    y = rng.normal(size=(count, targets) if targets > 1 else count).astype(np.float32)
    return Dataset(x, y, REGRESSION)


def test_a_regression_dataset_has_float_targets_and_no_classes() -> None:
    data = readings(5, targets=2)
    assert data.is_regression and data.target_shape == (2,) and data.label_histogram().size == 0
    assert not Dataset(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), 4).is_regression
    with pytest.raises(DataError) as caught:
        Dataset(np.zeros((2, 3), np.float32), np.array([0.0, np.nan], np.float32), REGRESSION)
    assert caught.value.reason == "bad_targets"
    with pytest.raises(DataError) as caught:
        Dataset(np.zeros((2, 3), np.float32), np.zeros(2, np.float64), REGRESSION)
    assert caught.value.reason == "bad_dtype"


def test_a_regression_partition_round_trips_and_is_told_from_a_classification(tmp_path: Path) -> None:
    data = readings(20, targets=2)
    save_partition(tmp_path / "part.npz", data)
    back = load_partition(tmp_path / "part.npz")
    assert back.is_regression and np.array_equal(back.x, data.x) and np.array_equal(back.y, data.y)
    assert load_source(tmp_path / "part.npz", task="regression").is_regression
    with pytest.raises(DataError) as caught:
        load_source(tmp_path / "part.npz")  # a classification device given regression data
    assert caught.value.reason == "task_mismatch"


@pytest.mark.parametrize("targets", [1, 3])
def test_a_regression_csv_names_its_target_columns_and_reads_back_exactly(tmp_path: Path, targets: int) -> None:
    data = readings(12, targets=targets, seed=targets)
    path = write_source(data, tmp_path / "readings.csv", "csv")
    label = "label" if targets == 1 else ",".join(f"label{i}" for i in range(targets))
    back = load_source(path, task="regression", label_column=label)
    assert back.is_regression and back.target_shape == data.target_shape
    assert np.array_equal(back.x, data.x) and np.array_equal(back.y, data.y)  # float32 values survive the text


@pytest.mark.parametrize(("text", "reason", "fragment"), [
    ("temp,x0\n1.5,2\nwarm,3\n", "bad_row", "row 3, column 'temp'"),
    ("temp,x0\n1.5,2\nnan,3\n", "bad_row", "row 3: a target is NaN"),
    ("x0,x1\n1,2\n", "bad_column", "no target column"),
])
def test_a_malformed_regression_csv_is_refused_with_the_row(tmp_path: Path, text: str, reason: str,
                                                           fragment: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        load_source(path, task="regression", label_column="temp")
    assert caught.value.reason == reason and fragment in str(caught.value)


def test_image_sources_hold_classes_not_targets(tmp_path: Path) -> None:
    (tmp_path / "images" / "0").mkdir(parents=True)
    with pytest.raises(DataError) as caught:
        load_source(tmp_path / "images", task="regression")
    assert caught.value.reason == "task_mismatch"
    with pytest.raises(DataError) as caught:
        write_source(readings(3), tmp_path / "idx", "idx")
    assert caught.value.reason == "task_mismatch"


def test_the_loss_a_task_names_must_fit_the_devices_data() -> None:
    regression, classes = readings(4), Dataset(np.zeros((4, 784), np.float32), np.zeros(4, np.int64), 10)
    assert task_loss({"loss": "mse"}, regression) == "mse"
    assert task_loss({}, classes) == "softmax_cross_entropy"  # absent: what an older aggregator meant
    for config, data in (({}, regression), ({"loss": "mse"}, classes), ({"loss": "hinge"}, classes)):
        with pytest.raises(MessageError) as caught:
            task_loss(config, data)
        assert caught.value.reason == "bad_config" and caught.value.field == "config.loss"


def test_a_model_whose_outputs_do_not_match_the_targets_is_refused_before_registration() -> None:
    graph = Graph(load_model(build_mlp((4,), inputs=3, outputs=1, regression=True)))
    check_dataset(graph, readings(4), "readings.csv")
    with pytest.raises(DataError) as caught:
        check_dataset(graph, readings(4, targets=2), "readings.csv")
    assert caught.value.reason == "bad_targets" and "outputs (1,)" in str(caught.value)


def test_training_with_mse_lowers_the_error_the_evaluator_reports() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3 + rng.normal(scale=0.1, size=200)).astype(np.float32)
    data = Dataset(x, y, REGRESSION)
    model = load_model(build_mlp((), inputs=3, outputs=1, regression=True))  # a linear regression
    start = read_parameters(model)
    evaluator = Evaluator(model, backend="numpy")
    before = evaluator.evaluate(start, x, y, loss="mse")
    assert before.accuracy is None
    prediction = evaluator.predict(start, x)[:, 0].astype(np.float64)
    assert before.loss == pytest.approx(float(np.mean((prediction - y) ** 2)), rel=1e-6)  # the definition
    task = Task("pi-0", "t", 1, 0, 5, 10, 0.05, config={"loss": "mse"})
    result = train_task(Graph(model), start, data, task, threading.Event())
    after = evaluator.evaluate(result.trained, x, y, loss="mse")
    assert after.loss < 0.02 * before.loss and after.loss < 0.02  # near the noise's variance, 0.01
    assert Evaluator(model, backend="onnxruntime").evaluate(result.trained, x, y, loss="mse").loss == \
        pytest.approx(after.loss, rel=1e-5)


def test_federated_mse_is_the_examples_weighted_mean() -> None:
    request = _Request(server_round=1, version=1, asked={"a": "pi-0", "b": "pi-1", "c": "pi-2"}, started=0.0)
    request.answers = {
        "pi-0": EvaluationResult("pi-0", "s", "a", 1, 10, 2.0, None, mse=2.0),
        "pi-1": EvaluationResult("pi-1", "s", "b", 1, 30, 1.0, None, mse=1.0),
        "pi-2": EvaluationResult("pi-2", "s", "c", 1, 0, None, None, error="no data"),
    }
    metrics = combine(request, 0.5)
    assert metrics.mse == pytest.approx(1.25) and metrics.loss == pytest.approx(1.25)
    assert metrics.mse_std == pytest.approx(0.5) and metrics.accuracy is None and metrics.num_failures == 1


def test_the_zoo_models_are_unchanged_by_the_regression_builder() -> None:
    assert build_mlp((200, 200)) != b""
    assert load_model(build_mlp((200, 200))).outputs[0].name == "logits"
    assert resolve_model("mnist_2nn").outputs[0].name == "logits"
    assert load_model(build_mlp((8,), inputs=3, outputs=2, regression=True)).outputs[0].name == "prediction"
