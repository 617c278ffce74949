"""The strategy API: two small, pure, synchronous ABCs, one per kind of training.

A strategy never does I/O and never sees MQTT. A :class:`Strategy` runs synchronous rounds
(``job.mode = "sync"``); an :class:`AsyncStrategy` takes every update as it arrives (SSP,
``job.mode = "ssp"``); both derive from :class:`StrategyBase` (name, task settings, published
payload, checkpointed state). For a round, the aggregator engine calls a :class:`Strategy`:

1. :meth:`Strategy.configure_round` picks the devices of a round and what each one trains
   with (:class:`Assignment`).
2. :meth:`Strategy.new_accumulator` gives a streaming :class:`Accumulator`; the engine feeds it
   each accepted :class:`ClientUpdate` as it arrives, so memory stays O(model) rather than
   O(devices x model). The default, :class:`WeightedMean`, keeps ``sum(w_k * delta_k)`` and
   ``sum(w_k)`` with ``w_k = n_k``.
3. :meth:`Strategy.aggregate` turns the accumulator and the round's :class:`Failure` list into
   the next global parameters (or ``None`` to keep the current ones).
4. :meth:`Strategy.evaluate` decides what to evaluate after a round (by default: the engine's
   central evaluation of the new parameters).

Parameters are ``dict[str, np.ndarray]`` keyed by the ONNX initializer names (the wire keys).
Updates carry *deltas*: ``delta_k = w_k - w_global`` (dense arrays or sparse tensors).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast, runtime_checkable

import numpy as np

from unus_edge._types import Scalar
from unus_edge.codec import SparseTensor, Tensor

__all__ = [
    "Accumulator",
    "AccumulatorT",
    "Assignment",
    "AsyncContext",
    "AsyncStrategy",
    "ClientUpdate",
    "DeviceInfo",
    "Failure",
    "Params",
    "RoundContext",
    "SavableAccumulator",
    "Scalar",
    "Strategy",
    "StrategyBase",
    "WeightedMean",
    "add_scaled",
    "fold",
    "new_scratch",
]

Params = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A device available for selection."""

    device_id: str
    num_examples: int
    platform: str = ""
    rounds_contributed: int = 0
    last_train_loss: float | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    """What one selected device trains with this round."""

    device_id: str
    epochs: int
    batch_size: int
    learning_rate: float
    config: Mapping[str, Scalar] = field(default_factory=dict)
    """Extra device-side settings, delivered in the task (e.g. ``proximal_mu``)."""


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What the engine tells ``configure_round``: the job's defaults and a seeded RNG."""

    server_round: int
    fraction: float
    epochs: int
    batch_size: int
    learning_rate: float
    rng: np.random.Generator


@dataclass(slots=True)
class AsyncContext:
    """What the engine tells asynchronous strategies."""

    version: int
    """The current global model version."""
    total_examples: int
    """n: the examples of all participating devices (SSP averaging weighs by n_k / n)."""
    staleness_bound: int | None = None


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """An accepted update: a delta against ``base_version``, and how it was made."""

    device_id: str
    num_examples: int
    delta: Mapping[str, Tensor]
    base_version: int
    train_loss: float
    staleness: int = 0
    """Global versions applied since ``base_version`` (0 in synchronous rounds)."""
    metrics: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Failure:
    """A selected device that did not contribute, and why (``timeout``, ``offline``, ``rejected``)."""

    device_id: str
    reason: str
    detail: str = ""


class Accumulator(Protocol):
    """Receives a round's accepted updates one at a time, and reports the round's totals.

    ``count`` is the number of updates added; ``num_examples`` and ``train_loss`` (the mean
    training loss over those examples, ``None`` when there are none) go into the round's metrics.
    """

    count: int

    def add(self, update: ClientUpdate) -> None: ...

    @property
    def num_examples(self) -> int: ...

    @property
    def train_loss(self) -> float | None: ...


@runtime_checkable
class SavableAccumulator(Accumulator, Protocol):
    """An accumulator the aggregator can checkpoint mid-round (every built-in one is); with one
    that is not, an aggregator restarted mid-round runs the round again."""

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]: ...

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None: ...


AccumulatorT = TypeVar("AccumulatorT", bound=Accumulator)


_CHUNK = 1 << 18
"""Elements per step of :func:`add_scaled`: the float64 scratch (2 MB) stays in a core's L2 cache."""


