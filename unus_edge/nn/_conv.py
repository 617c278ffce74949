"""2-D convolution and pooling: im2col + one matmul, vectorised col2im and argmax masks.

Design decisions (measured on x86-64 and relevant to a Raspberry Pi's small caches):

* **Channels-last inside, NCHW outside.** ONNX tensors are logically NCHW. Conv gathers its
  im2col matrix from a channels-last (NHWC) padded copy of the input, so each copied run is a
  contiguous vector of C channels (4-10x faster than gathering from NCHW for C=32), then runs
  ONE matmul ``cols (N*Ho*Wo, kh*kw*C) @ W2 (kh*kw*C, M)``. The result ``(N*Ho*Wo, M)`` *is*
  an NHWC tensor, returned as a transposed NCHW **view** without a copy. Elementwise ops keep
  that memory layout (NumPy's ``order="K"``), so the next Conv's channels-last copy and the
  backward's ``dy`` reshape are almost free. Semantics never depend on the memory layout.
* **col2im** (the input gradient): one batched matmul computes the column gradient as one
  contiguous ``(N*Ho*Wo, C)`` block per kernel offset; the blocks are added back into a zero
  channels-last buffer, one vectorised strided add per offset; no loops over pixels or samples.
* **MaxPool** keeps, per output, the index of the window offset that won (first maximum on
  ties, like PyTorch) in a uint8 array; backward scatters ``dy`` with one mask per offset.
* Only 2-D (NCHW) inputs, ``group == 1`` and unit dilations are supported; everything else is
  rejected when the graph is built. ``ceil_mode`` must be 0.
* In inference a Conv whose im2col matrix would exceed ``COLS_BUDGET_BYTES`` runs in chunks of
  samples, so evaluating 1,000 images does not allocate gigabytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from unus_edge.errors import ModelError
from unus_edge.nn._base import Array, Build, Grads, Op, Run, register
from unus_edge.nn._mlas import matmul

COLS_BUDGET_BYTES = 64 << 20

Pads = tuple[int, int, int, int]  # top, left, bottom, right (ONNX: x1_begin, x2_begin, x1_end, x2_end)


class _Window(Op):
    """Attribute parsing shared by Conv and the pools: kernel, strides, pads, auto_pad."""

    def parse_window(self, kernel: tuple[int, ...] | None) -> None:
        if kernel is not None and len(kernel) != 2:
            raise self.unsupported(f"only 2-D windows are supported, kernel_shape={kernel}")
        self.kernel = kernel
        strides = self.attr_ints("strides", (1, 1))
        assert strides is not None
        if len(strides) != 2 or min(strides) < 1:
            raise self.unsupported(f"strides={strides}")
        self.strides = strides
        dilations = self.attr_ints("dilations", (1, 1))
        if dilations is not None and any(d != 1 for d in dilations):
            raise self.unsupported(f"dilations={dilations}; only 1 is supported")
        if self.attr_int("ceil_mode", 0) != 0:
            raise self.unsupported("ceil_mode=1; only 0 is supported")
        self.auto_pad = self.attr_str("auto_pad", "NOTSET")
        if self.auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise self.unsupported(f"auto_pad={self.auto_pad!r}")
        pads = self.attr_ints("pads", (0, 0, 0, 0))
        assert pads is not None
        if len(pads) != 4 or min(pads) < 0:
            raise self.unsupported(f"pads={pads}")
        self.pads: Pads = (pads[0], pads[1], pads[2], pads[3])

    def geometry(self, x: Array, kernel: tuple[int, ...]) -> tuple[Pads, int, int]:
        """Pads and output height/width for input ``x`` (NCHW)."""
        if x.ndim != 4:
            raise ModelError(
                f"bad_shape: {self.node.op_type} {self.node.name!r} needs NCHW input, got {x.shape}",
                model=self.model,
            )
        (kh, kw), (sh, sw) = kernel, self.strides
        h, w = x.shape[2], x.shape[3]
        pads = self.pads
        if self.auto_pad == "VALID":
            pads = (0, 0, 0, 0)
        elif self.auto_pad != "NOTSET":
            total_h = max((-(-h // sh) - 1) * sh + kh - h, 0)
            total_w = max((-(-w // sw) - 1) * sw + kw - w, 0)
            lower = self.auto_pad == "SAME_LOWER"
            top = total_h - total_h // 2 if lower else total_h // 2
            left = total_w - total_w // 2 if lower else total_w // 2
            pads = (top, left, total_h - top, total_w - left)
        height = (h + pads[0] + pads[2] - kh) // sh + 1
        width = (w + pads[1] + pads[3] - kw) // sw + 1
        if height < 1 or width < 1:
            raise ModelError(
                f"bad_shape: {self.node.op_type} {self.node.name!r}: window {kernel} larger than input {x.shape}",
                model=self.model,
            )
        return pads, height, width


def _padded_nhwc(x: Array, pads: Pads) -> Array:
    """A C-contiguous channels-last copy of NCHW ``x`` with zero padding."""
    n, c, h, w = x.shape
    top, left, bottom, right = pads
    if not any(pads):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    out = np.zeros((n, h + top + bottom, w + left + right, c), dtype=x.dtype)
    out[:, top : top + h, left : left + w, :] = x.transpose(0, 2, 3, 1)
    return out


def _padded_like(x: Array, pads: Pads, value: float) -> Array:
    """``x`` (NCHW) padded with ``value``, in the same memory layout as ``x``."""
    if not any(pads):
        return x
    n, c, h, w = x.shape
    top, left, bottom, right = pads
    out = np.empty_like(x, shape=(n, c, h + top + bottom, w + left + right))
    out.fill(value)
    out[:, :, top : top + h, left : left + w] = x
    return out


def _zeros_padded(x: Array, pads: Pads, dtype: np.dtype[Any]) -> Array:
    n, c, h, w = x.shape
    shape = (n, c, h + pads[0] + pads[2], w + pads[1] + pads[3])
    return np.zeros_like(x, dtype=dtype, shape=shape)


def _crop(xp: Array, pads: Pads, shape: tuple[int, ...]) -> Array:
    top, left = pads[0], pads[1]
    return xp[:, :, top : top + shape[2], left : left + shape[3]]


def _offsets(kernel: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]


def _window_view(xp: Array, i: int, j: int, strides: tuple[int, ...], height: int, width: int) -> Array:
    sh, sw = strides
    return xp[:, :, i : i + sh * (height - 1) + 1 : sh, j : j + sw * (width - 1) + 1 : sw]


@register("Conv")
class Conv(_Window):
    min_inputs, max_inputs = 2, 3
    private_output = fresh_grads = True  # the cache holds the columns and the weights, not the output

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        if self.attr_int("group", 1) != 1:
            raise self.unsupported(f"group={self.attr_int('group', 1)}; only group=1 is supported")
        self.parse_window(self.attr_ints("kernel_shape", None))
        weight = build.initializers.get(self.node.inputs[1])
        if weight is not None and weight.ndim != 4:
            raise self.unsupported(f"only 2-D convolution is supported, weight shape {weight.shape}")

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x, weight = inputs[0], inputs[1]
        assert x is not None and weight is not None
        bias = inputs[2] if len(inputs) > 2 else None
        if weight.ndim != 4 or x.ndim != 4 or weight.shape[1] != x.shape[1]:
            raise ModelError(
                f"bad_shape: Conv {self.node.name!r}: input {x.shape} and weight {weight.shape} do not match",
                model=self.model,
            )
        kernel = (weight.shape[2], weight.shape[3])
        pads, height, width = self.geometry(x, kernel)
        m = weight.shape[0]
        w2 = weight.transpose(0, 2, 3, 1).reshape(m, -1)  # (M, kh*kw*C): channels-last columns
        n = x.shape[0]
        rows_per_sample = height * width * w2.shape[1] * x.itemsize
        step = n if run.record else max(1, COLS_BUDGET_BYTES // max(rows_per_sample, 1))
        if step >= n:  # one product (always when training): no copy of its result
            cols = self.im2col(_padded_nhwc(x, pads), kernel, height, width)
            y = matmul(cols, w2.T)
        else:
            y = np.empty((n * height * width, m), dtype=np.result_type(x, weight))
            for start in range(0, n, step):
                cols = self.im2col(_padded_nhwc(x[start : start + step], pads), kernel, height, width)
                y[start * height * width : (start + step) * height * width] = matmul(cols, w2.T)
        if bias is not None:
            y += bias
        out = y.reshape(n, height, width, m).transpose(0, 3, 1, 2)
        cache = (cols, w2, weight.shape, x.shape, pads, bias is not None) if run.record else None
        return (out,), cache

    def im2col(self, xp: Array, kernel: tuple[int, int], height: int, width: int) -> Array:
        """``(n*Ho*Wo, kh*kw*C)`` patches of the channels-last padded input ``xp``."""
        windows = sliding_window_view(xp, kernel, axis=(1, 2))  # (n, Hp-kh+1, Wp-kw+1, C, kh, kw)
        sh, sw = self.strides
        windows = windows[:, : sh * (height - 1) + 1 : sh, : sw * (width - 1) + 1 : sw]
        n, c = xp.shape[0], xp.shape[3]
        return windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * height * width, kernel[0] * kernel[1] * c)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        cols, w2, w_shape, x_shape, pads, has_bias = cache
        n, m, height, width = dy.shape
        dy2 = dy.transpose(0, 2, 3, 1).reshape(n * height * width, m)
        dx = dw = db = None
        m_, c, kh, kw = w_shape
        if needs[1]:
            dw = np.ascontiguousarray(matmul(dy2.T, cols).reshape(m_, kh, kw, c).transpose(0, 3, 1, 2))
        if has_bias and needs[2]:
            db = dy2.sum(axis=0)
        if needs[0]:
            # The column gradient dy2 @ w2, computed as one block (n*Ho*Wo, C) per kernel offset
            # (a single batched matmul), so that col2im adds contiguous blocks: 15-25% faster than
            # slicing the offsets out of one (n*Ho*Wo, kh*kw*C) matrix, and bit-identical.
            w_blocks = np.ascontiguousarray(w2.reshape(m, kh * kw, c).transpose(1, 0, 2))  # (kh*kw, M, C)
            blocks = matmul(dy2, w_blocks)  # (kh*kw, n*Ho*Wo, C)
            top, left, bottom, right = pads
            dxp = np.zeros((n, x_shape[2] + top + bottom, x_shape[3] + left + right, c), dtype=dy.dtype)
            sh, sw = self.strides
            for offset, (i, j) in enumerate(_offsets((kh, kw))):
                window = dxp[:, i : i + sh * (height - 1) + 1 : sh, j : j + sw * (width - 1) + 1 : sw, :]
                window += blocks[offset].reshape(n, height, width, c)
            dx = dxp[:, top : top + x_shape[2], left : left + x_shape[3], :].transpose(0, 3, 1, 2)
        return dx, dw, db


class _Pool(_Window):
    private_output = fresh_grads = True  # the caches hold the input, not the output

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        kernel = self.attr_ints("kernel_shape", None)
        if kernel is None:
            raise self.unsupported("kernel_shape is required")
        self.parse_window(kernel)
        self.window = (kernel[0], kernel[1])


@register("MaxPool")
class MaxPool(_Pool):
    def __init__(self, build: Build) -> None:
        super().__init__(build)
        if self.attr_int("storage_order", 0) != 0:
            raise self.unsupported("storage_order=1")

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        pads, height, width = self.geometry(x, self.window)
        xp = _padded_like(x, pads, -np.inf)
        offsets = _offsets(self.window)
        y = _window_view(xp, *offsets[0], self.strides, height, width).copy(order="K")
        argmax = np.zeros_like(y, dtype=np.uint8) if run.record else None  # same memory layout as y
        scratch = np.empty_like(argmax) if argmax is not None else None
        for k, (i, j) in enumerate(offsets[1:], start=1):
            window = _window_view(xp, i, j, self.strides, height, width)
            if argmax is not None and scratch is not None:
                # offsets come in increasing order, so the winner is the largest k whose value was
                # strictly greater than the running maximum: max(argmax, k * (window > y)). Strict
                # comparison keeps the first maximum on ties, as PyTorch does. (5x faster than a
                # masked copyto.)
                np.multiply(np.greater(window, y).view(np.uint8), k, out=scratch)
                np.maximum(argmax, scratch, out=argmax)
            np.maximum(y, window, out=y)
        return (y,), (argmax, x, pads)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        argmax, x, pads = cache
        dxp = _zeros_padded(x, pads, dy.dtype)
        disjoint = self.strides[0] >= self.window[0] and self.strides[1] >= self.window[1]
        for k, (i, j) in enumerate(_offsets(self.window)):
            window = _window_view(dxp, i, j, self.strides, dy.shape[2], dy.shape[3])
            if disjoint:  # each input cell is in one window at most: write instead of add
                np.multiply(dy, argmax == k, out=window)
            else:
                window += dy * (argmax == k)
        return (_crop(dxp, pads, x.shape),)


@register("AveragePool")
class AveragePool(_Pool):
    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.count_include_pad = bool(self.attr_int("count_include_pad", 0))

    def divisor(self, x: Array, pads: Pads, height: int, width: int) -> Array | float:
        """Per-output window sizes: ``kh*kw``, or the count of non-padding cells."""
        if self.count_include_pad or not any(pads):
            return float(self.window[0] * self.window[1])
        ones = _padded_like(np.ones((1, 1, x.shape[2], x.shape[3]), dtype=x.dtype), pads, 0.0)
        counts = sum(_window_view(ones, i, j, self.strides, height, width) for i, j in _offsets(self.window))
        return np.asarray(counts)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        pads, height, width = self.geometry(x, self.window)
        xp = _padded_like(x, pads, 0.0)
        offsets = _offsets(self.window)
        y = _window_view(xp, *offsets[0], self.strides, height, width).copy(order="K")
        for i, j in offsets[1:]:
            y += _window_view(xp, i, j, self.strides, height, width)
        divisor = self.divisor(x, pads, height, width)
        y /= divisor
        return (y,), (divisor, x, pads)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        divisor, x, pads = cache
        share = dy / divisor
        dxp = _zeros_padded(x, pads, dy.dtype)
        for i, j in _offsets(self.window):
            window = _window_view(dxp, i, j, self.strides, dy.shape[2], dy.shape[3])
            window += share
        return (_crop(dxp, pads, x.shape),)


@register("GlobalAveragePool")
class GlobalAveragePool(Op):
    private_output = fresh_grads = True
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        if x.ndim < 3:
            raise ModelError(f"bad_shape: GlobalAveragePool needs (N, C, ...), got {x.shape}", model=self.model)
        axes = tuple(range(2, x.ndim))
        return (x.mean(axis=axes, keepdims=True),), x.shape

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        shape = cache
        dx = np.empty(shape, dtype=dy.dtype)
        dx[...] = dy / math.prod(shape[2:])
        return (dx,)
