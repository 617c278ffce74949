"""Distributed Selective SGD (Shokri & Shmatikov, "Privacy-Preserving Deep Learning", CCS 2015).

Each participant, per exchange: downloads the ``theta_d`` fraction of the global parameters
that the server has updated most often and overwrites its local copy with them; trains one local
epoch; uploads at most ``theta_u`` of its parameter delta (the largest-magnitude entries, or
random entries with ``|delta| > tau``), clipped to ``[-gamma, gamma]``, as sparse tensors. The
server adds the uploaded deltas to the global model (no averaging) and counts, per parameter,
the uploads that changed it. ``docs/dssgd.md`` has the design, the privacy accounting and the
experiment.

* :class:`DSSGD`: synchronous, one participant per round, round-robin or random order;
* :class:`DSSGDAsync`: the same on the SSP engine (``job.mode = "ssp"``; the paper's
  asynchronous order is ``s = inf``): every update is added as it arrives;
* :class:`DSSGDClient`: the device half (``_dssgd_client.py``), registered as ``"dssgd"`` on import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from unus_edge.codec import SparseTensor, Tensor
from unus_edge.errors import StrategyError
from unus_edge.strategies._base import (
    Assignment,
    AsyncContext,
    AsyncStrategy,
    ClientUpdate,
    DeviceInfo,
    Failure,
    Params,
    RoundContext,
    Scalar,
    Strategy,
    StrategyBase,
    WeightedMean,
    fold,
)
from unus_edge.strategies._dssgd_client import (
    DSSGDClient,
    UploadSettings,
    keep_count,
    number_option,
    select_upload,
)

__all__ = ["DSSGD", "DSSGDAsync", "DSSGDClient", "DeltaSum", "UploadSettings", "select_upload"]

ORDERS = ("round-robin", "random")
_TIE_BREAK_SEED = 0xD55D
"""Seed of the permutations that break ties between equal update counts (see model_payload)."""


def _count(counts: np.ndarray[Any, Any], tensor: Tensor) -> None:
    """``counts += 1`` where ``tensor`` is non-zero (an uploaded entry changed the parameter)."""
    flat = counts.reshape(-1)
    if isinstance(tensor, SparseTensor):
        flat[tensor.indices[tensor.values != 0]] += 1
    else:
        flat += np.asarray(tensor).reshape(-1) != 0


class DeltaSum(WeightedMean):
    """The synchronous accumulator: ``sum_k delta_k`` (a :class:`WeightedMean` with weight 1 whose
    sums are used as they are: the server *adds* uploads, it does not average them) and, per
    parameter, how many updates changed it."""

    def __init__(self, template: Mapping[str, np.ndarray[Any, Any]]) -> None:
        super().__init__(template, weight=lambda update: 1.0)
        self.touched = {name: np.zeros(value.shape, np.int64) for name, value in template.items()}

    def add(self, update: ClientUpdate) -> None:
        super().add(update)
        for name, tensor in update.delta.items():
            _count(self.touched[name], tensor)

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        tensors = {f"sum/{n}": v for n, v in self.sums.items()} | {f"touched/{n}": v for n, v in self.touched.items()}
        return tensors, {"count": self.count, "num_examples": self.num_examples, "loss_sum": self.loss_sum}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        super().load_state_dict({name: tensors[f"sum/{name}"] for name in self.sums},
                                {**scalars, "total_weight": float(scalars["count"])})
        for name in self.touched:
            self.touched[name][...] = tensors[f"touched/{name}"]


class _SelectiveModel(StrategyBase):
    """What both DSSGD orders share: the upload settings, the per-parameter counters, and the
    ``theta_d`` download of the most-updated parameters."""

    def __init__(self, theta_d: float, theta_u: float, selection: str, tau: float, gamma: float | str,
                 epsilon: float) -> None:
        self.theta_d = number_option(theta_d, "theta_d", self.name)
        # Sparse entries cost 8 bytes against 4; devices accept model messages up to twice the
        # dense model, so any fraction fits.
        if not 0 < self.theta_d <= 1:
            raise StrategyError(f"theta_d must lie in (0, 1], got {self.theta_d}", strategy=self.name)
        self.settings = UploadSettings.parse({"theta_u": theta_u, "selection": selection, "tau": tau, "gamma": gamma,
                                            "epsilon": epsilon}, self.name)
        self.counts: dict[str, np.ndarray[Any, Any]] = {}
        """Per parameter: how many accepted uploads changed it (the paper's stat)."""

    # ---------------------------------------------------------------- counters and downloads

    def _ensure_counts(self, params: Mapping[str, np.ndarray[Any, Any]]) -> None:
        if set(self.counts) != set(params):
            self.counts = {name: np.zeros(value.shape, np.int64) for name, value in params.items()}

    def model_payload(self, params: Params) -> Mapping[str, Tensor]:
        """The ``theta_d`` fraction of the global model with the highest update counts, sparse.

        Ranked over the whole model. Only parameters that some upload changed are eligible: the
        others still hold the initial weights every device has, and downloading them would only
        reset a participant's own progress. Ties between equal counts are broken by a
        pseudo-random permutation of the positions seeded by the sum of all counts: no tensor or
        position is favoured, a tie is resolved differently after each update (with
        ``theta_u = 1`` every count ties, and a fixed order would download the same entries
        forever), and the payload is a function of the counts alone (no state to checkpoint).
        ``theta_d = 1`` publishes the whole model, dense.
        """
        if self.theta_d >= 1:
            return params
        self._ensure_counts(params)
        names = sorted(params)
        counts = np.concatenate([self.counts[name].reshape(-1) for name in names])
        total = counts.shape[0]
        eligible = np.flatnonzero(counts > 0)
        keep = keep_count(self.theta_d, total)
        if eligible.shape[0] > keep:
            tie_break = np.random.default_rng([_TIE_BREAK_SEED, int(counts.sum())]).permutation(total)
            keys = counts[eligible] * total + tie_break[eligible]
            eligible = eligible[np.argpartition(keys, -keep)[-keep:]]
        chosen = np.sort(eligible)
        payload: dict[str, Tensor] = {}
        offset = 0
        for name in names:
            size = params[name].size
            low, high = np.searchsorted(chosen, [offset, offset + size])
            payload[name] = SparseTensor.from_dense(params[name], chosen[low:high] - offset)
            offset += size
        return {name: payload[name] for name in params}

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        return {f"counts/{name}": value for name, value in self.counts.items()}, {}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        self.counts = {name[len("counts/"):]: np.array(value, np.int64) for name, value in tensors.items()
                       if name.startswith("counts/")}



class DSSGD(_SelectiveModel, Strategy[DeltaSum]):
    """Distributed Selective SGD, one participant per round (the paper's round-robin or random order).

    Options: ``theta_d`` (download fraction; 1: the whole model, dense), ``theta_u``,
    ``selection`` (``largest`` | ``random``), ``tau`` (threshold of ``random``), ``gamma``
    (clipping bound; inf: none), ``epsilon`` (per-upload privacy budget; 0: no noise) and
    ``order`` (``round-robin`` over the online devices sorted by id, or ``random`` with the
    job's seeded RNG). Local epochs, batch size and learning rate are the job's ``train.*``
    (the paper trains one epoch per exchange: ``train.epochs = 1``, the default).
    """

    name: ClassVar[str] = "dssgd"

    def __init__(self, theta_d: float = 1.0, theta_u: float = 0.1, selection: str = "largest", tau: float = 0.0,
                 gamma: float | str = math.inf, epsilon: float = 0.0, order: str = "round-robin") -> None:
        super().__init__(theta_d, theta_u, selection, tau, gamma, epsilon)
        if order not in ORDERS:
            raise StrategyError(f"order must be one of {', '.join(ORDERS)} (asynchronous: DSSGDAsync with "
                                f"job.mode = 'ssp'), got {order!r}", strategy=self.name)
        self.order = order

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        """One participant per round: round ``r`` takes device ``(r - 1) mod K`` of the K online
        devices sorted by id (stateless, so it survives a restart), or a seeded random one."""
        if not devices:
            return []
        ordered = sorted(devices, key=lambda device: device.device_id)
        if self.order == "round-robin":
            index = (context.server_round - 1) % len(ordered)
        else:
            index = int(context.rng.integers(len(ordered)))
        return [Assignment(ordered[index].device_id, context.epochs, context.batch_size, context.learning_rate,
                           self.settings.task_config())]

    def new_accumulator(self, server_round: int, global_params: Params) -> DeltaSum:
        self._ensure_counts(global_params)
        return DeltaSum(global_params)

    def aggregate(self, server_round: int, global_params: Params, accumulator: DeltaSum,
                  failures: Sequence[Failure]) -> Params | None:
        """``global + sum of the uploaded deltas``; the counters take the round's changes."""
        if not isinstance(accumulator, DeltaSum):  # a wrapper that hands over something else
            raise StrategyError(f"expected a DeltaSum accumulator, got {type(accumulator).__name__}",
                                strategy=self.name)
        if accumulator.count == 0:
            return None
        self._ensure_counts(global_params)
        for name, touched in accumulator.touched.items():
            self.counts[name] += touched
        return fold(global_params, accumulator.sums, 1.0)


class DSSGDAsync(_SelectiveModel, AsyncStrategy):
    """Distributed Selective SGD in the paper's asynchronous order, on the SSP engine.

    Run it with ``job.mode = "ssp"`` and ``job.staleness_bound = "inf"`` (a finite bound works
    too and makes the exchange partly synchronous). Every update is added to the global model
    as it arrives, whatever its staleness, exactly as the paper's server does.
    """

    name: ClassVar[str] = "dssgd-async"

    def __init__(self, theta_d: float = 1.0, theta_u: float = 0.1, selection: str = "largest", tau: float = 0.0,
                 gamma: float | str = math.inf, epsilon: float = 0.0) -> None:
        super().__init__(theta_d, theta_u, selection, tau, gamma, epsilon)
        self._params: Params = {}

    def device_config(self) -> Mapping[str, Scalar]:
        return self.settings.task_config()

    def start_async(self, params: Params, context: AsyncContext) -> None:
        self._params = {name: value.copy() for name, value in params.items()}
        self.counts = {name: np.zeros(value.shape, np.int64) for name, value in params.items()}

    def on_update(self, update: ClientUpdate, context: AsyncContext) -> bool:
        for name, tensor in update.delta.items():
            value = self._params[name]
            if isinstance(tensor, SparseTensor):
                flat = value.reshape(-1)
                flat[tensor.indices] = (flat[tensor.indices].astype(np.float64) + tensor.values).astype(value.dtype)
            else:
                self._params[name] = (value.astype(np.float64) + np.asarray(tensor)).astype(value.dtype)
            _count(self.counts[name], tensor)
        return True

    def global_params(self, context: AsyncContext) -> Params:
        return {name: value.copy() for name, value in self._params.items()}

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        tensors, scalars = super().state_dict()
        return tensors | {f"params/{name}": value for name, value in self._params.items()}, scalars

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        super().load_state_dict(tensors, scalars)
        self._params = {name[len("params/"):]: np.array(value) for name, value in tensors.items()
                        if name.startswith("params/")}
