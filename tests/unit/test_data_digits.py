"""The 8x8 digits shipped in the package: real data for a machine without MNIST (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest

from unus_edge.data import load_dataset
from unus_edge.errors import DataError


def test_the_shipped_digits_are_mnist_shaped_with_a_fixed_split() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1497, 300)
    for data in (train, test):
        assert data.x.shape[1:] == (1, 28, 28) and data.x.dtype == np.float32
        assert data.x.min() >= 0.0 and data.x.max() == 1.0
        assert not data.x[:, :, :2].any() and not data.x[:, :, 26:].any()  # centred, as MNIST's digits are
    counts = np.bincount(np.concatenate([train.y, test.y]), minlength=10)
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # all 1,797, each once
    assert np.bincount(test.y, minlength=10).min() > 10  # every class is in the test split
    again = load_dataset("digits", "test")
    np.testing.assert_array_equal(again.x, test.x)  # the same split on every machine
    assert len(load_dataset("digits", "train", num_examples=100)) == 100
    with pytest.raises(DataError, match="num_examples=2000 but the split has 1497"):
        load_dataset("digits", "train", num_examples=2000)
