"""Dense, elementwise and activation ops: one small forward/backward pair each.

Gradients of broadcasting ops are summed back to their operand's shape (``unbroadcast``).
Scalars from attributes are Python floats, so NumPy keeps float32 arrays float32 (NEP 50);
nothing in these ops upcasts to float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unus_edge.nn._base import Array, Build, Grads, Op, Run, normalize_axis, register, unbroadcast
from unus_edge.nn._mlas import matmul


@register("Gemm")
class Gemm(Op):
    """``Y = alpha * A' @ B' + beta * C`` with ``A'``/``B'`` optionally transposed."""

    min_inputs, max_inputs = 2, 3
    private_output = fresh_grads = True

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.alpha = self.attr_float("alpha", 1.0)
        self.beta = self.attr_float("beta", 1.0)
        self.trans_a = bool(self.attr_int("transA", 0))
        self.trans_b = bool(self.attr_int("transB", 0))

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        a, b = inputs[0], inputs[1]
        assert a is not None and b is not None
        c = inputs[2] if len(inputs) > 2 else None
        y = matmul(a.T if self.trans_a else a, b.T if self.trans_b else b)
        if self.alpha != 1.0:
            y *= self.alpha
        if c is not None:
            y += c if self.beta == 1.0 else self.beta * c
        return (y,), (a, b, None if c is None else c.shape)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        a, b, c_shape = cache
        g = dy * self.alpha if self.alpha != 1.0 else dy
        da = db = dc = None
        if needs[0]:
            bb = b.T if self.trans_b else b
            da = matmul(bb, g.T) if self.trans_a else matmul(g, bb.T)
        if needs[1]:
            aa = a.T if self.trans_a else a
            db = matmul(g.T, aa) if self.trans_b else matmul(aa.T, g)
        if len(needs) > 2 and needs[2]:
            dc = unbroadcast(dy, c_shape)
            if self.beta != 1.0:
                dc = dc * self.beta
            elif dc is dy:  # a C of the output's full shape: never hand back dy itself (fresh_grads)
                dc = dy.copy()
        return da, db, dc


@register("MatMul")
class MatMul(Op):
    """NumPy ``matmul`` semantics: batched, broadcasting, 1-D operands promoted."""

    min_inputs, max_inputs = 2, 2
    private_output = fresh_grads = True

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        a, b = inputs
        assert a is not None and b is not None
        return (matmul(a, b) if a.ndim == 2 and b.ndim == 2 else np.matmul(a, b),), (a, b)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        a, b = cache
        if a.ndim == 2 and b.ndim == 2:
            return (matmul(dy, b.T) if needs[0] else None), (matmul(a.T, dy) if needs[1] else None)
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if a.ndim == 1:
            dy = np.expand_dims(dy, -2)
        if b.ndim == 1:
            dy = np.expand_dims(dy, -1)
        da = db = None
        if needs[0]:
            da = unbroadcast(np.matmul(dy, np.swapaxes(b2, -1, -2)), a2.shape).reshape(a.shape)
        if needs[1]:
            db = unbroadcast(np.matmul(np.swapaxes(a2, -1, -2), dy), b2.shape).reshape(b.shape)
        return da, db


class _Binary(Op):
    min_inputs, max_inputs = 2, 2
    private_output = True  # a new array; the caches hold the inputs or their shapes


@register("Add")
class Add(_Binary):
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        a, b = inputs
        assert a is not None and b is not None
        return (a + b,), (a.shape, b.shape)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        a_shape, b_shape = cache
        return (
            unbroadcast(dy, a_shape) if needs[0] else None,
            unbroadcast(dy, b_shape) if needs[1] else None,
        )


@register("Sub")
class Sub(_Binary):
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        a, b = inputs
        assert a is not None and b is not None
        return (a - b,), (a.shape, b.shape)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        a_shape, b_shape = cache
        return (
            unbroadcast(dy, a_shape) if needs[0] else None,
            unbroadcast(-dy, b_shape) if needs[1] else None,
        )


@register("Mul")
class Mul(_Binary):
    fresh_grads = True
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        a, b = inputs
        assert a is not None and b is not None
        return (a * b,), (a, b)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        a, b = cache
        return (
            unbroadcast(dy * b, a.shape) if needs[0] else None,
            unbroadcast(dy * a, b.shape) if needs[1] else None,
        )


@register("Relu")
class Relu(Op):
    inplace_capable = fresh_grads = True

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        y = np.maximum(x, 0, out=x) if self.inplace else np.maximum(x, 0)
        return (y,), y

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (dy * (cache > 0),)

    def backward_owned(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        np.multiply(dy, cache > 0, out=dy)  # the gradient at exactly 0 is 0, as above and in PyTorch
        return (dy,)


@register("LeakyRelu")
class LeakyRelu(Op):
    private_output = fresh_grads = True  # np.where makes new arrays; the cache is the mask
    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.alpha = self.attr_float("alpha", 0.01)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        positive = x > 0
        return (np.where(positive, x, x * self.alpha),), positive

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (np.where(cache, dy, dy * self.alpha),)


@register("Sigmoid")
class Sigmoid(Op):
    """``0.5 * (1 + tanh(x / 2))``: the same function, without overflow for large ``|x|``."""

    inplace_capable = fresh_grads = True

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        y = np.tanh(np.multiply(x, 0.5, out=x), out=x) if self.inplace else np.tanh(x * 0.5)
        y += 1
        y *= 0.5
        return (y,), y

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (dy * cache * (1 - cache),)


@register("Tanh")
class Tanh(Op):
    inplace_capable = fresh_grads = True

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        y = np.tanh(x, out=x) if self.inplace else np.tanh(x)
        return (y,), y

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (dy * (1 - cache * cache),)


class _SoftmaxBase(Op):
    """Softmax over ``axis`` (opset >= 13) or over all axes from ``axis`` on (opset < 13)."""

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.axis = self.attr_int("axis", -1 if self.opset >= 13 else 1)

    def axes(self, ndim: int) -> tuple[int, ...]:
        axis = normalize_axis(self, self.axis, ndim)
        return (axis,) if self.opset >= 13 else tuple(range(axis, ndim))

    def shifted(self, x: Array) -> tuple[Array, Array, tuple[int, ...]]:
        axes = self.axes(x.ndim)
        z = x - x.max(axis=axes, keepdims=True)
        e = np.exp(z)
        return z, e, axes


@register("Softmax")
class Softmax(_SoftmaxBase):
    fresh_grads = True
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        _, e, axes = self.shifted(x)
        e /= e.sum(axis=axes, keepdims=True)
        return (e,), (e, axes)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        y, axes = cache
        return (y * (dy - (dy * y).sum(axis=axes, keepdims=True)),)


@register("LogSoftmax")
class LogSoftmax(_SoftmaxBase):
    private_output = fresh_grads = True  # the cache holds the softmax, not the output
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        z, e, axes = self.shifted(x)
        total = e.sum(axis=axes, keepdims=True)
        z -= np.log(total)
        e /= total
        return (z,), (e, axes)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        softmax, axes = cache
        return (dy - softmax * dy.sum(axis=axes, keepdims=True),)


@register("Identity")
class Identity(Op):
    view_grads = True
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        return (x,), None

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (dy,)


@register("Dropout")
class Dropout(Op):
    """Inverted dropout. Our ``training`` flag decides the mode, not the graph's training_mode input.

    The mask comes from the run's seeded generator, so a training run is reproducible.
    """

    max_inputs, max_outputs = 3, 2

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        if self.opset < 12:
            self.ratio = self.attr_float("ratio", 0.5)
        else:
            ratio = self.constant_input(build, 1, parameter_ok=True)
            self.ratio = 0.5 if ratio is None else float(ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.unsupported(f"ratio {self.ratio} is outside [0, 1)")
        self.differentiable = (True, False, False)[: len(self.node.inputs)]

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        if not run.training or self.ratio == 0.0:
            return (x, np.ones(x.shape, dtype=bool)), None
        rng = run.rng if run.rng is not None else np.random.default_rng(0)
        keep = rng.random(x.shape, dtype=np.float32) >= self.ratio
        scale = keep.astype(x.dtype)
        scale *= 1.0 / (1.0 - self.ratio)
        return (x * scale, keep), scale

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (dy if cache is None else dy * cache, None, None)
