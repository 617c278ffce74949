"""Distributed Selective SGD, the device half: what a participant uploads, and :class:`DSSGDClient`.

Registered as the ``"dssgd"`` client strategy when this module is imported (``unus_edge.strategies``
imports it). The server half and the algorithm's description are in :mod:`unus_edge.strategies._dssgd`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unus_edge.codec import SparseTensor, Tensor
from unus_edge.errors import StrategyError
from unus_edge.strategies._base import Params, Scalar
from unus_edge.strategies._client import ClientStrategy, register_client_strategy

__all__ = ["SELECTIONS", "DSSGDClient", "UploadSettings", "keep_count", "number_option", "select_upload"]

SELECTIONS = ("largest", "random")


def number_option(value: Any, name: str, strategy: str) -> float:
    """A float option; ``"inf"`` is accepted because options given as text keep it as a word."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StrategyError(f"{name} must be a number, got {value!r}", strategy=strategy)
    return float(value)


def keep_count(fraction: float, total: int) -> int:
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
            theta_u=number_option(values.get("theta_u", cls.theta_u), "theta_u", strategy),
            selection=str(values.get("selection", cls.selection)),
            tau=number_option(values.get("tau", cls.tau), "tau", strategy),
            gamma=number_option(values.get("gamma", cls.gamma), "gamma", strategy),
            epsilon=number_option(values.get("epsilon", cls.epsilon), "epsilon", strategy),
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
    count = keep_count(settings.theta_u, flat.shape[0])
    if settings.epsilon > 0:
        clipped = np.clip(flat, -settings.gamma, settings.gamma)
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
        values = np.clip(flat[chosen], -settings.gamma, settings.gamma)  # only what goes out
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
        super().__init__(config)  # parses the settings (configure)
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
