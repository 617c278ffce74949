"""Shape ops (Flatten, Reshape, Transpose, Concat, Shape, Gather, Unsqueeze, Squeeze) and Constant.

Their backward passes only move gradients around (reshape back, inverse permutation, split,
scatter). Integer shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as
PyTorch exports ``x.view(x.size(0), -1)``) runs through the same ops on int64 arrays; ``Shape``
carries no gradient, so none of that chain enters the backward plan.
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
    view_grads = True

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
    """ONNX Reshape: ``0`` copies the input dim (unless ``allowzero``), ``-1`` is inferred.

    The target shape is usually a constant (read once); a shape computed at run time (the
    ``Shape -> Gather -> Unsqueeze -> Concat`` chain PyTorch exports for ``x.view(x.size(0), -1)``)
    is read at every call.
    """

    view_grads = True

    min_inputs, max_inputs = 2, 2

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        name = self.node.inputs[1]
        constant = build.constants.get(name)
        self.shape = None if constant is None else self.checked(constant)
        if constant is None and name in build.initializers:
            raise self.unsupported(f"shape input {name!r} is a float initializer")
        self.allowzero = bool(self.attr_int("allowzero", 0))
        self.differentiable = (True, False)

    def checked(self, shape: Array) -> tuple[int, ...]:
        if shape.dtype.kind not in "iu" or shape.ndim != 1:
            raise self.unsupported(f"shape must be a 1-D int64 tensor, got {shape.dtype} {shape.shape}")
        dims = tuple(int(d) for d in shape)
        if sum(d == -1 for d in dims) > 1 or any(d < -1 for d in dims):
            raise self.unsupported(f"invalid target shape {dims}")
        return dims

    def target(self, dims: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.allowzero:
            return dims
        try:
            return tuple(shape[i] if d == 0 else d for i, d in enumerate(dims))
        except IndexError as error:
            raise ModelError(
                f"bad_shape: Reshape {self.node.name!r} copies a dim the input {shape} does not have",
                model=self.model,
            ) from error

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x, shape = inputs
        assert x is not None and shape is not None
        dims = self.shape if self.shape is not None else self.checked(shape)
        try:
            y = x.reshape(self.target(dims, x.shape))
        except ValueError as error:
            raise ModelError(
                f"bad_shape: Reshape {self.node.name!r} cannot reshape {x.shape} to {dims}",
                model=self.model,
            ) from error
        return (y,), x.shape

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return dy.reshape(cache), None


@register("Shape")
class Shape(Op):
    """The input's shape as int64 (``start``/``end`` of opset 15). Carries no gradient."""

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.start = self.attr_int("start", 0)
        self.end = self.attr_int("end", 1 << 62)
        self.differentiable = (False,)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        return (np.array(x.shape[self.start : self.end], dtype=np.int64),), None

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return (None,)


@register("Gather")
class Gather(Op):
    """``np.take(data, indices, axis)``; the gradient scatters back with ``np.add.at``."""

    min_inputs, max_inputs = 2, 2

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.axis = self.attr_int("axis", 0)
        self.differentiable = (True, False)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        data, indices = inputs
        assert data is not None and indices is not None
        if indices.dtype.kind not in "iu":
            raise ModelError(f"bad_indices: Gather {self.node.name!r} got {indices.dtype} indices", model=self.model)
        axis = normalize_axis(self, self.axis, data.ndim)
        try:
            y = np.take(data, indices, axis=axis)
        except IndexError as error:
            raise ModelError(f"bad_indices: Gather {self.node.name!r}: {error}", model=self.model) from error
        return (y,), (data.shape, indices, axis)

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        shape, indices, axis = cache
        dx = np.zeros(shape, dtype=dy.dtype)
        np.add.at(dx, (slice(None),) * axis + (indices,), dy)
        return dx, None


class _Axes(Op):
    """Unsqueeze/Squeeze: ``axes`` is an attribute before opset 13 and a constant input after."""

    max_inputs = 2
    view_grads = True

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        if self.opset < 13:
            self.axes = self.attr_ints("axes", None)
        else:
            axes = self.constant_input(build, 1)
            self.axes = None if axes is None else tuple(int(a) for a in axes.reshape(-1))
        self.differentiable = (True, False)[: len(self.node.inputs)]

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        return dy.reshape(cache), None


@register("Unsqueeze")
class Unsqueeze(_Axes):
    def __init__(self, build: Build) -> None:
        super().__init__(build)
        if self.axes is None:
            raise self.unsupported("axes are required")

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None and self.axes is not None
        rank = x.ndim + len(self.axes)
        axes = tuple(normalize_axis(self, a, rank) for a in self.axes)
        return (np.expand_dims(x, axes),), x.shape


@register("Squeeze")
class Squeeze(_Axes):
    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x = inputs[0]
        assert x is not None
        axes = None if self.axes is None else tuple(normalize_axis(self, a, x.ndim) for a in self.axes)
        try:
            y = np.squeeze(x, axis=axes)
        except ValueError as error:
            raise ModelError(f"bad_shape: Squeeze {self.node.name!r}: {error}", model=self.model) from error
        return (y,), x.shape


@register("Transpose")
class Transpose(Op):
    view_grads = True

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
