"""Losses, SGD, hooks and the mini-batch training loop.

* The loss is added by the trainer, not read from the graph: softmax cross-entropy over integer
  labels (a log-sum-exp shifted by the row maximum, so no overflow) or mean squared error.
* :class:`SGD` follows PyTorch's ``torch.optim.SGD`` exactly (weight decay added to the
  gradient, momentum buffer initialised with the first gradient, no dampening), updating the
  parameter arrays in place with preallocated scratch buffers: no per-step allocation of
  parameter-sized arrays beyond the gradients themselves.
* :func:`train` never mutates the caller's parameters: it trains copies. Shuffling and dropout
  draw from two independent streams spawned from ``config.seed``, so a run is bit-for-bit
  reproducible and adding a Dropout node does not change the batch order.
* Hooks see the trainer's working arrays: ``on_gradients`` may change the gradients in place
  (FedProx's proximal term), ``on_train_end`` may change the final parameters in place
  (selective sharing, clipping the delta), ``on_step_begin`` may raise to abandon training.
* **Plain SGD folds the learning rate into the loss gradient.** Without momentum, weight decay
  or a hook that reads gradients, the trainer scales the loss gradient by ``lr / n`` instead of
  ``1 / n``. Backpropagation is linear in it, so every parameter gradient comes out already
  multiplied by ``lr`` and the update is one ``w -= g`` per parameter: one pass over each
  weight-sized array instead of three (measured: ``docs/engine.md``). The arithmetic differs from
  ``w -= lr * g`` only in rounding (``lr`` is applied to the batch-sized gradient instead).
* Labels are checked once per call, not once per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from unus_edge.errors import ConfigError, DataError
from unus_edge.nn._base import Array
from unus_edge.nn._graph import Graph
from unus_edge.onnx_io import check_parameters, prepare_input, softmax_cross_entropy

logger = logging.getLogger(__name__)

Loss = Literal["softmax_cross_entropy", "mse"]
LOSSES: tuple[str, ...] = ("softmax_cross_entropy", "mse")


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings of one round."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: Loss = "softmax_cross_entropy"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError("train.epochs", f"must be a non-negative integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError("train.batch_size", f"must be a positive integer, got {self.batch_size!r}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError("train.learning_rate", f"must be positive, got {self.learning_rate!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("train.momentum", f"must lie in [0, 1), got {self.momentum!r}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError("train.weight_decay", f"must be non-negative, got {self.weight_decay!r}")
        if self.loss not in LOSSES:
            raise ConfigError("train.loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")


@dataclass(frozen=True)
class TrainResult:
    """Trained parameters, the number of training examples, the mean loss and the step count."""

    params: dict[str, Array]
    num_examples: int
    mean_loss: float
    steps: int


class TrainHook:
    """Base class for training hooks; every method is a no-op unless overridden."""

    def on_train_begin(self, params: dict[str, Array]) -> None:
        """Called once with the working copy of the parameters, before the first step."""

    def on_step_begin(self, step: int) -> None:
        """Called before every step (counted from 0); may raise to abandon training."""

    def on_gradients(self, params: dict[str, Array], grads: dict[str, Array]) -> None:
        """Called every step before the update; may modify ``grads`` in place.

        Overriding it makes the trainer hand over true gradients (see the module docstring).
        """

    def on_train_end(self, initial: Mapping[str, Array], final: dict[str, Array]) -> None:
        """Called once after the last step; may modify ``final`` in place."""


class SGD:
    """Stochastic gradient descent with momentum and L2 weight decay (PyTorch semantics)."""

    def __init__(self, learning_rate: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self._velocity: dict[str, Array] = {}
        self._scratch: dict[str, Array] = {}

    def step(self, params: Mapping[str, Array], grads: Mapping[str, Array]) -> None:
        """Update ``params`` in place from ``grads`` (the gradients are not modified)."""
        for key, grad in grads.items():
            weight = params[key]
            scratch = self._scratch.get(key)
            if scratch is None or scratch.shape != weight.shape:
                scratch = self._scratch[key] = np.empty_like(weight)
            direction = grad
            if self.weight_decay:
                np.multiply(weight, self.weight_decay, out=scratch)
                scratch += grad
                direction = scratch
            if self.momentum:
                velocity = self._velocity.get(key)
                if velocity is None:
                    velocity = self._velocity[key] = np.array(direction, copy=True)
                else:
                    velocity *= self.momentum
                    velocity += direction
                direction = velocity
            np.multiply(direction, self.learning_rate, out=scratch)
            weight -= scratch


def reads_gradients(hook: TrainHook) -> bool:
    """Whether ``hook`` looks at the gradients (overrides :meth:`TrainHook.on_gradients`)."""
    return type(hook).on_gradients is not TrainHook.on_gradients


def _cross_entropy(logits: Array, labels: Array, scale: float) -> tuple[float, Array]:
    """Softmax cross-entropy of checked labels: the mean loss and ``scale`` times its gradient.

    The same arithmetic as :func:`~unus_edge.onnx_io.softmax_cross_entropy` followed by the
    one-hot subtraction, in one buffer.
    """
    n = logits.shape[0]
    rows = np.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    picked = z[rows, labels]
    np.exp(z, out=z)
    total = z.sum(axis=1, keepdims=True)
    value = float(np.mean(np.log(total[:, 0]) - picked, dtype=np.float64))
    z /= total
    z[rows, labels] -= 1.0
    z *= scale / n
    return value, z


def loss_value_and_grad(output: Array, y: Array, loss: str, *, scale: float = 1.0) -> tuple[float, Array]:
    """The mean loss over the batch and ``scale`` times its gradient with respect to ``output``."""
    n = output.shape[0]
    if loss == "softmax_cross_entropy":
        losses, grad = softmax_cross_entropy(output, y)  # checks the logits and the labels
        grad[np.arange(n), y] -= 1.0
        grad *= scale / n
        return float(losses.mean(dtype=np.float64)), grad
    if loss == "mse":
        target = np.asarray(y, dtype=output.dtype)
        if target.size != output.size:
            raise DataError("bad_targets", f"{target.shape} targets for outputs of shape {output.shape}")
        diff = output - target.reshape(output.shape)
        value = float(np.mean(np.square(diff), dtype=np.float64))
        diff *= 2.0 * scale / output.size
        return value, diff
    raise ConfigError("train.loss", f"must be one of {', '.join(LOSSES)}, got {loss!r}")


def loss_and_grad(
    graph: Graph,
    params: Mapping[str, Array],
    x: Array,
    y: Array,
    *,
    loss: Loss = "softmax_cross_entropy",
    training: bool = True,
    rng: np.random.Generator | None = None,
) -> tuple[float, dict[str, Array]]:
    """The mean loss of one batch and the gradients of the trainable parameters.

    ``x`` is any array with n rows, reshaped to the model's input shape (float32). With
    ``training=True`` BatchNormalization running statistics in ``params`` are updated in place
    (as a training step would) and dropout draws from ``rng``.
    """
    output, tape = graph.forward_with_tape(params, prepare_input(graph.model, x), training=training, rng=rng)
    value, grad_output = loss_value_and_grad(output, y, loss)
    return value, graph.backward(tape, grad_output, owned=True)


def _step(
    graph: Graph,
    params: Mapping[str, Array],
    x: Array,
    y: Array,
    loss: str,
    scale: float,
    rng: np.random.Generator,
) -> tuple[float, dict[str, Array]]:
    """A training step's loss and ``scale`` times its gradients; ``y`` is already checked."""
    output, tape = graph.forward_with_tape(params, x, training=True, rng=rng)
    if loss == "softmax_cross_entropy":
        value, grad_output = _cross_entropy(output, y, scale)
    else:
        value, grad_output = loss_value_and_grad(output, y, loss, scale=scale)
    return value, graph.backward(tape, grad_output, owned=True)


