"""The op protocol of the NumPy engine, its registry, and helpers shared by the ops.

Every ONNX op the engine knows is a small class with a ``forward``/``backward`` pair:

* ``__init__(build)`` reads and **validates** the node's attributes once, when the graph is
  built, raising :class:`~unus_edge.errors.UnsupportedOpError` (naming the op, the node and
  the reason) for anything the engine cannot compute exactly. Nothing is validated per step.
* ``forward(inputs, run)`` returns ``(outputs, cache)``: a tuple with one array per node output
  and whatever ``backward`` needs (``None`` when the step will not be differentiated).
* ``backward(dy, cache, needs)`` returns one gradient (or ``None``) per input, computing only the
  ones flagged in ``needs``. Gradients flow through output 0 only; the other outputs of an op
  (a Dropout mask, BatchNormalization's running statistics) are not differentiable.
* ``differentiable[i]`` says whether input ``i`` can carry a gradient at all (a Reshape's shape,
  BatchNormalization's running mean/var cannot). The graph uses it to plan the backward pass.

Ops never modify their inputs or the incoming gradient in place (a gradient may be shared by
the two operands of an Add), with one deliberate exception: BatchNormalization in training
mode updates its running-statistics buffers in place, as ``torch.nn.BatchNorm`` does. Where the
graph can prove an array is nobody else's, it lets an op reuse it, through declared properties
rather than by trusting the op:

* ``private_output``: output 0 is a new array the op does not keep (in its cache or anywhere).
  An ``inplace_capable`` elementwise op whose input is such an output, read by nobody else,
  gets ``inplace = True`` from the planner and may overwrite that input (a Gemm's or a Conv's
  ReLU: no activation-sized copy).
* ``fresh_grads``: ``backward`` returns new arrays (never ``dy``, a view of it, or anything
  the op keeps); ``view_grads``: it returns ``dy`` or views of it. The graph tracks, per value,
  whether the gradient it holds is owned; an owned ``dy`` goes to ``backward_owned``, which may
  overwrite it (a ReLU's mask applied in place).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
from numpy.typing import NDArray

from unus_edge.errors import ModelError, UnsupportedOpError
from unus_edge.onnx_io import AttributeValue, Node, RawAttribute

Array = NDArray[Any]
Grads = Sequence[Array | None]

OPS: dict[str, type[Op]] = {}

_OpT = TypeVar("_OpT", bound="type[Op]")


def register(*op_types: str) -> Callable[[_OpT], _OpT]:
    """Class decorator: make an op class the implementation of the given ONNX op types."""

    def decorate(cls: _OpT) -> _OpT:
        for op_type in op_types:
            OPS[op_type] = cls
        return cls

    return decorate


@dataclass(frozen=True)
class Build:
    """What an op may look at when it is built: its node, the opset, known constant values."""

    node: Node
    opset: int
    constants: Mapping[str, Array]
    initializers: Mapping[str, Array]
    model: str = ""


class Run:
    """Per-call state shared by the ops of one forward pass."""

    __slots__ = ("record", "rng", "training")

    def __init__(self, training: bool, rng: np.random.Generator | None, record: bool) -> None:
        self.training = training  # batch statistics and dropout, as opposed to inference
        self.rng = rng  # dropout masks
        self.record = record  # a backward pass will follow: keep what it needs


class Op:
    """Base class: attribute access and validation helpers, and the forward/backward protocol."""

    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int] = 1
    max_outputs: ClassVar[int] = 1
    private_output: ClassVar[bool] = False
    """Output 0 is a new array this op does not keep: a later op may overwrite it."""
    inplace_capable: ClassVar[bool] = False
    """Elementwise on input 0: may write its output into input 0 when the planner allows it."""
    fresh_grads: ClassVar[bool] = False
    """``backward`` returns new arrays, never ``dy`` or a view of it, nor anything it keeps."""
    view_grads: ClassVar[bool] = False
    """``backward`` returns ``dy`` or views of it (owned exactly when ``dy`` is)."""

    def __init__(self, build: Build) -> None:
        self.node = build.node
        self.opset = build.opset
        self.model = build.model
        count = len(build.node.inputs)
        if not self.min_inputs <= count <= self.max_inputs:
            raise self.unsupported(f"expects {self.min_inputs}..{self.max_inputs} inputs, has {count}")
        outputs = [name for name in build.node.outputs[self.max_outputs :] if name]
        if outputs:
            raise self.unsupported(f"output(s) {outputs} are not supported")
        self.differentiable: tuple[bool, ...] = (True,) * count
        self.inplace = False  # set by the graph's planner, for inplace_capable ops only

    # --------------------------------------------------------------------- protocol

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        raise NotImplementedError

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        raise NotImplementedError

    def backward_owned(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        """:meth:`backward` when ``dy`` is this op's to overwrite (the graph proved nobody else holds it)."""
        return self.backward(dy, cache, needs)

    # --------------------------------------------------------------------- helpers

    def unsupported(self, detail: str) -> UnsupportedOpError:
        """The error to raise for an attribute or input the engine cannot handle."""
        return UnsupportedOpError(self.node.op_type, self.node.name, model=self.model, detail=detail)

    def _attr(self, key: str) -> AttributeValue | None:
        value = self.node.attributes.get(key)
        if isinstance(value, RawAttribute):
            raise self.unsupported(f"attribute {key!r} of ONNX attribute type {value.type}")
        return value

    def attr_int(self, key: str, default: int) -> int:
        value = self._attr(key)
        if value is None:
            return default
        if not isinstance(value, int):
            raise self.unsupported(f"attribute {key!r} must be an int, got {value!r}")
        return value

    def attr_float(self, key: str, default: float) -> float:
        value = self._attr(key)
        if value is None:
            return default
        if not isinstance(value, float | int):
            raise self.unsupported(f"attribute {key!r} must be a float, got {value!r}")
        return float(value)

    def attr_str(self, key: str, default: str) -> str:
        value = self._attr(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.unsupported(f"attribute {key!r} must be a string, got {value!r}")
        return value

    def attr_ints(self, key: str, default: tuple[int, ...] | None) -> tuple[int, ...] | None:
        value = self._attr(key)
        if value is None:
            return default
        if not isinstance(value, tuple) or not all(isinstance(v, int) for v in value):
            raise self.unsupported(f"attribute {key!r} must be a list of ints, got {value!r}")
        return tuple(int(v) for v in value)

    def constant_input(self, build: Build, index: int, *, parameter_ok: bool = False) -> Array | None:
        """The value of input ``index`` if it is a constant, ``None`` when the input is absent.

        ``parameter_ok`` also accepts a float initializer (a parameter), read once at build time:
        for settings such as Dropout's ratio that exporters store as float initializers.
        """
        if index >= len(self.node.inputs) or not self.node.inputs[index]:
            return None
        name = self.node.inputs[index]
        value = build.constants.get(name)
        if value is None and parameter_ok:
            value = build.initializers.get(name)
        if value is None:
            raise self.unsupported(f"input {index} ({self.node.inputs[index]!r}) must be a constant")
        return value


def unbroadcast(grad: Array, shape: tuple[int, ...]) -> Array:
    """Sum a broadcast gradient back to the shape of the operand it flowed from."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def normalize_axis(op: Op, axis: int, ndim: int) -> int:
    """``axis`` in ``[0, ndim)``; negative axes count from the end."""
    if not -ndim <= axis < ndim:
        raise ModelError(f"bad_axis: axis {axis} out of range for rank {ndim} at node {op.node.name!r}", model=op.model)
    return axis % ndim
