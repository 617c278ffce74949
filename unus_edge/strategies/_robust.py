"""Robust aggregation: coordinate-wise median, trimmed mean, update-norm clipping.

Three server-side options that limit what a few bad updates (faulty or malicious devices) can
do to the global model, each an :class:`~unus_edge.strategies.Accumulator`:

* :class:`CoordinateMedian` (Yin et al., ICML 2018): per coordinate, the median of the
  devices' values;
* :class:`TrimmedMean` (ibid.): per coordinate, drop the ``floor(beta * m)`` largest and
  ``floor(beta * m)`` smallest of the ``m`` values and average the rest;
* :class:`NormClipping` (Sun et al. 2019, "Can you really backdoor federated learning?"):
  scale every update whose L2 norm exceeds ``clip_norm`` down to ``clip_norm``, then pass it to
  another accumulator (the n_k-weighted mean, or one of the two above).

**They compose with any averaging strategy** through :class:`Robust`, a wrapper that holds a
strategy whose ``aggregate`` consumes a :class:`~unus_edge.strategies.WeightedMean` (FedAvg,
FedProx, server optimisers such as FedAdam or FedAvgM), as Flower's DP wrapper holds one. It
swaps the round's accumulator for the robust one, and hands the inner ``aggregate`` a
``WeightedMean`` whose mean *is* the robust aggregate (:func:`robust_view`). The inner strategy
then does whatever it does with a mean delta (a server learning rate, momentum, Adam) without
knowing. Built-in combinations: :class:`RobustFedAvg` and :class:`RobustFedProx`; yours is one
expression, ``Robust(FedAdam(server_learning_rate=0.01), robust="median")``, or, to load it by
name with options from a job's configuration, three lines::

    class RobustFedAdam(Robust):
        def __init__(self, robust: str = "median", server_learning_rate: float = 0.01) -> None:
            super().__init__(FedAdam(server_learning_rate=server_learning_rate), robust)

Decisions:

* **Memory.** The median and the trimmed mean need every value of a coordinate before they can
  say anything, so they keep every update of the round: O(devices x model) memory (4 bytes per
  parameter per device for float32 models; 20 devices x the 2NN's 199,210 parameters = 16 MB),
  and mid-round checkpoints hold them all too. The result is computed in column chunks with a
  float64 scratch of at most 4 MB. Clipping streams: it needs one update at a time, O(model),
  and with the weighted mean stays O(model) altogether.
* **Unweighted.** The median and the trimmed mean give every device one vote, whatever its
  ``num_examples``: n_k is self-reported, and weighting by it would let one device that claims
  a huge dataset outvote everybody. Clipping keeps FedAvg's n_k weights (it bounds the *size*
  of an update, not its weight): combine it with the median or the trimmed mean if n_k cannot
  be trusted.
* **Non-finite input.** The engine already refuses NaN and infinite updates (``check_tensors``,
  reason ``not_finite``) before any accumulator sees them. These accumulators do not rely on
  that: an update with a non-finite value (or a non-finite norm) is ignored, not folded in, and
  listed in ``ignored`` as ``(device_id, reason)``; a round whose updates were all ignored
  keeps the model unchanged. Ignoring rather than raising: a strategy must not take the
  aggregator down because of one device.
* **Determinism and ties.** Values are sorted per coordinate before they are combined, so the
  result does not depend on the order updates arrive in, bit for bit, and equal values (ties)
  are interchangeable: which of two equal values is dropped cannot change the result. The median
  of an even number ``m`` of values is the midpoint of the two middle ones (sorted positions
  ``m/2 - 1`` and ``m/2``), computed in float64. The trimmed mean drops ``k = floor(beta * m)``
  values at each end (``beta < 0.5``, so at least one value remains; ``k = 0``, no trimming,
  when ``beta * m < 1``) and sums the rest in sorted order in float64.
* **Sparse updates** (a :class:`~unus_edge.codec.SparseTensor` delta, or a tensor absent from
  an update) count as zeros where they carry nothing, as they do in the weighted mean.
* **Synchronous rounds only.** There is no round to take a median over in SSP or asynchronous
  training, where every update is applied as it arrives; these strategies keep
  ``asynchronous = False``, so ``job.mode = "ssp"`` refuses them at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from unus_edge.codec import SparseTensor, Tensor
from unus_edge.errors import StrategyError
from unus_edge.strategies._base import (
    Accumulator,
    Assignment,
    ClientUpdate,
    DeviceInfo,
    Failure,
    Params,
    RoundContext,
    SavableAccumulator,
    Scalar,
    Strategy,
    WeightedMean,
    fold,
)
from unus_edge.strategies._fedavg import FedAvg
from unus_edge.strategies._fedprox import FedProx

__all__ = [
    "ROBUST_RULES",
    "CoordinateMedian",
    "NormClipping",
    "Robust",
    "RobustFedAvg",
    "RobustFedProx",
    "TrimmedMean",
    "robust_view",
    "update_norm",
]

ROBUST_RULES = ("none", "median", "trimmed_mean")
"""Values of the ``robust`` option: the n_k-weighted mean (FedAvg's), or one of the two rules."""

_SCRATCH_BYTES = 1 << 22
"""Bytes of the float64 block sorted at a time by the median and the trimmed mean (4 MB)."""


def _number(value: object, option: str, strategy: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StrategyError(f"{option} must be a finite number, got {value!r}", strategy=strategy)
    return float(value)


def _values(tensor: Tensor) -> np.ndarray[Any, Any]:
    return tensor.values if isinstance(tensor, SparseTensor) else np.asarray(tensor)


def update_norm(delta: Mapping[str, Tensor]) -> float:
    """The L2 norm of a whole update (all its tensors), in float64: NaN or inf when it has such values."""
    squared = 0.0
    for tensor in delta.values():
        flat = _values(tensor).reshape(-1).astype(np.float64)
        squared += float(np.dot(flat, flat))
    return math.sqrt(squared)  # NaN stays NaN, inf stays inf


def _all_finite(delta: Mapping[str, Tensor]) -> bool:
    return all(bool(np.isfinite(_values(tensor)).all()) for tensor in delta.values())


class _EveryUpdate:
    """Base of the accumulators that keep every update of the round and combine them per coordinate."""

    def __init__(self, template: Mapping[str, np.ndarray[Any, Any]]) -> None:
        self.shapes = {name: value.shape for name, value in template.items()}
        self.dtypes = {name: value.dtype for name, value in template.items()}
        self.rows: dict[str, list[np.ndarray[Any, Any]]] = {name: [] for name in template}
        """Per tensor, one flat dense copy per accepted update (in the parameter's dtype)."""
        self.device_ids: list[str] = []
        self.ignored: list[tuple[str, str]] = []
        """Updates left out: ``(device_id, reason)``, reason ``not_finite``."""
        self.count = 0
        self.num_examples = 0
        self.loss_sum = 0.0

    def add(self, update: ClientUpdate) -> None:
        if not _all_finite(update.delta):
            self.ignored.append((update.device_id, "not_finite"))
            return
        for name, rows in self.rows.items():
            tensor = update.delta.get(name)
            size = math.prod(self.shapes[name])
            if tensor is None:
                row = np.zeros(size, dtype=self.dtypes[name])
            elif isinstance(tensor, SparseTensor):
                row = tensor.to_dense().reshape(-1).astype(self.dtypes[name], copy=False)
            else:  # a copy: the update's arrays are views of a received payload
                row = np.array(tensor, dtype=self.dtypes[name]).reshape(-1)
            if row.shape[0] != size:
                raise StrategyError(f"update of {update.device_id}: {name} has {row.shape[0]} values, "
                                    f"the model {size}", strategy=type(self).__name__)
            rows.append(row)
        self.device_ids.append(update.device_id)
        self.count += 1
        self.num_examples += update.num_examples
        self.loss_sum += update.train_loss * update.num_examples

    @property
    def train_loss(self) -> float | None:
        """Mean training loss over the examples of the updates taken (a metric only)."""
        return self.loss_sum / self.num_examples if self.num_examples else None

    def _combine(self, ordered: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """One value per row of ``ordered`` (float64, each row sorted ascending, one column per update)."""
        raise NotImplementedError

    def aggregate_delta(self) -> dict[str, np.ndarray[Any, Any]]:
        """The robust aggregate of the deltas, float64, shaped like the parameters (zeros when empty)."""
        result: dict[str, np.ndarray[Any, Any]] = {}
        for name, rows in self.rows.items():
            size = math.prod(self.shapes[name])
            out = np.zeros(size, dtype=np.float64)
            if rows:
                step = max(1, _SCRATCH_BYTES // (8 * len(rows)))
                for start in range(0, size, step):
                    stop = min(start + step, size)
                    block = np.stack([row[start:stop] for row in rows], axis=1).astype(np.float64)
                    block.sort(axis=1)
                    out[start:stop] = self._combine(block)
            result[name] = out.reshape(self.shapes[name])
        return result

    def mean(self) -> Params:
        """The robust aggregate in the parameters' dtypes (the name matches ``WeightedMean.mean``)."""
        return {name: value.astype(self.dtypes[name]) for name, value in self.aggregate_delta().items()}

    def apply_to(self, global_params: Params, scale: float = 1.0) -> Params:
        """``global + scale * aggregate``, rounded once to the parameters' dtypes."""
        return fold(global_params, self.aggregate_delta(), scale)

    def as_weighted_mean(self) -> WeightedMean:
        """A :class:`WeightedMean` whose ``mean()`` is this aggregate (``sums`` = it, ``total_weight`` = 1).

        ``count``, ``num_examples`` and ``train_loss`` are this round's; with no update taken it is
        empty (``count`` 0, ``total_weight`` 0), so FedAvg keeps the model.
        """
        view = WeightedMean({name: np.empty(shape, dtype=self.dtypes[name]) for name, shape in self.shapes.items()})
        if self.count:
            view.sums = self.aggregate_delta()
            view.total_weight = 1.0
        view.count = self.count
        view.num_examples = self.num_examples
        view.loss_sum = self.loss_sum
        return view

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        """Every update taken so far (tensors ``<index>/<name>``) and the counters."""
        tensors = {f"{index}/{name}": rows[index] for name, rows in self.rows.items() for index in range(self.count)}
        scalars = {"count": self.count, "num_examples": self.num_examples, "loss_sum": self.loss_sum,
                   "device_ids": list(self.device_ids), "ignored": [list(item) for item in self.ignored]}
        return tensors, scalars

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        self.count = int(scalars["count"])
        self.rows = {name: [np.array(tensors[f"{index}/{name}"], dtype=self.dtypes[name]).reshape(-1)
                            for index in range(self.count)] for name in self.shapes}
        self.num_examples = int(scalars["num_examples"])
        self.loss_sum = float(scalars["loss_sum"])
        self.device_ids = [str(device) for device in scalars["device_ids"]]
        self.ignored = [(str(device), str(reason)) for device, reason in scalars["ignored"]]


class CoordinateMedian(_EveryUpdate):
    """Per coordinate, the median of the updates' values (unweighted; midpoint of the two middle values
    when their number is even). Keeps every update of the round: O(devices x model) memory."""

    def _combine(self, ordered: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        m = ordered.shape[1]
        result: np.ndarray[Any, Any] = 0.5 * (ordered[:, (m - 1) // 2] + ordered[:, m // 2])
        return result


class TrimmedMean(_EveryUpdate):
    """Per coordinate, the mean of the values left once the ``floor(fraction * m)`` largest and as many
    smallest are dropped (unweighted). ``fraction`` lies in [0, 0.5); 0 is the plain unweighted mean.
    Keeps every update of the round: O(devices x model) memory."""

    def __init__(self, template: Mapping[str, np.ndarray[Any, Any]], fraction: float = 0.1) -> None:
        super().__init__(template)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 0.5:
            raise StrategyError(f"the trimmed fraction must lie in [0, 0.5), got {fraction!r}",
                                strategy="trimmed_mean")
        self.fraction = float(fraction)

    def trimmed(self, m: int) -> int:
        """Values dropped at each end out of ``m``; the epsilon absorbs 0.29 * 100 = 28.999..."""
        return int(self.fraction * m + 1e-9)

    def _combine(self, ordered: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        m = ordered.shape[1]
        k = self.trimmed(m)
        result: np.ndarray[Any, Any] = ordered[:, k:m - k].sum(axis=1) / (m - 2 * k)
        return result


class NormClipping:
    """Scales an update down to L2 norm ``clip_norm`` when it is larger, then passes it to ``inner``.

    Streaming and O(model) (one scaled copy of a clipped update at a time). An update within
    the bound goes to ``inner`` untouched, so with a bound nobody reaches the result is
    exactly ``inner``'s. ``inner`` must be checkpointable (``state_dict``/``load_state_dict``),
    as :class:`WeightedMean`, :class:`CoordinateMedian` and :class:`TrimmedMean` are.
    """

    def __init__(self, inner: Accumulator, clip_norm: float) -> None:
        if not isinstance(inner, SavableAccumulator):
            raise StrategyError(f"cannot clip into {type(inner).__name__}: it needs add, state_dict and "
                                "load_state_dict", strategy="norm_clipping")
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise StrategyError(f"clip_norm must be a finite number > 0, got {clip_norm!r}", strategy="norm_clipping")
        self.inner = inner
        self.clip_norm = float(clip_norm)
        self.count = 0
        self.clipped: list[tuple[str, float]] = []
        """Updates scaled down: ``(device_id, norm before clipping)``."""
        self.ignored: list[tuple[str, str]] = []
        """Updates left out: ``(device_id, "not_finite")``."""

    def add(self, update: ClientUpdate) -> None:
        norm = update_norm(update.delta)
        if not math.isfinite(norm):
            self.ignored.append((update.device_id, "not_finite"))
            return
        if norm > self.clip_norm:
            scale = self.clip_norm / norm
            delta: dict[str, Tensor] = {}
            for name, tensor in update.delta.items():
                if isinstance(tensor, SparseTensor):
                    values = (tensor.values.astype(np.float64) * scale).astype(tensor.values.dtype)
                    delta[name] = SparseTensor(tensor.shape, tensor.indices, values)
                else:
                    delta[name] = (np.asarray(tensor).astype(np.float64) * scale).astype(tensor.dtype)
            self.clipped.append((update.device_id, norm))
            update = ClientUpdate(update.device_id, update.num_examples, delta, update.base_version,
                                  update.train_loss, update.staleness, update.metrics)
        self.inner.add(update)
        self.count = int(self.inner.count)

    @property
    def num_examples(self) -> int:
        return self.inner.num_examples

    @property
    def train_loss(self) -> float | None:
        return self.inner.train_loss

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        tensors, scalars = self.inner.state_dict()
        return dict(tensors), {"inner": scalars, "clipped": [list(item) for item in self.clipped],
                               "ignored": [list(item) for item in self.ignored]}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(tensors, scalars["inner"])
        self.count = int(self.inner.count)
        self.clipped = [(str(device), float(norm)) for device, norm in scalars["clipped"]]
        self.ignored = [(str(device), str(reason)) for device, reason in scalars["ignored"]]


def robust_view(accumulator: Accumulator) -> Accumulator:
    """What an averaging strategy's ``aggregate`` should see: a :class:`WeightedMean` for the robust
    accumulators (whose mean is the robust aggregate), the inner accumulator of a :class:`NormClipping`,
    anything else unchanged."""
    if isinstance(accumulator, NormClipping):
        return robust_view(accumulator.inner)
    if isinstance(accumulator, _EveryUpdate):
        return accumulator.as_weighted_mean()
    return accumulator


class Robust(Strategy[Accumulator]):
    """Robust aggregation around any strategy whose ``aggregate`` consumes a :class:`WeightedMean`.

    It holds that strategy, as Flower's differential-privacy wrapper holds one: selection,
    evaluation, the published payload, the device settings and the checkpointed state are the
    inner strategy's; the round's accumulator is the robust one, and the inner ``aggregate`` is
    handed a ``WeightedMean`` whose mean *is* the robust aggregate (:func:`robust_view`)::

        Robust(FedAdam(server_learning_rate=0.01), robust="median", clip_norm=10.0)

    * ``robust``: ``"none"`` (the inner strategy's own accumulator, FedAvg's n_k-weighted mean),
      ``"median"`` (:class:`CoordinateMedian`) or ``"trimmed_mean"`` (:class:`TrimmedMean`);
    * ``trim_fraction``: beta of the trimmed mean, in [0, 0.5); at least the fraction of bad
      devices you want to withstand;
    * ``clip_norm``: > 0 clips every update to this L2 norm first (:class:`NormClipping`), with
      any ``robust`` rule; 0 disables it.

    With ``robust="none"`` and no clipping it is the inner strategy, bit for bit.
    """

    name: ClassVar[str] = "robust"

    def __init__(self, strategy: Strategy[Any], robust: str = "none", trim_fraction: float = 0.1,
                 clip_norm: float = 0.0) -> None:
        if not isinstance(strategy, Strategy):  # e.g. an AsyncStrategy: no rounds to take a median over
            raise StrategyError(f"{getattr(strategy, 'name', '') or type(strategy).__name__} is not a synchronous "
                                "Strategy: robust aggregation needs rounds to take a median over", strategy=self.name)
        if robust not in ROBUST_RULES:
            raise StrategyError(f"robust must be one of {', '.join(ROBUST_RULES)}, got {robust!r}",
                                strategy=self.name)
        fraction = _number(trim_fraction, "trim_fraction", self.name)
        if not 0 <= fraction < 0.5:
            raise StrategyError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction!r}", strategy=self.name)
        bound = _number(clip_norm, "clip_norm", self.name)
        if bound < 0:
            raise StrategyError(f"clip_norm must be >= 0 (0: no clipping), got {clip_norm!r}", strategy=self.name)
        self.strategy = strategy
        self.robust, self.trim_fraction, self.clip_norm = robust, fraction, bound

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        return self.strategy.configure_round(context, devices)

    def new_accumulator(self, server_round: int, global_params: Params) -> Accumulator:
        inner: Accumulator
        if self.robust == "median":
            inner = CoordinateMedian(global_params)
        elif self.robust == "trimmed_mean":
            inner = TrimmedMean(global_params, self.trim_fraction)
        else:
            inner = self.strategy.new_accumulator(server_round, global_params)
        return NormClipping(inner, self.clip_norm) if self.clip_norm > 0 else inner

    def aggregate(
        self, server_round: int, global_params: Params, accumulator: Accumulator, failures: Sequence[Failure]
    ) -> Params | None:
        return self.strategy.aggregate(server_round, global_params, robust_view(accumulator), failures)

    def evaluate(
        self, server_round: int, params: Params, central: Callable[[Params], Mapping[str, float]]
    ) -> Mapping[str, float]:
        return self.strategy.evaluate(server_round, params, central)

    def model_payload(self, params: Params) -> Mapping[str, Tensor]:
        return self.strategy.model_payload(params)

    def device_config(self) -> Mapping[str, Scalar]:
        return self.strategy.device_config()

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        return self.strategy.state_dict()

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(tensors, scalars)


class RobustFedAvg(Robust):
    """FedAvg with the robust options: ``robust`` (``none``, ``median``, ``trimmed_mean``),
    ``trim_fraction`` (0.1), ``clip_norm`` (0: off), ``server_learning_rate`` (1.0).
    With the defaults it is FedAvg, bit for bit."""

    name: ClassVar[str] = "robust_fedavg"

    def __init__(self, robust: str = "none", trim_fraction: float = 0.1, clip_norm: float = 0.0,
                 server_learning_rate: float = 1.0) -> None:
        super().__init__(FedAvg(server_learning_rate=server_learning_rate), robust, trim_fraction, clip_norm)


class RobustFedProx(Robust):
    """FedProx with the robust options (see :class:`RobustFedAvg`) and ``mu`` (0.01)."""

    name: ClassVar[str] = "robust_fedprox"

    def __init__(self, mu: float = 0.01, robust: str = "none", trim_fraction: float = 0.1, clip_norm: float = 0.0,
                 server_learning_rate: float = 1.0) -> None:
        super().__init__(FedProx(mu=mu, server_learning_rate=server_learning_rate), robust, trim_fraction,
                         clip_norm)
