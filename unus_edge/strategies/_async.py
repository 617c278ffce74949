"""Strategies for SSP and fully asynchronous training: SSP delta averaging, FedAsync, FedBuff.

They run on the SSP engine (``job.mode = "ssp"``), which hands every accepted update to
``on_update`` as it arrives and asks ``global_params`` whenever it publishes or evaluates.
``staleness`` is the number of global versions applied since the update's base version.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from unus_edge.errors import StrategyError
from unus_edge.strategies._base import (
    AsyncContext,
    AsyncStrategy,
    ClientUpdate,
    Params,
    Scalar,
    add_scaled,
    fold,
    new_scratch,
)

__all__ = ["STALENESS_FUNCTIONS", "FedAsync", "FedBuff", "SSPAveraging", "staleness_function"]

StalenessFunction = Callable[[int], float]


def staleness_function(kind: str, *, a: float | None = None, b: float = 4.0) -> StalenessFunction:
    """Weights of stale updates, by staleness ``t - tau`` (Xie et al. 2019; Nguyen et al. 2022).

    * ``constant``: 1;
    * ``polynomial``: ``(t - tau + 1) ** -a`` (``a`` defaults to 0.5);
    * ``hinge``: 1 if ``t - tau <= b``, else ``1 / (a * (t - tau - b) + 1)`` (``a`` = 10, ``b`` = 4);
    * ``sqrt``: ``1 / sqrt(1 + t - tau)`` (FedBuff's default).
    """
    if kind == "constant":
        return lambda staleness: 1.0
    if kind == "polynomial":
        exponent = 0.5 if a is None else a
        return lambda staleness: float((staleness + 1) ** -exponent)
    if kind == "hinge":
        slope = 10.0 if a is None else a
        return lambda staleness: 1.0 if staleness <= b else 1.0 / (slope * (staleness - b) + 1.0)
    if kind == "sqrt":
        return lambda staleness: 1.0 / math.sqrt(1.0 + staleness)
    raise StrategyError(f"unknown staleness function {kind!r}; use one of {', '.join(STALENESS_FUNCTIONS)}")


STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge", "sqrt")


def _staleness_weight(staleness: str | StalenessFunction, a: float | None, b: float,
                      strategy: str) -> StalenessFunction:
    """A name from :data:`STALENESS_FUNCTIONS` (with ``a``, ``b``) or the caller's own function."""
    if isinstance(staleness, str):
        return staleness_function(staleness, a=a, b=b)
    if not callable(staleness):
        raise StrategyError(f"staleness must be one of {', '.join(STALENESS_FUNCTIONS)} or a function of the "
                            f"staleness, not {staleness!r}", strategy=strategy)
    return staleness


class SSPAveraging(AsyncStrategy):
    """Additive delta averaging: ``w <- w + (n_k / n) * delta_k`` for each update as it arrives.

    The sum of pending deltas is kept exactly (float64) and folded into the float32 model when
    the engine publishes the model. With ``s = 0`` and full participation it publishes once per
    clock, after every device's update of that clock: the result is then FedAvg, bit for bit
    (same fold as :class:`~unus_edge.strategies.FedAvg`). Evaluations read the model without
    folding (:meth:`evaluation_params`), so their timing cannot change the rounding.
    """

    name: ClassVar[str] = "ssp"

    def __init__(self) -> None:
        self._base: Params = {}
        self._pending: dict[str, np.ndarray[Any, Any]] = {}
        self._scratch = np.empty(0)
        self._dirty = False

    def start_async(self, params: Params, context: AsyncContext) -> None:
        self._base = {name: value.copy() for name, value in params.items()}
        self._pending = {name: np.zeros(value.shape, np.float64) for name, value in params.items()}
        self._scratch = new_scratch(params)
        self._dirty = False

    def on_update(self, update: ClientUpdate, context: AsyncContext) -> bool:
        for name, tensor in update.delta.items():
            add_scaled(self._pending[name], tensor, float(update.num_examples), self._scratch)
        self._dirty = True
        return True

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        tensors = {f"base/{n}": v for n, v in self._base.items()}
        tensors.update({f"pending/{n}": v for n, v in self._pending.items()})
        return tensors, {"dirty": self._dirty}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        for name in self._base:
            self._base[name] = np.array(tensors[f"base/{name}"])
            self._pending[name][...] = tensors[f"pending/{name}"]
        self._dirty = bool(scalars["dirty"])

    def global_params(self, context: AsyncContext) -> Params:
        if self._dirty:
            self._base = fold(self._base, self._pending, 1.0 / context.total_examples)
            for value in self._pending.values():
                value.fill(0.0)
            self._dirty = False
        return dict(self._base)  # fold makes new arrays and nothing writes into them: no copy

    def evaluation_params(self, context: AsyncContext) -> Params:
        """The model as :meth:`global_params` would fold it, without folding: an evaluation in the
        middle of a clock must not round the model one extra time (s = 0 stays FedAvg, bit for bit)."""
        if not self._dirty:
            return dict(self._base)
        return fold(self._base, self._pending, 1.0 / context.total_examples)


class FedAsync(AsyncStrategy):
    """FedAsync (Xie et al. 2019): ``x <- (1 - a_t) x + a_t x_new`` with ``a_t = alpha * s(t - tau)``.

    Devices send their trained weights (``encoding = "weights"``). ``rho`` > 0 adds the
    proximal term ``rho / 2 * ||x - x_tau||^2`` to the devices' local objective. ``staleness``
    is one of :data:`STALENESS_FUNCTIONS` (with ``a`` and ``b``) or, from Python, a callable
    from staleness (int) to weight (float).
    """

    name: ClassVar[str] = "fedasync"

    def __init__(self, alpha: float = 0.6, staleness: str | StalenessFunction = "polynomial", a: float | None = None,
                 b: float = 4.0, rho: float = 0.0) -> None:
        if not 0 < alpha <= 1:
            raise StrategyError("alpha must lie in (0, 1]", strategy=self.name)
        if rho < 0:
            raise StrategyError("rho must be >= 0", strategy=self.name)
        self.alpha = alpha
        self.weight = _staleness_weight(staleness, a, b, self.name)
        self.rho = rho
        self._params: Params = {}

    def device_config(self) -> Mapping[str, Scalar]:
        config: dict[str, Scalar] = {"encoding": "weights"}
        if self.rho > 0:
            config["proximal_mu"] = self.rho
        return config

    def mixing(self, staleness: int) -> float:
        return self.alpha * self.weight(staleness)

    def start_async(self, params: Params, context: AsyncContext) -> None:
        self._params = {name: value.copy() for name, value in params.items()}

    def on_update(self, update: ClientUpdate, context: AsyncContext) -> bool:
        mix = self.mixing(update.staleness)
        new: Params = {}
        for name, value in self._params.items():
            local = update.delta[name]
            dense = local if isinstance(local, np.ndarray) else local.to_dense()
            new[name] = ((1.0 - mix) * value.astype(np.float64) + mix * dense).astype(value.dtype)
        self._params = new
        return True

    def global_params(self, context: AsyncContext) -> Params:
        return dict(self._params)  # each update makes new arrays: no copy

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        return {f"params/{n}": v for n, v in self._params.items()}, {}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        self._params = {name: np.array(tensors[f"params/{name}"]) for name in self._params}


@dataclass(frozen=True, slots=True)
class _Held:
    """An update FedBuff accepted and holds for a later buffer."""

    update: ClientUpdate
    flushes: int
    """``FedBuff.flushes`` when it arrived: its staleness grows by one per flush since."""


class FedBuff(AsyncStrategy):
    """FedBuff (Nguyen et al. 2022): buffer K updates, then ``w <- w + eta_g * sum s(tau_i) delta_i / K``.

    A buffer holds at most one update per device. An update from a device that is already in
    the buffer is **held**: each device's held updates wait in arrival order (FIFO), and every
    accepted update is applied exactly once. After a flush, the oldest held update of each
    device starts the next buffer. A device with held updates is therefore always in the
    buffer, and at a flush fewer than K devices have held updates (the update that filled the
    buffer was not held): a new buffer never fills from held updates alone, and each flush is
    caused by one arriving update (the engine advances the version by one per ``True``).

    Staleness: the model version advances only on a flush, so every update in a buffer is
    applied to the version that was current while the buffer filled. An update is weighted
    by ``s(v - base_version)``, ``v`` that version, when it enters the buffer: at arrival for
    an update buffered at once; for a held update, its arrival staleness plus the flushes
    since it arrived.

    ``staleness`` is one of :data:`STALENESS_FUNCTIONS` (with ``a`` and ``b``) or, from
    Python, a callable from staleness (int) to weight (float).

    Held updates are copies of full deltas: with ``s = inf`` a device much faster than the
    buffers fill accumulates them. A finite staleness bound ``s`` limits how many. When the job
    ends, :meth:`finish_async` applies the partial buffer and the held updates.
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(self, buffer_size: int = 10, server_learning_rate: float = 1.0,
                 staleness: str | StalenessFunction = "sqrt", a: float | None = None, b: float = 4.0) -> None:
        if buffer_size < 1:
            raise StrategyError("buffer_size must be at least 1", strategy=self.name)
        if server_learning_rate <= 0:
            raise StrategyError("server_learning_rate must be positive", strategy=self.name)
        self.buffer_size = buffer_size
        self.server_learning_rate = server_learning_rate
        self.weight = _staleness_weight(staleness, a, b, self.name)
        self._params: Params = {}
        self._sums: dict[str, np.ndarray[Any, Any]] = {}
        self._scratch = np.empty(0)
        self._in_buffer: set[str] = set()
        self._held: dict[str, deque[_Held]] = {}
        """Per device, in arrival order; every device here is in ``_in_buffer``."""
        self.flushes = 0

    @property
    def held(self) -> int:
        """Updates accepted and held for a later buffer."""
        return sum(len(queue) for queue in self._held.values())

    def start_async(self, params: Params, context: AsyncContext) -> None:
        self._params = {name: value.copy() for name, value in params.items()}
        self._sums = {name: np.zeros(value.shape, np.float64) for name, value in params.items()}
        self._scratch = new_scratch(params)

    def _buffer(self, update: ClientUpdate) -> None:
        for name, tensor in update.delta.items():
            add_scaled(self._sums[name], tensor, self.weight(update.staleness), self._scratch)
        self._in_buffer.add(update.device_id)

    def _hold(self, update: ClientUpdate) -> None:
        # Copies: the update's arrays are views of a received payload.
        delta = {n: np.array(t) if isinstance(t, np.ndarray) else t for n, t in update.delta.items()}
        copy = replace(update, delta=delta)
        self._held.setdefault(update.device_id, deque()).append(_Held(copy, self.flushes))

    def _take(self, device_id: str) -> ClientUpdate:
        """The device's oldest held update, with its staleness as of the current buffer."""
        queue = self._held[device_id]
        item = queue.popleft()
        if not queue:
            del self._held[device_id]
        return replace(item.update, staleness=item.update.staleness + self.flushes - item.flushes)

    def on_update(self, update: ClientUpdate, context: AsyncContext) -> bool:
        if update.device_id in self._in_buffer:
            self._hold(update)
            return False
        self._buffer(update)
        if len(self._in_buffer) < self.buffer_size:
            return False
        self._flush()
        return True

    def _flush(self) -> None:
        self._params = fold(self._params, self._sums, self.server_learning_rate / self.buffer_size)
        for value in self._sums.values():
            value.fill(0.0)
        self._in_buffer.clear()
        self.flushes += 1
        for device_id in list(self._held):  # fewer than K of them: see the class docstring
            self._buffer(self._take(device_id))

    def finish_async(self, context: AsyncContext) -> int:
        """Flush the partial buffer, then the held updates, with the same step per update
        (``eta_g / K``): every accepted update is in the final model."""
        flushes = 0
        while self._in_buffer:
            self._flush()
            flushes += 1
        return flushes

    def global_params(self, context: AsyncContext) -> Params:
        return dict(self._params)  # each flush makes new arrays: no copy

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        tensors = {f"params/{n}": v for n, v in self._params.items()} | {f"sums/{n}": v for n, v in self._sums.items()}
        held: list[dict[str, Any]] = []
        for queue in self._held.values():
            for item in queue:  # in each device's FIFO order
                update = item.update
                for name, tensor in update.delta.items():
                    dense = tensor if isinstance(tensor, np.ndarray) else tensor.to_dense()
                    tensors[f"held/{len(held)}/{name}"] = dense
                held.append({"device_id": update.device_id, "num_examples": update.num_examples,
                             "base_version": update.base_version, "train_loss": update.train_loss,
                             "staleness": update.staleness, "metrics": dict(update.metrics),
                             "names": list(update.delta), "flushes": item.flushes})
        return tensors, {"in_buffer": sorted(self._in_buffer), "flushes": self.flushes, "held": held}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        self._params = {name: np.array(tensors[f"params/{name}"]) for name in self._params}
        for name in self._sums:
            self._sums[name][...] = tensors[f"sums/{name}"]
        self._in_buffer = set(scalars["in_buffer"])
        self.flushes = int(scalars["flushes"])
        self._held = {}
        held = scalars["held"]
        if isinstance(held, Mapping):  # older checkpoints: at most one held update per device
            held = [{"device_id": device_id, "num_examples": n, "base_version": base, "train_loss": loss,
                     "staleness": stale, "names": list(self._params), "flushes": self.flushes,
                     "key": f"held/{device_id}"} for device_id, (n, base, loss, stale) in held.items()]
        for index, entry in enumerate(held):
            key = entry.get("key", f"held/{index}")
            delta = {name: np.array(tensors[f"{key}/{name}"]) for name in entry["names"]}
            update = ClientUpdate(entry["device_id"], int(entry["num_examples"]), delta, int(entry["base_version"]),
                                  float(entry["train_loss"]), int(entry["staleness"]), dict(entry.get("metrics", {})))
            self._held.setdefault(update.device_id, deque()).append(_Held(update, int(entry["flushes"])))
