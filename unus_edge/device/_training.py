"""Local training for one task: the bridge between a task message and the NumPy engine.

Runs in a worker thread (``asyncio.to_thread``) so that the MQTT keepalive and heartbeats keep
flowing while the CPU trains. A :class:`StopHook` lets the daemon abandon a step on shutdown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from unus_edge.codec import Tensor
from unus_edge.data import Dataset
from unus_edge.errors import DataError, MessageError
from unus_edge.messages import Task
from unus_edge.nn import LOSSES, Graph, Loss, TrainConfig, TrainHook, train
from unus_edge.onnx_io import prepare_input, read_parameters
from unus_edge.strategies import ClientStrategy, Params, client_strategy

__all__ = ["Abandoned", "LocalResult", "StopHook", "check_dataset", "task_loss", "train_task"]


class Abandoned(Exception):  # noqa: N818 (a signal, not an error)
    """Raised inside training when the daemon is shutting down."""


class StopHook(TrainHook):
    """Abandons training between two steps once ``stop`` is set."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def on_step_begin(self, step: int) -> None:
        if self.stop.is_set():
            raise Abandoned


@dataclass(frozen=True)
class LocalResult:
    delta: Mapping[str, Tensor]
    """What the device strategy uploads: the delta, the weights, or a sparse selection."""
    num_examples: int
    train_loss: float
    train_seconds: float
    steps: int
    trained: Params
    """The trained parameters (a device strategy with local state keeps them)."""
    cpu_seconds: float = 0.0
    """CPU time of the training thread (with one BLAS thread: all of the training's CPU)."""


def _number(config: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> float:
    """A numeric task setting; one of the wrong type is refused (``bad_config``), never defaulted:
    a device that trained without the momentum the job asked for would train differently."""
    value = config.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not np.isfinite(value):
        wanted = "an integer" if integer else "a finite number"
        raise MessageError("bad_config", f"{key} must be {wanted}, got {value!r}", kind="task",
                           field=f"config.{key}")
    return float(value)


def task_loss(config: Mapping[str, Any], dataset: Dataset) -> Loss:
    """The loss a task names (``loss``; cross-entropy when absent, as before it was sent), refused
    (``bad_config``) when it is unknown or does not fit this device's data: a regression device
    trains only with ``mse``, a classification device only with cross-entropy."""
    loss = config.get("loss", "softmax_cross_entropy")
    if loss not in LOSSES:
        raise MessageError("bad_config", f"loss must be one of {', '.join(LOSSES)}, got {loss!r}", kind="task",
                           field="config.loss")
    if (loss == "mse") != dataset.is_regression:
        held = "regression targets" if dataset.is_regression else "class labels"
        raise MessageError("bad_config", f"the job trains with {loss}, but this device's data are {held} "
                                         "(device.task)", kind="task", field="config.loss")
    return loss  # type: ignore[no-any-return]


def train_task(
    graph: Graph,
    start: Params,
    dataset: Dataset,
    task: Task,
    stop: threading.Event,
    client: ClientStrategy | None = None,
) -> LocalResult:
    """Train from ``start`` as ``task`` says; return what ``client`` uploads (by default the delta).

    Task settings read here: ``momentum``, ``weight_decay``, ``seed``; the device strategy
    (``client``, default FedAvg's) reads its own (``proximal_mu``, ``encoding``...). A setting
    of the wrong type raises ``MessageError`` (``bad_config``) before any training.
    """
    started = time.perf_counter()
    cpu_started = time.thread_time()
    client = client or client_strategy(task.config)
    seed = int(_number(task.config, "seed", 0, integer=True))
    config = TrainConfig(
        epochs=task.epochs,
        batch_size=min(task.batch_size, len(dataset)),
        learning_rate=task.learning_rate,
        momentum=_number(task.config, "momentum", 0.0),
        weight_decay=_number(task.config, "weight_decay", 0.0),
        loss=task_loss(task.config, dataset),
        seed=seed,
    )
    result = train(graph, start, dataset.x, dataset.y, config, hooks=[StopHook(stop), *client.hooks(start)])
    tensors = client.upload(start, result.params, np.random.default_rng([seed, 0x0DD5]))
    return LocalResult(tensors, result.num_examples, result.mean_loss, time.perf_counter() - started, result.steps,
                       result.params, time.thread_time() - cpu_started)


def check_dataset(graph: Graph, dataset: Dataset, source: str) -> None:
    """Refuse, before the device registers, local data its model cannot train on: examples of
    another shape, or more classes than the model has outputs (such a device used to register
    and fail at its first task). ``source`` names the data in the error."""
    model = graph.model
    if len(dataset) == 0:
        raise DataError("empty", f"{source} holds no examples")
    try:
        batch = prepare_input(model, dataset.x[:1])
    except DataError as error:
        wanted = model.inputs[0].shape if model.inputs else None
        raise DataError("bad_shape", f"{source}: examples of shape {tuple(dataset.x.shape[1:])} do not fit "
                        f"model {model.name} (input {wanted})") from error
    output = np.asarray(graph.forward(read_parameters(model), batch))
    if dataset.is_regression:
        if output.size != int(np.prod(dataset.target_shape, dtype=np.int64)):
            raise DataError("bad_targets", f"{source}: targets of shape {dataset.target_shape}, but model "
                            f"{model.name} outputs {tuple(output.shape[1:])} per example")
        return
    outputs = int(output.shape[-1])
    if dataset.num_classes > outputs:
        raise DataError("bad_num_classes", f"{source}: {dataset.num_classes} classes, but model {model.name} "
                        f"has {outputs} outputs")
