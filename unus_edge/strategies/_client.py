"""The device half of a strategy: where local training starts, how it trains, what it uploads.

A server-side :class:`~unus_edge.strategies.Strategy` picks the device half for its tasks with
``config["client"]`` (a name of :data:`CLIENT_STRATEGIES`, or ``package.module:Class``
importable on the device) and configures it with the rest of the task's ``config``:

* :meth:`ClientStrategy.starting_point`: the parameters training starts from. The default is
  the global model; Distributed Selective SGD keeps its own local copy and overwrites only the
  part it downloaded;
* :meth:`ClientStrategy.hooks`: :class:`~unus_edge.nn.TrainHook` objects that change the local
  objective (FedProx's proximal term) or inspect training;
* :meth:`ClientStrategy.upload`: what goes back: a dense delta, the weights, or a sparse
  selection of the delta.

One instance lives as long as the device daemon, so it may keep state between tasks.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from unus_edge.codec import Tensor
from unus_edge.errors import StrategyError
from unus_edge.nn import TrainHook
from unus_edge.strategies._base import Params, Scalar

__all__ = ["CLIENT_STRATEGIES", "ClientStrategy", "ProximalHook", "client_strategy", "register_client_strategy"]


class ProximalHook(TrainHook):
    """The proximal term ``mu / 2 * ||w - w_start||^2`` (FedProx; FedAsync's rho): adds ``mu * (w - w_start)``."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.anchor: dict[str, np.ndarray[Any, Any]] = {}

    def on_train_begin(self, params: dict[str, np.ndarray[Any, Any]]) -> None:
        self.anchor = {name: value.copy() for name, value in params.items()}

    def on_gradients(self, params: dict[str, np.ndarray[Any, Any]], grads: dict[str, np.ndarray[Any, Any]]) -> None:
        for name, grad in grads.items():
            grad += np.float32(self.mu) * (params[name] - self.anchor[name])


def _number(config: Mapping[str, Scalar], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StrategyError(f"task config {key!r} must be a number, got {value!r}")
    return float(value)


class ClientStrategy:
    """FedAvg's device half (the default): train from the global model, upload the delta.

    Task settings: ``proximal_mu`` (> 0 adds FedProx's proximal term) and ``encoding``
    (``"weights"`` uploads the trained weights instead of the delta).
    """

    name: ClassVar[str] = "default"

    def __init__(self, config: Mapping[str, Scalar]) -> None:
        self.configure(config)
        if self.mu < 0:
            raise StrategyError("proximal_mu must be >= 0", strategy=self.name)

    def configure(self, config: Mapping[str, Scalar]) -> None:
        """A new task arrived: its settings replace the previous ones."""
        self.config = dict(config)
        self.mu = _number(config, "proximal_mu", 0.0)

    def starting_point(self, global_params: Params, download: Mapping[str, Tensor]) -> Params:
        """The parameters to train from. ``download`` is what the last model message carried."""
        return {name: np.array(value, dtype=value.dtype) for name, value in global_params.items()}

    def hooks(self, start: Params) -> Sequence[TrainHook]:
        return [ProximalHook(self.mu)] if self.mu > 0 else []

    def upload(self, start: Params, trained: Params, rng: np.random.Generator) -> Mapping[str, Tensor]:
        """What goes back. ``rng`` is seeded from the task (reproducible runs), so the server
        knows it: noise meant for privacy must come from another source (``secrets``)."""
        if self.config.get("encoding") == "weights":
            return trained
        return {name: trained[name] - start[name] for name in start}


CLIENT_STRATEGIES: dict[str, type[ClientStrategy]] = {"default": ClientStrategy, "fedavg": ClientStrategy,
                                                      "fedprox": ClientStrategy}


def register_client_strategy(cls: type[ClientStrategy]) -> type[ClientStrategy]:
    """Class decorator: make ``cls`` available by its ``name`` in task configs."""
    CLIENT_STRATEGIES[cls.name] = cls
    return cls


def client_strategy(config: Mapping[str, Scalar], current: ClientStrategy | None = None) -> ClientStrategy:
    """The device half named by ``config["client"]``; ``current`` is reused if it is that one."""
    spec = str(config.get("client", "default"))
    if spec in CLIENT_STRATEGIES:
        cls = CLIENT_STRATEGIES[spec]
    else:
        module_name, colon, class_name = spec.partition(":")
        if not colon:
            raise StrategyError(f"unknown device strategy; known: {', '.join(sorted(CLIENT_STRATEGIES))} "
                                "or package.module:Class", strategy=spec)
        try:
            loaded = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError as error:
            raise StrategyError(f"cannot import {module_name} on this device: {error}", strategy=spec) from error
        if not (inspect.isclass(loaded) and issubclass(loaded, ClientStrategy)):
            raise StrategyError(f"{class_name} is not a ClientStrategy", strategy=spec)
        cls = loaded
    if current is not None and type(current) is cls:
        current.configure(config)
        return current
    return cls(config)
