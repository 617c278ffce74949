"""The 8x8 handwritten digits that ship inside the package: real data with no download.

1,797 UCI digits (``unus_edge/data/digits/README.md``: source and CC BY 4.0 license), read from
IDX files with :func:`~unus_edge.data.read_idx` and made MNIST-shaped so that every zoo model
takes them: each pixel becomes a 3x3 block (24x24) centred in 28x28, as MNIST centres its 20x20
digits, with values scaled from 0-16 to [0, 1]. The split is fixed: a seeded permutation puts
1,497 examples in ``train`` and 300 in ``test``, the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unus_edge.data._dataset import Dataset, data_error
from unus_edge.data._idx import read_idx

__all__ = ["DIGITS_DIR", "load_digits"]

DIGITS_DIR = Path(__file__).with_name("digits")
_TEST_EXAMPLES = 300


def load_digits(split: str) -> Dataset:
    """The shipped digits' ``train`` (1,497) or ``test`` (300) split, as 28x28 images in [0, 1]."""
    images = read_idx(DIGITS_DIR / "digits-images-idx3-ubyte.gz")
    labels = read_idx(DIGITS_DIR / "digits-labels-idx1-ubyte.gz")
    if images.shape[1:] != (8, 8) or len(images) != len(labels) or images.max() > 16:
        raise data_error("bad_dataset", "the shipped digits are damaged (reinstall unus-edge)", path=DIGITS_DIR)
    order = np.random.default_rng(0x0D161).permutation(len(labels))
    chosen = order[_TEST_EXAMPLES:] if split == "train" else order[:_TEST_EXAMPLES]
    blocks = np.kron(images[chosen].astype(np.float32) / 16.0, np.ones((3, 3), np.float32))  # 24x24
    x = np.zeros((len(chosen), 1, 28, 28), np.float32)
    x[:, 0, 2:26, 2:26] = blocks
    return Dataset(x, labels[chosen].astype(np.int64), 10)
