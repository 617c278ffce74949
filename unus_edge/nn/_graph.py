"""The graph interpreter: a forward pass that records a tape, and reverse-mode autodiff over it.

Everything that does not depend on the data is decided once, in :class:`Graph.__init__`:

* nodes are sorted topologically (stable: the file's order when it is valid) and every node is
  turned into an op object, which validates its attributes, so an unsupported op or attribute
  fails **before** training starts, naming the op and the node;
* constants are folded: Constant nodes and every node whose inputs are all constants (integer
  initializers, shape arithmetic) are evaluated once and become constants;
* values get integer slots; each step knows its input and output slots and the slots it can
  free once it has run (so inference holds only live activations);
* the gradient routing is planned: which parameters are *trainable* (reach the output through a
  differentiable input of some op) and which are *buffers* (BatchNormalization running
  statistics), which steps need a backward call and, per step, which inputs need a gradient;
* elementwise ops run in place where that is provably safe: an ``inplace_capable`` op (ReLU)
  overwrites its input when that input is a ``private_output`` of its producer (a Gemm, a
  Conv) and no other step reads it. So Gemm+ReLU and Conv+ReLU make one activation, not two.

The backward pass walks the planned steps in reverse. A value consumed by several nodes (a
residual ``Add``'s skip connection) receives one gradient per consumer; they are summed before
the producer's backward runs, which is always later in the reverse order. It also tracks, per
value, whether the gradient it holds is owned (a new array from a ``fresh_grads`` op, a sum, or
the trainer's loss gradient, or a view of an owned one through a ``view_grads`` op); an owned
gradient goes to the producer's ``backward_owned``, which may overwrite it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from unus_edge.errors import ModelError, ParameterError, UnsupportedOpError
from unus_edge.nn import _conv, _norm, _ops, _shape  # noqa: F401 - importing registers the ops
from unus_edge.nn._base import OPS, Array, Build, Op, Run
from unus_edge.onnx_io import Node, OnnxModel

_ABSENT = 0  # slot 0 always holds None: the value of an omitted optional input


@dataclass(frozen=True, eq=False)
class _Step:
    index: int
    op: Op
    inputs: tuple[int, ...]
    outputs: tuple[tuple[int, int], ...]  # (output position, slot) for each named output
    free: tuple[int, ...]  # slots whose last reader is this step


@dataclass(frozen=True, eq=False)
class Tape:
    """What a recorded forward pass keeps for the backward pass (opaque to callers)."""

    caches: list[Any]
    params: Mapping[str, Array]


def _topological(model: OnnxModel, available: set[str]) -> list[Node]:
    producer: dict[str, int] = {}
    for index, node in enumerate(model.nodes):
        for name in node.outputs:
            if not name:
                continue
            if name in producer or name in available:
                raise ModelError(f"corrupt_graph: value {name!r} is produced twice", model=model.name)
            producer[name] = index
    waiting: list[set[int]] = []
    consumers: dict[int, list[int]] = {}
    for index, node in enumerate(model.nodes):
        deps: set[int] = set()
        for name in node.inputs:
            if not name or name in available:
                continue
            if name not in producer:
                raise ModelError(
                    f"corrupt_graph: input {name!r} of node {node.name!r} ({node.op_type}) is never produced",
                    model=model.name,
                )
            deps.add(producer[name])
            consumers.setdefault(producer[name], []).append(index)
        waiting.append(deps)
    ready = [index for index, deps in enumerate(waiting) if not deps]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(model.nodes[index])
        for consumer in consumers.get(index, ()):
            waiting[consumer].discard(index)
            if not waiting[consumer]:
                heapq.heappush(ready, consumer)
    if len(order) != len(model.nodes):
        raise ModelError("corrupt_graph: the graph has a cycle", model=model.name)
    return order


class Graph:
    """A validated, planned ONNX graph: forward, and backward to the trainable parameters."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ModelError(
                f"unsupported_graph: the engine runs graphs with one input and one output, this one has "
                f"{len(model.inputs)} inputs and {len(model.outputs)} outputs",
                model=model.name,
            )
        for key in model.parameter_names:
            if model.initializers[key].dtype != np.float32:
                raise ModelError(
                    f"unsupported_dtype: parameter {key!r} is {model.initializers[key].dtype}; "
                    "the engine trains float32 models",
                    model=model.name,
                )
        self.input_name = model.inputs[0].name
        self.output_name = model.outputs[0].name
        params = set(model.parameter_names)
        constants: dict[str, Array] = {k: v for k, v in model.initializers.items() if k not in params}
        order = _topological(model, {self.input_name, *model.initializers})
        kept: list[tuple[Node, Op]] = []
        for node in order:
            op = self._build_op(node, constants)
            if node.op_type != "Dropout" and all(not n or n in constants for n in node.inputs):
                outputs, _ = op.forward(
                    [constants[n] if n else None for n in node.inputs], Run(False, None, record=False)
                )
                constants.update((name, value) for name, value in zip(node.outputs, outputs, strict=False) if name)
            else:
                kept.append((node, op))
        self._plan(kept, constants)

    def _build_op(self, node: Node, constants: Mapping[str, Array]) -> Op:
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(
                node.op_type, node.name, model=self.model.name, detail=f"domain {node.domain!r} is not supported"
            )
        cls = OPS.get(node.op_type)
        if cls is None:
            raise UnsupportedOpError(
                node.op_type, node.name, model=self.model.name, detail=f"supported ops: {', '.join(sorted(OPS))}"
            )
        return cls(Build(node, self.model.opset, constants, self.model.initializers, self.model.name))

    def _plan(self, kept: list[tuple[Node, Op]], constants: Mapping[str, Array]) -> None:
        model = self.model
        slots: dict[str, int] = {"": _ABSENT}
        for name in (self.input_name, *model.parameter_names, *constants):
            slots.setdefault(name, len(slots))
        for node, _ in kept:
            for name in node.outputs:
                if name:
                    slots.setdefault(name, len(slots))
        if self.output_name not in slots:
            raise ModelError(f"corrupt_graph: output {self.output_name!r} is never produced", model=model.name)
        self._template: list[Array | None] = [None] * len(slots)
        for name, value in constants.items():
            self._template[slots[name]] = value
        self._input_slot = slots[self.input_name]
        self._output_slot = slots[self.output_name]
        self._param_slots = tuple((key, slots[key]) for key in model.parameter_names)

        last_reader: dict[int, int] = {}
        readers: dict[int, int] = {}
        producer: dict[int, Op] = {}
        for index, (node, op) in enumerate(kept):
            for name in node.inputs:
                last_reader[slots[name]] = index
                readers[slots[name]] = readers.get(slots[name], 0) + 1
            if node.outputs and node.outputs[0]:
                producer[slots[node.outputs[0]]] = op
        pinned = {_ABSENT, self._input_slot, self._output_slot, *(s for _, s in self._param_slots)}
        pinned.update(slots[name] for name in constants)
        for node, op in kept:
            if op.inplace_capable and node.inputs and node.inputs[0]:
                source = slots[node.inputs[0]]
                owner = producer.get(source)
                op.inplace = (source not in pinned and readers[source] == 1 and owner is not None
                              and owner.private_output)
        self._steps: list[_Step] = []
        for index, (node, op) in enumerate(kept):
            free = {s for s in map(slots.__getitem__, node.inputs) if last_reader[s] == index and s not in pinned}
            free.update(slots[n] for n in node.outputs if n and slots[n] not in last_reader and slots[n] not in pinned)
            self._steps.append(
                _Step(
                    index,
                    op,
                    tuple(slots[name] for name in node.inputs),
                    tuple((pos, slots[name]) for pos, name in enumerate(node.outputs) if name),
                    tuple(sorted(free)),
                )
            )
        self._plan_gradients(kept, slots, constants)

    def _plan_gradients(
        self, kept: list[tuple[Node, Op]], slots: Mapping[str, int], constants: Mapping[str, Array]
    ) -> None:
        def differentiable(node: Node, op: Op) -> list[bool]:
            return [
                bool(name) and name not in constants and op.differentiable[pos] for pos, name in enumerate(node.inputs)
            ]

        reach = {self.output_name}  # values whose gradient reaches the output
        contributing: set[int] = set()
        for index in reversed(range(len(kept))):
            node, op = kept[index]
            if node.outputs and node.outputs[0] in reach:
                contributing.add(index)
                reach.update(n for n, d in zip(node.inputs, differentiable(node, op), strict=True) if d)
        self.trainable: tuple[str, ...] = tuple(k for k in self.model.parameter_names if k in reach)
        self.buffers: tuple[str, ...] = tuple(k for k in self.model.parameter_names if k not in reach)
        requires = set(self.trainable)
        for node, op in kept:
            if any(d and n in requires for n, d in zip(node.inputs, differentiable(node, op), strict=True)):
                requires.add(node.outputs[0])
        self._backward_plan: list[tuple[_Step, tuple[bool, ...]]] = []
        for index in reversed(range(len(kept))):
            node, op = kept[index]
            if index not in contributing or node.outputs[0] not in requires:
                continue
            needs = tuple(d and n in requires for n, d in zip(node.inputs, differentiable(node, op), strict=True))
            if any(needs):
                self._backward_plan.append((self._steps[index], needs))
        self._recorded = frozenset(step.index for step, _ in self._backward_plan)
        self._trainable_slots = tuple((key, slots[key]) for key in self.trainable)

    @property
    def ops(self) -> tuple[Op, ...]:
        """The planned ops in execution order (constants folded away); each has its ``node``."""
        return tuple(step.op for step in self._steps)

    # --------------------------------------------------------------------------------- running

    def _run(
        self, params: Mapping[str, Array], x: Array, training: bool, rng: np.random.Generator | None, record: bool
    ) -> tuple[Array, list[Any]]:
        values = self._template.copy()
        try:
            for key, slot in self._param_slots:
                values[slot] = params[key]
        except KeyError as error:
            raise ParameterError(str(error.args[0]), "missing", model=self.model.name) from error
        values[self._input_slot] = x if x.dtype.kind == "f" else x.astype(np.float32)
        run = Run(training, rng, record)
        caches: list[Any] = [None] * len(self._steps) if record else []
        recorded = self._recorded
        for step in self._steps:
            outputs, cache = step.op.forward([values[i] for i in step.inputs], run)
            for pos, slot in step.outputs:
                values[slot] = outputs[pos]
            if record and step.index in recorded:
                caches[step.index] = cache
            for slot in step.free:
                values[slot] = None
        output = values[self._output_slot]
        assert output is not None
        return output, caches

    def forward(
        self,
        params: Mapping[str, Array],
        x: Array,
        *,
        training: bool = False,
        rng: np.random.Generator | None = None,
    ) -> Array:
        """The graph's output for input batch ``x``.

        ``training=True`` uses batch statistics in BatchNormalization (and updates the running
        statistics in ``params`` in place) and applies dropout with ``rng``.
        """
        output, _ = self._run(params, np.asarray(x), training, rng, record=False)
        return np.ascontiguousarray(output)

    def forward_with_tape(
        self,
        params: Mapping[str, Array],
        x: Array,
        *,
        training: bool = True,
        rng: np.random.Generator | None = None,
    ) -> tuple[Array, Tape]:
        """Like :meth:`forward`, also returning the tape that :meth:`backward` needs."""
        output, caches = self._run(params, np.asarray(x), training, rng, record=True)
        return output, Tape(caches, params)

    def backward(self, tape: Tape, grad_output: Array, *, owned: bool = False) -> dict[str, Array]:
        """Gradients of the trainable parameters, given the gradient of the graph's output.

        Every returned array is freshly allocated and writable (hooks may change it in place).
        ``owned=True`` hands ``grad_output`` over: the pass may overwrite it.
        """
        grads: list[Array | None] = [None] * len(self._template)
        mine = [False] * len(self._template)  # whether the gradient in the slot is ours to overwrite
        grads[self._output_slot] = grad_output
        mine[self._output_slot] = owned
        for step, needs in self._backward_plan:
            slot_out = step.outputs[0][1]
            dy = grads[slot_out]
            if dy is None:
                continue
            grads[slot_out] = None
            op = step.op
            cache = tape.caches[step.index]
            dy_owned = mine[slot_out]
            results = op.backward_owned(dy, cache, needs) if dy_owned else op.backward(dy, cache, needs)
            fresh = op.fresh_grads or (op.view_grads and dy_owned)
            for slot, need, grad in zip(step.inputs, needs, results, strict=False):
                if need and grad is not None:
                    previous = grads[slot]
                    if previous is None:
                        grads[slot], mine[slot] = grad, fresh
                    elif mine[slot] and previous.shape == grad.shape:
                        previous += grad
                    else:
                        grads[slot], mine[slot] = previous + grad, True
        result: dict[str, Array] = {}
        seen: set[int] = set()
        for key, slot in self._trainable_slots:
            grad = grads[slot]
            param = tape.params[key]
            if grad is None:
                grad = np.zeros_like(param)
            elif id(grad) in seen or not grad.flags.writeable or grad.shape != param.shape:
                grad = np.array(np.broadcast_to(grad, param.shape), dtype=param.dtype)
            seen.add(id(grad))
            result[key] = grad
        return result
