"""The device half of a strategy: where local training starts, how it trains, what it uploads.

A server-side :class:`~unus_edge.strategies.Strategy` picks the device half for its tasks with
``config["client"]`` (a name of :data:`CLIENT_STRATEGIES`: a built-in, or one the device's own
``device.client_strategies`` loaded at start) and configures it with the rest of the task's
``config``:

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
from unus_edge.errors import ConfigError, StrategyError
from unus_edge.messages import task_encoding
from unus_edge.nn import TrainHook
from unus_edge.strategies._base import Params, Scalar

__all__ = ["CLIENT_STRATEGIES", "ClientStrategy", "ProximalHook", "client_strategy", "load_client_strategies",
           "register_client_strategy"]


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
        if task_encoding(self.config) == "weights":
            return trained
        return {name: trained[name] - start[name] for name in start}


CLIENT_STRATEGIES: dict[str, type[ClientStrategy]] = {"default": ClientStrategy, "fedavg": ClientStrategy,
                                                      "fedprox": ClientStrategy}


def register_client_strategy(cls: type[ClientStrategy]) -> type[ClientStrategy]:
    """Class decorator: make ``cls`` available by its ``name`` in task configs."""
    CLIENT_STRATEGIES[cls.name] = cls
    return cls


def load_client_strategies(specs: str) -> list[str]:
    """Import the device halves a device's own configuration allows; the names they answer to.

    ``specs`` is a comma-separated list of ``package.module:Class`` (``device.client_strategies``).
    Each class is registered under its ``name`` and under its spec, so a task may name it either
    way. This is the only place the device imports strategy code: a task never makes it import
    anything (a module name in a message could be any module on the device).
    """
    names = []
    for spec in (part.strip() for part in specs.split(",")):
        if not spec:
            continue
        module_name, colon, class_name = spec.partition(":")
        if not colon or not module_name or not class_name:
            raise ConfigError("device.client_strategies", f"expected package.module:Class, got {spec!r}")
        try:
            loaded = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError as error:
            raise ConfigError("device.client_strategies", f"cannot import {module_name}: {error}") from error
        if not (inspect.isclass(loaded) and issubclass(loaded, ClientStrategy)):
            raise ConfigError("device.client_strategies", f"{spec} is not a ClientStrategy")
        register_client_strategy(loaded)
        CLIENT_STRATEGIES[spec] = loaded
        names += [loaded.name, spec]
    return names


def client_strategy(config: Mapping[str, Scalar], current: ClientStrategy | None = None) -> ClientStrategy:
    """The device half named by ``config["client"]``; ``current`` is reused if it is that one.

    Only registered names are known: the built-ins, halves registered in this process, and those
    :func:`load_client_strategies` loaded from the device's configuration.
    """
    spec = str(config.get("client", "default"))
    cls = CLIENT_STRATEGIES.get(spec)
    if cls is None:
        raise StrategyError(f"unknown device strategy; this device knows {', '.join(sorted(CLIENT_STRATEGIES))} "
                            "(others are allowed by device.client_strategies)", strategy=spec)
    if current is not None and type(current) is cls:
        current.configure(config)
        return current
    return cls(config)
