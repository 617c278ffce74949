"""The synthetic dataset: deterministic, MNIST-shaped, 8-bit, and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from unus_edge.data import Dataset, synthetic
from unus_edge.data._dataset import encode_pixels
from unus_edge.errors import DataError


def flat(dataset: Dataset) -> np.ndarray:
    return dataset.x.reshape(len(dataset), -1)


def nearest_class_mean_accuracy(train: Dataset, test: Dataset) -> float:
    means = np.stack([flat(train)[train.y == label].mean(axis=0) for label in range(train.num_classes)])
    distances = ((flat(test)[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return float(np.mean(distances.argmin(axis=1) == test.y))


def test_shapes_dtypes_and_range() -> None:
    dataset = synthetic(300, seed=0)
    assert dataset.x.shape == (300, 1, 28, 28)
    assert dataset.x.dtype == np.float32
    assert dataset.y.dtype == np.int64
    assert dataset.num_classes == 10
    assert float(dataset.x.min()) >= 0.0
    assert float(dataset.x.max()) <= 1.0
    assert dataset.label_histogram().tolist() == [30] * 10  # balanced


def test_values_are_8bit_pixels() -> None:
    assert encode_pixels(synthetic(50, seed=1).x) is not None


def test_looks_like_digits_on_a_dark_background() -> None:
    x = synthetic(200, seed=0).x
    assert float(np.mean(x[:, :, :2, :])) < float(np.mean(x[:, :, 10:18, 10:18]))  # border darker than centre
    assert 0.05 < float(x.mean()) < 0.4


def test_deterministic_per_seed_and_split() -> None:
    first = synthetic(100, seed=5)
    again = synthetic(100, seed=5)
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.y, again.y)
    other_seed = synthetic(100, seed=6)
    assert not np.array_equal(first.x, other_seed.x)


def test_train_and_test_are_different_examples() -> None:
    train = synthetic(500, seed=2, split="train")
    test = synthetic(500, seed=2, split="test")
    train_rows = {bytes(row) for row in flat(train)}
    assert not any(bytes(row) in train_rows for row in flat(test))


def test_train_and_test_share_the_distribution() -> None:
    train = synthetic(2000, seed=4)
    test = synthetic(1000, seed=4, split="test")
    other = synthetic(1000, seed=5, split="test")
    assert nearest_class_mean_accuracy(train, test) > 0.9
    # Another seed draws other glyphs: the classes of seed 4 mean nothing there.
    assert nearest_class_mean_accuracy(train, other) < 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_classes", [2, 10, 20])
def test_nearest_class_mean_is_accurate(seed: int, num_classes: int) -> None:
    train = synthetic(100 * num_classes, seed=seed, num_classes=num_classes)
    test = synthetic(50 * num_classes, seed=seed, num_classes=num_classes, split="test")
    assert nearest_class_mean_accuracy(train, test) > 0.9


def test_two_layer_mlp_learns_it() -> None:
    """784-64-10 ReLU MLP, plain SGD, three epochs on 3 000 examples: high test accuracy."""
    train = synthetic(3000, seed=9)
    test = synthetic(1000, seed=9, split="test")
    rng = np.random.default_rng(0)
    w1 = rng.normal(0.0, 0.05, (784, 64)).astype(np.float32)
    b1 = np.zeros(64, np.float32)
    w2 = rng.normal(0.0, 0.05, (64, 10)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    x, y = flat(train), train.y
    for _ in range(3):
        order = rng.permutation(len(train))
        for start in range(0, len(train), 32):
            batch = order[start : start + 32]
            hidden = np.maximum(x[batch] @ w1 + b1, 0.0)
            logits = hidden @ w2 + b2
            logits -= logits.max(axis=1, keepdims=True)
            grad = np.exp(logits)
            grad /= grad.sum(axis=1, keepdims=True)
            grad[np.arange(batch.shape[0]), y[batch]] -= 1.0
            grad /= batch.shape[0]
            grad_hidden = (grad @ w2.T) * (hidden > 0)
            w2 -= 0.1 * hidden.T @ grad
            b2 -= 0.1 * grad.sum(axis=0)
            w1 -= 0.1 * x[batch].T @ grad_hidden
            b1 -= 0.1 * grad_hidden.sum(axis=0)
    predictions = (np.maximum(flat(test) @ w1 + b1, 0.0) @ w2 + b2).argmax(axis=1)
    assert float(np.mean(predictions == test.y)) > 0.95


def test_zero_examples() -> None:
    assert synthetic(0, seed=0).x.shape == (0, 1, 28, 28)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"num_examples": -1}, "bad_num_examples"),
        ({"num_examples": 2.5}, "bad_num_examples"),
        ({"seed": -1}, "bad_seed"),
        ({"num_classes": 0}, "bad_num_classes"),
        ({"split": "validation"}, "bad_split"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], reason: str) -> None:
    arguments: dict[str, object] = {"num_examples": 10, "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(DataError) as caught:
        synthetic(**arguments)  # type: ignore[arg-type]
    assert caught.value.reason == reason
