"""Shape ops (Flatten, Reshape, Transpose, Concat) and Constant.

Their backward passes only move gradients around (reshape back, inverse permutation, split).
Reshape's target shape must be a constant (an int64 initializer or a Constant node), which is
what exporters emit for static models; a shape computed at run time is rejected at build time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from unus_edge.errors import ModelError
from unus_edge.nn._base import Array, Build, Grads, Op, Run, normalize_axis, register
from unus_edge.onnx_io import RawAttribute


@register("Flatten")
class Flatten(Op):
    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.axis = self.attr_int("axis", 1)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        axis = self.axis + x.ndim if self.axis < 0 else self.axis
        if not 0 <= axis <= x.ndim:
            raise ModelError(f"bad_axis: Flatten axis {self.axis} for rank {x.ndim}", model=self.model)
        shape = (math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
        return (x.reshape(shape),), x.shape

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (dy.reshape(cache),)


@register("Reshape")
class Reshape(Op):
    """ONNX Reshape: ``0`` copies the input dim (unless ``allowzero``), ``-1`` is inferred."""

    min_inputs, max_inputs = 2, 2

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        shape = self.constant_input(build, 1)
        assert shape is not None
        if shape.dtype.kind not in "iu" or shape.ndim != 1:
            raise self.unsupported(f"shape must be a 1-D int64 tensor, got {shape.dtype} {shape.shape}")
        self.shape = tuple(int(d) for d in shape)
        self.allowzero = bool(self.attr_int("allowzero", 0))
        if sum(d == -1 for d in self.shape) > 1 or any(d < -1 for d in self.shape):
            raise self.unsupported(f"invalid target shape {self.shape}")
        self.differentiable = (True, False)

    def target(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.allowzero:
            return self.shape
        try:
            return tuple(shape[i] if d == 0 else d for i, d in enumerate(self.shape))
        except IndexError as error:
            raise ModelError(
                f"bad_shape: Reshape {self.node.name!r} copies a dim the input {shape} does not have",
                model=self.model,
            ) from error

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        try:
            y = x.reshape(self.target(x.shape))
        except ValueError as error:
            raise ModelError(
                f"bad_shape: Reshape {self.node.name!r} cannot reshape {x.shape} to {self.shape}",
                model=self.model,
            ) from error
        return (y,), x.shape

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return dy.reshape(cache), None


@register("Transpose")
class Transpose(Op):
    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.perm = self.attr_ints("perm", None)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        perm = self.perm if self.perm is not None else tuple(reversed(range(x.ndim)))
        if sorted(perm) != list(range(x.ndim)):
            raise ModelError(f"bad_perm: {perm} for rank {x.ndim} at node {self.node.name!r}", model=self.model)
        return (x.transpose(perm),), np.argsort(perm)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (dy.transpose(cache),)


@register("Concat")
class Concat(Op):
    max_inputs = 1 << 16

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        axis = self.node.attributes.get("axis")
        if axis is None:
            raise self.unsupported("the axis attribute is required")
        self.axis = self.attr_int("axis", 0)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        arrays = [x for x in inputs if x is not None]
        axis = normalize_axis(self, self.axis, arrays[0].ndim)
        y = np.concatenate(arrays, axis=axis)
        return (y,), (axis, np.cumsum([x.shape[axis] for x in arrays])[:-1])

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        axis, splits = cache
        parts = np.split(dy, splits, axis=axis)
        return [part if need else None for part, need in zip(parts, needs, strict=True)]


@register("Constant")
class Constant(Op):
    """Folded into a constant when the graph is built; never part of the run-time plan."""

    min_inputs = max_inputs = 0

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        attributes = self.node.attributes
        if len(attributes) != 1:
            raise self.unsupported(f"needs exactly one value attribute, has {sorted(attributes)}")
        key, value = next(iter(attributes.items()))
        if isinstance(value, RawAttribute):
            raise self.unsupported(f"attribute {key!r} of ONNX attribute type {value.type}")
        if key == "value" and isinstance(value, np.ndarray):
            self.value = value
        elif key in ("value_float", "value_floats"):
            self.value = np.asarray(value, dtype=np.float32)
        elif key in ("value_int", "value_ints"):
            self.value = np.asarray(value, dtype=np.int64)
        else:
            raise self.unsupported(f"attribute {key!r} is not supported")

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        return (self.value,), None

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return ()