def new_scratch(template: Mapping[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """The float64 scratch :func:`add_scaled` needs for tensors like ``template``'s (at most 2 MB)."""
    largest = max((value.size for value in template.values()), default=1)
    return np.empty(max(1, min(largest, _CHUNK)), dtype=np.float64)


def add_scaled(target: np.ndarray[Any, Any], tensor: Tensor, scale: float, scratch: np.ndarray[Any, Any]) -> None:
    """``target += scale * tensor`` in place, for a dense array or a sparse tensor.

    ``target`` is a float64 accumulator and ``scratch`` a float64 buffer (:func:`new_scratch`);
    the work goes in chunks of the scratch's size. Products of an integer weight (< 2**24) and a float32
    value are exact in float64; their sums round only in the last of 53 bits, which the final
    rounding to float32 (24 bits) almost never sees. So the aggregate does not depend on the
    order updates arrive in, in practice: float64 addition is not associative in general.
    """
    flat = target.reshape(-1)
    if isinstance(tensor, SparseTensor):
        flat[tensor.indices] += scale * tensor.values.astype(np.float64)  # indices are unique
        return
    source = np.asarray(tensor).reshape(-1)
    step = scratch.shape[0]
    for start in range(0, flat.shape[0], step):
        stop = min(start + step, flat.shape[0])
        part = scratch[: stop - start]
        # Cast first, then multiply in float64 (NEP 50 would compute float32 x float in float32).
        # Casting by copy is faster than a ufunc's buffered dtype=float64 cast (1.4x the float32
        # floor instead of 2.2x), and exact: every float32 is a float64.
        np.copyto(part, source[start:stop], casting="safe")
        np.multiply(part, scale, out=part)
        np.add(flat[start:stop], part, out=flat[start:stop])


def fold(base: Mapping[str, np.ndarray[Any, Any]], sums: Mapping[str, np.ndarray[Any, Any]], scale: float) -> Params:
    """``base + scale * sums`` computed in float64 and rounded once to each parameter's dtype.

    FedAvg and SSP delta averaging both fold through here, so that with the same sums they
    produce bit-identical models.
    """
    return {name: (base[name].astype(np.float64) + sums[name] * scale).astype(base[name].dtype) for name in base}


class WeightedMean:
    """``sum_k w_k * delta_k / sum_k w_k`` in O(model) memory, independent of arrival order.

    The sums are float64 (8 bytes per parameter) with one small shared scratch buffer; the mean
    comes back in each parameter's own dtype. ``weight`` maps an update to its weight; the
    default is ``num_examples`` (FedAvg's n_k).
    """

    def __init__(
        self, template: Mapping[str, np.ndarray[Any, Any]], weight: Callable[[ClientUpdate], float] | None = None
    ) -> None:
        self.dtypes = {name: value.dtype for name, value in template.items()}
        self.sums = {name: np.zeros(value.shape, dtype=np.float64) for name, value in template.items()}
        self._scratch = new_scratch(template)
        self._weight = weight or (lambda update: float(update.num_examples))
        self.total_weight = 0.0
        self.count = 0
        self.num_examples = 0
        self.loss_sum = 0.0

    def add(self, update: ClientUpdate) -> None:
        weight = self._weight(update)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight {weight} of {update.device_id} is not a finite non-negative number")
        for name, tensor in update.delta.items():
            add_scaled(self.sums[name], tensor, weight, self._scratch)
        self.total_weight += weight
        self.count += 1
        self.num_examples += update.num_examples
        self.loss_sum += update.train_loss * update.num_examples

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        """Tensors and scalars to checkpoint a round in progress."""
        scalars = {"total_weight": self.total_weight, "count": self.count, "num_examples": self.num_examples,
                   "loss_sum": self.loss_sum}
        return dict(self.sums), scalars

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        for name in self.sums:
            self.sums[name][...] = tensors[name]
        self.total_weight = float(scalars["total_weight"])
        self.count = int(scalars["count"])
        self.num_examples = int(scalars["num_examples"])
        self.loss_sum = float(scalars["loss_sum"])

    @property
    def train_loss(self) -> float | None:
        """Mean training loss over the examples of the accepted updates."""
        return self.loss_sum / self.num_examples if self.num_examples else None

    def apply_to(self, global_params: Params, scale: float = 1.0) -> Params:
        """``global + scale * mean``, rounded once to the parameters' dtypes (new arrays)."""
        return fold(global_params, self.sums, scale / self.total_weight if self.total_weight else 0.0)

    def mean(self) -> Params:
        """The weighted mean delta in the parameters' dtypes (new arrays); zeros when empty."""
        if self.total_weight == 0:
            return {name: np.zeros(value.shape, dtype=self.dtypes[name]) for name, value in self.sums.items()}
        inverse = 1.0 / self.total_weight
        return {name: (value * inverse).astype(self.dtypes[name]) for name, value in self.sums.items()}


class StrategyBase:
    """What every strategy has, synchronous (:class:`Strategy`) or asynchronous
    (:class:`AsyncStrategy`): a name, the settings its tasks carry, the payload of the published
    model, and its own state for checkpoints."""

    name: ClassVar[str] = ""
    asynchronous: ClassVar[bool] = False
    """Informational: ``True`` for an :class:`AsyncStrategy` (set by the two base classes)."""

    def device_config(self) -> Mapping[str, Scalar]:
        """Settings sent to every device in its task (e.g. ``{"encoding": "weights"}``)."""
        return {}

    def model_payload(self, params: Params) -> Mapping[str, Tensor]:
        """What to publish as the global model: by default all of it (dense)."""
        return params

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        """The strategy's own state (server optimiser moments, buffers...) as tensors and
        JSON-able scalars, for the aggregator's checkpoint. Default: stateless."""
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (default: nothing to restore)."""


class Strategy(StrategyBase, ABC, Generic[AccumulatorT]):
    """A synchronous strategy (``job.mode = "sync"``): rounds. Subclasses take their options as keyword arguments.

    Generic over the accumulator its ``new_accumulator`` makes and its ``aggregate`` consumes:
    ``class FedAvg(Strategy[WeightedMean])``. A strategy with an accumulator of its own type
    overrides ``new_accumulator`` (the default makes a :class:`WeightedMean`).
    """

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        """Select ``max(floor(C * K), 1)`` of the ``K`` available devices, uniformly at random.

        Every selected device trains with the job's epochs, batch size and learning rate.
        """
        if not devices:
            return []
        ordered = sorted(devices, key=lambda device: device.device_id)
        # m = max(C * K, 1), as in McMahan et al.; the epsilon absorbs 0.7 * 10 = 6.999...
        count = min(len(ordered), max(1, int(context.fraction * len(ordered) + 1e-9)))
        chosen = context.rng.choice(len(ordered), size=count, replace=False)
        return [
            Assignment(ordered[i].device_id, context.epochs, context.batch_size, context.learning_rate)
            for i in sorted(chosen)
        ]

    def new_accumulator(self, server_round: int, global_params: Params) -> AccumulatorT:
        """Where the round's updates go as they arrive. Default: :class:`WeightedMean` by n_k."""
        return cast(AccumulatorT, WeightedMean(global_params))

    @abstractmethod
    def aggregate(
        self, server_round: int, global_params: Params, accumulator: AccumulatorT, failures: Sequence[Failure]
    ) -> Params | None:
        """The next global parameters, or ``None`` to keep ``global_params`` unchanged."""

    def evaluate(
        self, server_round: int, params: Params, central: Callable[[Params], Mapping[str, float]]
    ) -> Mapping[str, float]:
        """Metrics of the new global model; default: the engine's central evaluation."""
        return central(params)


class AsyncStrategy(StrategyBase, ABC):
    """An asynchronous strategy (``job.mode = "ssp"``): no rounds. Every accepted update goes to
    :meth:`on_update` at once, and the engine asks :meth:`global_params` whenever it publishes
    the model and :meth:`evaluation_params` when it evaluates it."""

    asynchronous: ClassVar[bool] = True

    @abstractmethod
    def start_async(self, params: Params, context: AsyncContext) -> None:
        """Begin asynchronous training from ``params``."""

    @abstractmethod
    def on_update(self, update: ClientUpdate, context: AsyncContext) -> bool:
        """Fold one accepted update in; return whether the global model changed (version + 1)."""

    @abstractmethod
    def global_params(self, context: AsyncContext) -> Params:
        """The current global model: arrays the engine may keep, so the strategy must not write into
        them afterwards (replace them, or return copies)."""

    def finish_async(self, context: AsyncContext) -> int:
        """The job is over: apply what the strategy still holds back (FedBuff's partial buffer), so
        that no accepted update is left out of the final model. Returns how many times the model
        changed (the engine adds it to the version); the default holds nothing back."""
        return 0

    def evaluation_params(self, context: AsyncContext) -> Params:
        """The model to evaluate now; unlike :meth:`global_params`, reading it must not change the
        strategy's state. The default is :meth:`global_params`, right for strategies whose state is
        the model itself; override it when ``global_params`` commits something (a fold)."""
        return self.global_params(context)
