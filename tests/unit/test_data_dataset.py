"""The Dataset contract, label histograms and the lossless 8-bit pixel codec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unus_edge.data import Dataset, label_histogram
from unus_edge.data._dataset import decode_pixels, encode_pixels
from unus_edge.errors import DataError


def make(num_examples: int = 4, num_classes: int = 3) -> Dataset:
    x = np.zeros((num_examples, 1, 28, 28), dtype=np.float32)
    y = np.arange(num_examples, dtype=np.int64) % num_classes
    return Dataset(x=x, y=y, num_classes=num_classes)


def test_valid_dataset() -> None:
    dataset = make(5, 3)
    assert len(dataset) == 5
    assert dataset.feature_shape == (1, 28, 28)
    assert dataset.label_histogram().tolist() == [2, 2, 1]
    assert "num_examples=5" in repr(dataset)


def test_empty_dataset_is_allowed() -> None:
    assert len(make(0, 10)) == 0


def test_arrays_are_read_only_views_and_the_caller_keeps_its_flags() -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    y = np.zeros(2, dtype=np.int64)
    dataset = Dataset(x=x, y=y, num_classes=1)
    assert np.shares_memory(dataset.x, x)
    with pytest.raises(ValueError, match="read-only"):
        dataset.x[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        dataset.y[0] = 1
    x[0, 0] = 2.0  # the caller's own array is untouched and still writable
    assert dataset.x[0, 0] == 2.0


def test_frozen() -> None:
    dataset = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        dataset.num_classes = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("x", "y", "num_classes", "reason"),
    [
        (np.zeros((2, 4), np.float64), np.zeros(2, np.int64), 2, "bad_dtype"),
        (np.zeros((2, 4), np.float32), np.zeros(2, np.int32), 2, "bad_dtype"),
        (np.zeros((2, 4), np.dtype(">f4")), np.zeros(2, np.int64), 2, "bad_dtype"),
        (np.zeros(2, np.float32), np.zeros(2, np.int64), 2, "bad_shape"),
        (np.zeros((2, 4), np.float32), np.zeros((2, 1), np.int64), 2, "bad_shape"),
        (np.zeros((3, 4), np.float32), np.zeros(2, np.int64), 2, "length_mismatch"),
        (np.zeros((2, 4), np.float32), np.array([0, 2], np.int64), 2, "bad_labels"),
        (np.zeros((2, 4), np.float32), np.array([0, -1], np.int64), 2, "bad_labels"),
        (np.zeros((2, 4), np.float32), np.zeros(2, np.int64), 0, "bad_num_classes"),
        (np.zeros((2, 4), np.float32), np.zeros(2, np.int64), True, "bad_num_classes"),
        ([[0.0]], np.zeros(1, np.int64), 2, "bad_type"),
    ],
)
def test_invalid_dataset(x: object, y: object, num_classes: object, reason: str) -> None:
    with pytest.raises(DataError) as caught:
        Dataset(x=x, y=y, num_classes=num_classes)  # type: ignore[arg-type]
    assert caught.value.reason == reason


def test_subset_by_indices_and_slice() -> None:
    dataset = make(6, 3)
    picked = dataset.subset(np.array([5, 0], dtype=np.int64))
    assert picked.y.tolist() == [2, 0]
    assert picked.num_classes == 3
    assert np.shares_memory(dataset.subset(slice(1, 3)).x, dataset.x)


def test_label_histogram() -> None:
    counts = label_histogram(np.array([0, 2, 2, 4], dtype=np.int64), 6)
    assert counts.dtype == np.int64
    assert counts.tolist() == [1, 0, 2, 0, 1, 0]
    assert label_histogram(np.array([], dtype=np.int64), 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("labels", "num_classes", "reason"),
    [
        (np.array([0, 3]), 3, "bad_labels"),
        (np.array([-1]), 3, "bad_labels"),
        (np.array([0.0]), 3, "bad_labels"),
        (np.zeros((2, 2), np.int64), 3, "bad_labels"),
        (np.array([0]), 0, "bad_num_classes"),
    ],
)
def test_label_histogram_errors(labels: np.ndarray, num_classes: int, reason: str) -> None:
    with pytest.raises(DataError) as caught:
        label_histogram(labels, num_classes)
    assert caught.value.reason == reason


def test_error_message_keeps_code_and_detail() -> None:
    with pytest.raises(DataError) as caught:
        label_histogram(np.array([7]), 3)
    assert caught.value.reason == "bad_labels"
    assert "outside [0, 3)" in str(caught.value)


@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)))
def test_pixel_codec_is_exact(pixels: np.ndarray) -> None:
    x = decode_pixels(pixels)
    assert x.dtype == np.float32
    assert float(x.min(initial=0.0)) >= 0.0
    assert float(x.max(initial=1.0)) <= 1.0
    encoded = encode_pixels(x)
    assert encoded is not None
    np.testing.assert_array_equal(encoded, pixels)


def test_every_pixel_level_round_trips() -> None:
    levels = np.arange(256, dtype=np.uint8)
    x = decode_pixels(levels)
    np.testing.assert_array_equal(x, levels.astype(np.float32) / np.float32(255))
    encoded = encode_pixels(x)
    assert encoded is not None
    np.testing.assert_array_equal(encoded, levels)


@pytest.mark.parametrize("value", [0.5, np.nextafter(np.float32(1 / 255), np.float32(1)), -1 / 255, 256 / 255, np.nan])
def test_non_8bit_values_are_not_encoded(value: float) -> None:
    x = decode_pixels(np.arange(256, dtype=np.uint8).reshape(16, 16))
    x[3, 4] = np.float32(value)
    assert encode_pixels(x) is None


@given(st.integers(min_value=1, max_value=3000))
def test_codec_chunks_do_not_change_the_result(num_rows: int) -> None:
    pixels = (np.arange(num_rows * 784, dtype=np.int64) % 251).astype(np.uint8).reshape(num_rows, 784)
    encoded = encode_pixels(decode_pixels(pixels))
    assert encoded is not None
    np.testing.assert_array_equal(encoded, pixels)
