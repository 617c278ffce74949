"""The in-memory :class:`Dataset`, label histograms, the 8-bit pixel codec and error helper.

Decisions
---------
* A :class:`Dataset` is a frozen dataclass over two NumPy arrays. Its arrays are exposed as
  *read-only views*: nothing in the framework should change a dataset in place (partitions,
  devices and evaluation may share the same arrays), and a read-only view enforces that
  without copying and without touching the flags of the array the caller passed in.
* ``__post_init__`` checks the contract once (dtypes, shapes, label range) so that every
  consumer can trust it. It does not scan pixel values: that costs a pass over ~188 MB for
  MNIST and every constructor in this package already guarantees ``[0, 1]``. Untrusted input
  (partition files) is value-checked where it enters, in :func:`unus_edge.data.load_partition`.
* Pixels are 8-bit on disk and float32 in memory. :func:`decode_pixels` is the one conversion
  (``float32(k) / float32(255)``, done once, straight into the final array) and
  :func:`encode_pixels` is its exact inverse: it returns ``uint8`` only when every value is
  *bit-for-bit* ``decode(k)`` for some ``k``, so storing 8-bit data is lossless by construction
  and needs no "came from images" flag carried around.
* :class:`~unus_edge.errors.DataError` takes a stable snake_case ``reason`` code and a path.
  :func:`data_error` keeps ``reason`` a code (for metrics and tests) and appends the human
  detail to the message, so the user reads *what* is wrong and how to fix it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from unus_edge.errors import DataError

__all__ = [
    "REGRESSION",
    "Dataset",
    "PathLike",
    "as_path",
    "data_error",
    "decode_pixels",
    "encode_pixels",
    "label_histogram",
]

PathLike: TypeAlias = str | os.PathLike[str]

REGRESSION = 0
"""``Dataset.num_classes`` of a regression task: float targets, no classes."""

_PIXEL_SCALE = np.float32(255.0)
# Rows per chunk in encode_pixels: bounds the float32 temporaries to a few MB at a time.
_ENCODE_CHUNK_VALUES = 1 << 20


def data_error(reason: str, detail: str = "", *, path: PathLike | None = None) -> DataError:
    """Return a :class:`DataError` with the code ``reason`` and ``detail`` in its message.

    ``error.reason`` stays the short, stable code; ``str(error)`` reads
    ``"<path>: <reason>: <detail>"``.
    """
    return DataError(reason, detail, path=os.fspath(path) if path is not None else "")


def _is_integer(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def label_histogram(labels: NDArray[Any], num_classes: int) -> NDArray[np.int64]:
    """Count the examples of each class: an int64 array of length ``num_classes``.

    Raises :class:`DataError` (``bad_labels``) when ``labels`` is not a 1-D integer array or
    holds a value outside ``[0, num_classes)``.
    """
    if not _is_integer(num_classes) or num_classes < 1:
        raise data_error("bad_num_classes", f"num_classes must be an integer >= 1, got {num_classes!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise data_error(
            "bad_labels", f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise data_error(
            "bad_labels",
            f"labels span [{int(labels.min())}, {int(labels.max())}], outside [0, {num_classes})",
        )
    return np.bincount(labels, minlength=int(num_classes)).astype(np.int64, copy=False)


def decode_pixels(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    """8-bit pixels to float32 in ``[0, 1]``: ``float32(k) / float32(255)``, one allocation."""
    out = np.empty(pixels.shape, dtype=np.float32)
    np.divide(pixels, _PIXEL_SCALE, out=out, dtype=np.float32)
    return out


def encode_pixels(x: NDArray[np.float32]) -> NDArray[np.uint8] | None:
    """The exact inverse of :func:`decode_pixels`, or ``None`` when ``x`` is not 8-bit data.

    Returns ``uint8`` only if ``decode_pixels(result)`` reproduces ``x`` bit for bit; works in
    chunks so that encoding a whole training set needs no full-size float temporaries.
    """
    out = np.empty(x.shape, dtype=np.uint8)
    if x.size == 0:
        return out
    row_values = max(1, x.size // max(1, x.shape[0]))
    rows_per_chunk = max(1, _ENCODE_CHUNK_VALUES // row_values)
    for start in range(0, x.shape[0], rows_per_chunk):
        chunk = x[start : start + rows_per_chunk]
        scaled = np.multiply(chunk, _PIXEL_SCALE, dtype=np.float32)
        np.rint(scaled, out=scaled)
        # NaN fails both comparisons, so non-finite data is rejected here too.
        if not (scaled.min() >= 0.0 and scaled.max() <= 255.0):
            return None
        quantized = scaled.astype(np.uint8)
        if not np.array_equal(decode_pixels(quantized), chunk):
            return None
        out[start : start + rows_per_chunk] = quantized
    return out


def _read_only(array: NDArray[Any]) -> NDArray[Any]:
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Examples ``x`` and their labels or targets ``y``: a classification or a regression task.

    * ``x``: float32, shape ``(num_examples, *feature_shape)``; images are
      ``(num_examples, 1, 28, 28)`` with values in ``[0, 1]``.
    * Classification (``num_classes >= 1``): ``y`` is int64, shape ``(num_examples,)``, every value
      in ``[0, num_classes)``; ``num_classes`` counts the classes of the *task* (not only those
      present here: a non-IID partition may hold a few classes of ten).
    * Regression (``num_classes == 0``, :data:`REGRESSION`): ``y`` is float32, shape
      ``(num_examples, *target_shape)``, every value finite; the model is trained and evaluated
      with the mean squared error.

    The arrays are read-only views (no copy is made). Construction raises
    :class:`DataError` (``bad_dtype``, ``bad_shape``, ``length_mismatch``, ``bad_labels``,
    ``bad_targets``, ``bad_num_classes``) when the contract is broken.
    """

    x: NDArray[np.float32]
    y: NDArray[Any]
    num_classes: int

    def __post_init__(self) -> None:
        x, y, num_classes = self.x, self.y, self.num_classes
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise data_error("bad_type", "x and y must be NumPy arrays")
        if not _is_integer(num_classes) or num_classes < 0:
            raise data_error("bad_num_classes", f"num_classes must be an integer >= 1 (0: regression), "
                                                f"got {num_classes!r}")
        if x.dtype != np.float32:
            raise data_error("bad_dtype", f"x must be float32, got {x.dtype}")
        if x.ndim < 2:
            raise data_error("bad_shape", f"x must be (num_examples, *feature_shape), got shape {x.shape}")
        if num_classes == REGRESSION:
            if np.issubdtype(y.dtype, np.integer):
                raise data_error("bad_num_classes", "num_classes 0 means a regression with float32 targets; "
                                                    "integer labels need num_classes >= 1")
            if y.dtype != np.float32:
                raise data_error("bad_dtype", f"regression targets y must be float32, got {y.dtype}")
            if y.ndim < 1:
                raise data_error("bad_shape", f"y must be (num_examples, *target_shape), got shape {y.shape}")
        else:
            if y.dtype != np.int64:
                raise data_error("bad_dtype", f"y must be int64, got {y.dtype}")
            if y.ndim != 1:
                raise data_error("bad_shape", f"y must be (num_examples,), got shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise data_error("length_mismatch", f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
        if num_classes == REGRESSION:
            if y.size and not bool(np.isfinite(y).all()):
                raise data_error("bad_targets", "regression targets must be finite numbers")
        elif y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise data_error("bad_labels", f"labels span [{int(y.min())}, {int(y.max())}], outside [0, {num_classes})")
        object.__setattr__(self, "x", _read_only(x))
        object.__setattr__(self, "y", _read_only(y))
        object.__setattr__(self, "num_classes", int(num_classes))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Dataset(num_examples={len(self)}, feature_shape={self.feature_shape}, num_classes={self.num_classes})"

    @property
    def is_regression(self) -> bool:
        """Targets to fit (mean squared error) rather than classes to predict."""
        return self.num_classes == REGRESSION

    @property
    def target_shape(self) -> tuple[int, ...]:
        """The shape of one example's target: ``()`` for a class label."""
        return tuple(int(size) for size in self.y.shape[1:])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one example, ``(1, 28, 28)`` for MNIST."""
        return tuple(int(size) for size in self.x.shape[1:])

    def subset(self, indices: NDArray[np.integer[Any]] | slice) -> Dataset:
        """The examples at ``indices`` (an index array copies them; a slice is a view)."""
        return Dataset(x=self.x[indices], y=self.y[indices], num_classes=self.num_classes)

    def label_histogram(self) -> NDArray[np.int64]:
        """Examples per class, an int64 array of length ``num_classes`` (empty for regression)."""
        if self.is_regression:
            return np.zeros(0, np.int64)
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64, copy=False)


def as_path(value: PathLike) -> Path:
    """``Path(value)``; a tiny helper so every module accepts ``str`` and ``os.PathLike``."""
    return Path(os.fspath(value))