def _check_labels(graph: Graph, params: Mapping[str, Array], sample: Array, targets: Array) -> None:
    """Once per call: integer labels within the model's classes (the steps do not check again)."""
    if targets.dtype.kind not in "iu":
        raise DataError("bad_labels", f"cross-entropy needs integer labels, got {targets.dtype}")
    logits = graph.forward(params, sample)  # one row, inference: no state changes
    softmax_cross_entropy(logits, targets[:1])  # the logits' rank; the label's dtype
    classes = logits.shape[1]
    if targets.ndim != 1:
        raise DataError("bad_labels", f"expected one integer label per example, got labels of shape {targets.shape}")
    if targets.min() < 0 or targets.max() >= classes:
        raise DataError("bad_labels", f"labels must lie in [0, {classes})")


def train(
    graph: Graph,
    params: Mapping[str, Array],
    x: Array,
    y: Array,
    config: TrainConfig,
    *,
    hooks: Sequence[TrainHook] = (),
) -> TrainResult:
    """Train copies of ``params`` on ``(x, y)`` with mini-batch SGD; return them and statistics."""
    model = graph.model
    check_parameters(model, params)
    inputs = prepare_input(model, x)
    targets = np.asarray(y)
    num_examples = inputs.shape[0]
    if targets.shape[:1] != (num_examples,):
        raise DataError("bad_labels", f"{num_examples} inputs but targets of shape {targets.shape}")
    if config.loss == "softmax_cross_entropy" and num_examples:
        _check_labels(graph, params, inputs[:1], targets)
    working = {key: np.array(value, dtype=np.float32, copy=True) for key, value in params.items()}
    initial = {key: value.copy() for key, value in working.items()} if hooks else {}
    shuffle_seed, dropout_seed = np.random.SeedSequence(config.seed).spawn(2)
    shuffle_rng = np.random.default_rng(shuffle_seed)
    dropout_rng = np.random.default_rng(dropout_seed)
    optimizer = SGD(config.learning_rate, config.momentum, config.weight_decay)
    folded = not config.momentum and not config.weight_decay and not any(map(reads_gradients, hooks))
    scale = config.learning_rate if folded else 1.0
    for hook in hooks:
        hook.on_train_begin(working)
    total = 0.0
    steps = 0
    for _epoch in range(config.epochs):
        order = shuffle_rng.permutation(num_examples)
        for start in range(0, num_examples, config.batch_size):
            index = order[start : start + config.batch_size]
            for hook in hooks:
                hook.on_step_begin(steps)
            value, grads = _step(graph, working, np.take(inputs, index, axis=0), np.take(targets, index, axis=0),
                                 config.loss, scale, dropout_rng)
            if not math.isfinite(value):
                logger.warning("model %s: loss is %s at step %d", model.name, value, steps)
            if folded:
                for key, grad in grads.items():
                    working[key] -= grad  # already times the learning rate
            else:
                for hook in hooks:
                    hook.on_gradients(working, grads)
                optimizer.step(working, grads)
            total += value * index.shape[0]
            steps += 1
    for hook in hooks:
        hook.on_train_end(initial, working)
    seen = num_examples * config.epochs
    return TrainResult(working, num_examples, total / seen if seen else 0.0, steps)
