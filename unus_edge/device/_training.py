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

from unus_edge.data import Dataset
from unus_edge.messages import Task
from unus_edge.nn import Graph, TrainConfig, TrainHook, train
from unus_edge.strategies import Params

__all__ = ["Abandoned", "LocalResult", "ProximalHook", "StopHook", "train_task"]


class Abandoned(Exception):  # noqa: N818 (a signal, not an error)
    """Raised inside training when the daemon is shutting down."""


class StopHook(TrainHook):
    """Abandons training between two steps once ``stop`` is set."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def on_gradients(self, params: dict[str, np.ndarray[Any, Any]], grads: dict[str, np.ndarray[Any, Any]]) -> None:
        if self.stop.is_set():
            raise Abandoned


class ProximalHook(TrainHook):
    """FedProx / FedAsync's proximal term ``mu / 2 * ||w - w_global||^2``: adds ``mu * (w - w_global)``."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.anchor: dict[str, np.ndarray[Any, Any]] = {}

    def on_train_begin(self, params: dict[str, np.ndarray[Any, Any]]) -> None:
        self.anchor = {name: value.copy() for name, value in params.items()}

    def on_gradients(self, params: dict[str, np.ndarray[Any, Any]], grads: dict[str, np.ndarray[Any, Any]]) -> None:
        for name, grad in grads.items():
            grad += np.float32(self.mu) * (params[name] - self.anchor[name])


@dataclass(frozen=True)
class LocalResult:
    delta: Params
    """The delta, or the weights when the task asked for ``encoding = "weights"``."""
    num_examples: int
    train_loss: float
    train_seconds: float
    steps: int


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def train_task(graph: Graph, base: Params, dataset: Dataset, task: Task, stop: threading.Event) -> LocalResult:
    """Train from ``base`` as ``task`` says; return the delta ``w_local - base`` (or the weights).

    Task settings read here: ``momentum``, ``weight_decay``, ``seed``, ``proximal_mu`` (a
    proximal term toward ``base``) and ``encoding`` (``"weights"`` sends ``w_local``).
    """
    started = time.perf_counter()
    config = TrainConfig(
        epochs=task.epochs,
        batch_size=min(task.batch_size, len(dataset)),
        learning_rate=task.learning_rate,
        momentum=_number(task.config, "momentum", 0.0),
        weight_decay=_number(task.config, "weight_decay", 0.0),
        seed=int(_number(task.config, "seed", 0)),
    )
    hooks: list[TrainHook] = [StopHook(stop)]
    mu = _number(task.config, "proximal_mu", 0.0)
    if mu > 0:
        hooks.append(ProximalHook(mu))
    result = train(graph, base, dataset.x, dataset.y, config, hooks=hooks)
    if task.config.get("encoding") == "weights":
        tensors = result.params
    else:
        tensors = {name: result.params[name] - base[name] for name in base}
    return LocalResult(tensors, result.num_examples, result.mean_loss, time.perf_counter() - started, result.steps)
