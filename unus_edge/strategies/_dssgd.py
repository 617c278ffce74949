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
* :class:`DSSGDClient`: the device half, registered as ``"dssgd"`` when this module is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unus_edge.codec import SparseTensor, Tensor
from unus_edge.errors import StrategyError
from unus_edge.strategies._base import (
    Assignment,
    AsyncContext,
    ClientUpdate,
    DeviceInfo,
    Failure,
    Params,
    RoundContext,
    Scalar,
    Strategy,
    fold,
)
from unus_edge.strategies._client import ClientStrategy, register_client_strategy

__all__ = ["DSSGD", "DSSGDAsync", "DSSGDClient", "DeltaSum", "UploadSettings", "select_upload"]

SELECTIONS = ("largest", "random")
ORDERS = ("round-robin", "random")
_TIE_BREAK_SEED = 0xD55D
"""Seed of the permutations that break ties between equal update counts (see model_payload)."""


def _number(value: Any, name: str, strategy: str) -> float:
    """A float option; ``"inf"`` is accepted because options given as text keep it as a word."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StrategyError(f"{name} must be a number, got {value!r}", strategy=strategy)
    return float(value)


def _keep(fraction: float, total: int) -> int:
    """How many of ``total`` entries a fraction keeps: floor (at most the fraction), at least one."""
    return max(1, min(total, int(fraction * total + 1e-9)))


@dataclass(frozen=True)
class UploadSettings:
    """What a participant uploads; checked the same way on the server and on the device."""

    theta_u: float = 0.1
    selection: str = "largest"
    tau: float = 0.0
    gamma: float = math.inf
    epsilon: float = 0.0

    @classmethod
    def parse(cls, values: Mapping[str, Any], strategy: str = "dssgd") -> UploadSettings:
        settings = cls(
            theta_u=_number(values.get("theta_u", cls.theta_u), "theta_u", strategy),
            selection=str(values.get("selection", cls.selection)),
            tau=_number(values.get("tau", cls.tau), "tau", strategy),
            gamma=_number(values.get("gamma", cls.gamma), "gamma", strategy),
            epsilon=_number(values.get("epsilon", cls.epsilon), "epsilon", strategy),
        )
        if not 0 < settings.theta_u <= 1:
            raise StrategyError(f"theta_u must lie in (0, 1], got {settings.theta_u}", strategy=strategy)
        if settings.selection not in SELECTIONS:
            raise StrategyError(f"selection must be one of {', '.join(SELECTIONS)}, got {settings.selection!r}",
                                strategy=strategy)
        if not (math.isfinite(settings.tau) and settings.tau >= 0):
            raise StrategyError(f"tau must be a finite number >= 0, got {settings.tau}", strategy=strategy)
        if not settings.gamma > 0:
            raise StrategyError(f"gamma must be positive (inf: no clipping), got {settings.gamma}", strategy=strategy)
        if not (math.isfinite(settings.epsilon) and settings.epsilon >= 0):
            raise StrategyError(f"epsilon must be a finite number >= 0 (0: no noise), got {settings.epsilon}",
                                strategy=strategy)
        if settings.epsilon > 0 and (settings.selection != "random" or not math.isfinite(settings.gamma)):
            # The sparse vector technique tests entries in a data-independent (random) order, and
            # its sensitivity 2 * gamma needs a finite clipping bound; a top-k by magnitude is not
            # differentially private.
            raise StrategyError("epsilon > 0 needs selection = 'random' and a finite gamma", strategy=strategy)
        return settings

    def task_config(self) -> dict[str, Scalar]:
        """The device-side settings of a task (an infinite gamma is left out: no clipping)."""
        config: dict[str, Scalar] = {"client": DSSGDClient.name, "theta_u": self.theta_u,
                                     "selection": self.selection, "tau": self.tau, "epsilon": self.epsilon}
        if math.isfinite(self.gamma):
            config["gamma"] = self.gamma
        return config


def _svt_select(magnitudes: np.ndarray[Any, Any], count: int, settings: UploadSettings,
                rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """At most ``count`` flat indices by the sparse vector technique (Lyu, Su & Li, VLDB 2017, Alg. 1).

    Queries ``q_j = |clip(delta_j)|`` are tested in a uniformly random order against the noisy
    threshold ``tau + rho``, ``rho ~ Lap(2 gamma / e1)``, each with fresh noise
    ``nu_j ~ Lap(2 c 2 gamma / e2)``; the first ``c`` above it are selected. This is
    (e1 + e2)-differentially private for queries of sensitivity 2 gamma (monotonic or not).
    """
    sensitivity = 2.0 * settings.gamma
    e1, e2 = settings.epsilon * 2 / 9, settings.epsilon * 6 / 9
    order = rng.permutation(magnitudes.shape[0])
    rho = rng.laplace(0.0, sensitivity / e1)
    noisy = magnitudes[order] + rng.laplace(0.0, 2 * count * sensitivity / e2, size=order.shape[0])
    return order[np.flatnonzero(noisy >= settings.tau + rho)[:count]]


def select_upload(delta: Mapping[str, np.ndarray[Any, Any]], settings: UploadSettings,
                  rng: np.random.Generator) -> dict[str, Tensor]:
    """What a participant uploads of ``delta``: at most ``theta_u`` of all its entries, clipped.

    The fraction is of the whole model (the paper's flat parameter vector), not of each tensor.
    ``largest``: the entries of largest ``|delta|`` (never exact zeros); ``random``: a uniform
    sample of the entries with ``|delta| > tau``. With ``epsilon > 0`` the sparse vector technique
    selects instead (:func:`_svt_select`) and the released values get Laplace noise of scale
    ``c * 2 gamma / e3`` with ``e3 = epsilon / 9``, then are clipped again.

    A tensor goes out sparse when that is smaller than dense (int32 index + float32 value = 8
    bytes an entry against 4 a dense element: below half full), else dense with zeros elsewhere;
    both mean the same to the server, and the size never exceeds the dense model's.
    """
    names = list(delta)
    flat = np.concatenate([np.asarray(delta[name], dtype=np.float32).reshape(-1) for name in names])
    count = _keep(settings.theta_u, flat.shape[0])
    clipped = np.clip(flat, -settings.gamma, settings.gamma)
    if settings.epsilon > 0:
        chosen = _svt_select(np.abs(clipped), count, settings, rng)
        scale = count * 2.0 * settings.gamma / (settings.epsilon / 9)
        noisy = clipped[chosen].astype(np.float64) + rng.laplace(0.0, scale, size=chosen.shape[0])
        values = np.clip(noisy, -settings.gamma, settings.gamma).astype(np.float32)
    else:
        magnitudes = np.abs(flat)
        if settings.selection == "largest":
            candidates = np.flatnonzero(magnitudes > 0)
            if candidates.shape[0] > count:
                candidates = candidates[np.argpartition(magnitudes[candidates], -count)[-count:]]
        else:
            candidates = np.flatnonzero(magnitudes > settings.tau)
            if candidates.shape[0] > count:
                candidates = rng.choice(candidates, size=count, replace=False)
        chosen = candidates
        values = clipped[chosen]
    order = np.argsort(chosen, kind="stable")
    chosen, values = chosen[order], values[order]
    result: dict[str, Tensor] = {}
    offset = 0
    for name in names:
        template = np.asarray(delta[name])
        low, high = np.searchsorted(chosen, [offset, offset + template.size])
        indices, part = chosen[low:high] - offset, values[low:high]
        index_dtype = np.int32 if template.size <= np.iinfo(np.int32).max else np.int64
        if indices.shape[0] * (np.dtype(index_dtype).itemsize + part.itemsize) < template.size * part.itemsize:
            result[name] = SparseTensor(template.shape, indices.astype(index_dtype), part.astype(template.dtype))
        else:
            dense = np.zeros(template.size, dtype=template.dtype)
            dense[indices] = part
            result[name] = dense.reshape(template.shape)
        offset += template.size
    return result


def _count(counts: np.ndarray[Any, Any], tensor: Tensor) -> None:
    """``counts += 1`` where ``tensor`` is non-zero (an uploaded entry changed the parameter)."""
    flat = counts.reshape(-1)
    if isinstance(tensor, SparseTensor):
        flat[tensor.indices[tensor.values != 0]] += 1
    else:
        flat += np.asarray(tensor).reshape(-1) != 0


class DeltaSum:
    """The synchronous accumulator: ``sum_k delta_k`` (float64; the server *adds* uploads, it does
    not average them) and, per parameter, how many updates changed it."""

    def __init__(self, template: Mapping[str, np.ndarray[Any, Any]]) -> None:
        self.sums = {name: np.zeros(value.shape, np.float64) for name, value in template.items()}
        self.touched = {name: np.zeros(value.shape, np.int64) for name, value in template.items()}
        self.count = 0
        self.num_examples = 0
        self.loss_sum = 0.0

    def add(self, update: ClientUpdate) -> None:
        for name, tensor in update.delta.items():
            if isinstance(tensor, SparseTensor):
                self.sums[name].reshape(-1)[tensor.indices] += tensor.values.astype(np.float64)
            else:
                self.sums[name] += np.asarray(tensor, dtype=np.float64)
            _count(self.touched[name], tensor)
        self.count += 1
        self.num_examples += update.num_examples
        self.loss_sum += update.train_loss * update.num_examples

    @property
    def train_loss(self) -> float | None:
        return self.loss_sum / self.num_examples if self.num_examples else None

    def state_dict(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]]:
        tensors = {f"sum/{n}": v for n, v in self.sums.items()} | {f"touched/{n}": v for n, v in self.touched.items()}
        return tensors, {"count": self.count, "num_examples": self.num_examples, "loss_sum": self.loss_sum}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray[Any, Any]], scalars: Mapping[str, Any]) -> None:
        for name in self.sums:
            self.sums[name][...] = tensors[f"sum/{name}"]
            self.touched[name][...] = tensors[f"touched/{name}"]
        self.count = int(scalars["count"])
        self.num_examples = int(scalars["num_examples"])
        self.loss_sum = float(scalars["loss_sum"])


class DSSGD(Strategy):
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
        self.theta_d = _number(theta_d, "theta_d", self.name)
        # Sparse entries cost 8 bytes against 4; devices accept model messages up to twice the
        # dense model, so any fraction fits.
        if not 0 < self.theta_d <= 1:
            raise StrategyError(f"theta_d must lie in (0, 1], got {self.theta_d}", strategy=self.name)
        if order not in ORDERS:
            raise StrategyError(f"order must be one of {', '.join(ORDERS)} (asynchronous: DSSGDAsync with "
                                f"job.mode = 'ssp'), got {order!r}", strategy=self.name)
        self.order = order
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
        keep = _keep(self.theta_d, total)
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

    # ---------------------------------------------------------------- synchronous rounds

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

    def aggregate(self, server_round: int, global_params: Params, accumulator: Any,
                  failures: Sequence[Failure]) -> Params | None:
        """``global + sum of the uploaded deltas``; the counters take the round's changes."""
        if not isinstance(accumulator, DeltaSum):
            raise StrategyError(f"expected a DeltaSum accumulator, got {type(accumulator).__name__}",
                                strategy=self.name)
        if accumulator.count == 0:
            return None
        self._ensure_counts(global_params)
        for name, touched in accumulator.touched.items():
            self.counts[name] += touched
        return fold(global_params, accumulator.sums, 1.0)


class DSSGDAsync(DSSGD):
    """Distributed Selective SGD in the paper's asynchronous order, on the SSP engine.

    Run it with ``job.mode = "ssp"`` and ``job.staleness_bound = "inf"`` (a finite bound works
    too and makes the exchange partly synchronous). Every update is added to the global model
    as it arrives, whatever its staleness, exactly as the paper's server does.
    """

    name: ClassVar[str] = "dssgd-async"
    asynchronous: ClassVar[bool] = True

    def __init__(self, theta_d: float = 1.0, theta_u: float = 0.1, selection: str = "largest", tau: float = 0.0,
                 gamma: float | str = math.inf, epsilon: float = 0.0) -> None:
        super().__init__(theta_d, theta_u, selection, tau, gamma, epsilon)
        self._params: Params = {}

    def aggregate(self, server_round: int, global_params: Params, accumulator: Any,
                  failures: Sequence[Failure]) -> Params | None:
        raise StrategyError("an asynchronous strategy runs with job.mode = 'ssp'", strategy=self.name)

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


class DSSGDClient(ClientStrategy):
    """The participant: a local model kept between exchanges, selective download and upload.

    ``starting_point`` overwrites the local copy with the downloaded entries (the sparse indices
    of the last model message, or everything when it was dense); the first exchange starts from
    the device's view of the global model. ``upload`` keeps the trained parameters as the new
    local copy and returns :func:`select_upload` of the delta. With ``epsilon > 0`` the noise
    comes from the operating system's entropy (:attr:`noise`), never from the task's seed: the
    server knows that seed and could otherwise subtract the noise.
    """

    name: ClassVar[str] = "dssgd"

    def __init__(self, config: Mapping[str, Scalar]) -> None:
        super().__init__(config)
        self.settings = UploadSettings.parse(config, self.name)
        self.local: Params | None = None
        self.noise = np.random.default_rng()
        """The generator of the privacy noise (fresh OS entropy; tests may replace it)."""

    def configure(self, config: Mapping[str, Scalar]) -> None:
        super().configure(config)
        self.settings = UploadSettings.parse(config, self.name)

    def starting_point(self, global_params: Params, download: Mapping[str, Tensor]) -> Params:
        local = self.local
        if local is None or any(name not in local or local[name].shape != value.shape
                                for name, value in global_params.items()):
            local = {name: np.array(value, dtype=value.dtype) for name, value in global_params.items()}
        for name, tensor in download.items():
            if isinstance(tensor, SparseTensor):
                local[name].reshape(-1)[tensor.indices] = tensor.values
            else:
                local[name][...] = tensor
        self.local = local
        return {name: value.copy() for name, value in local.items()}

    def upload(self, start: Params, trained: Params, rng: np.random.Generator) -> Mapping[str, Tensor]:
        self.local = {name: np.array(value, dtype=start[name].dtype) for name, value in trained.items()}
        delta = {name: trained[name] - start[name] for name in start}
        return select_upload(delta, self.settings, self.noise if self.settings.epsilon > 0 else rng)


register_client_strategy(DSSGDClient)
