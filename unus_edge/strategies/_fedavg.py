"""FedAvg and FedSGD (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from unus_edge.errors import StrategyError
from unus_edge.strategies._base import Assignment, DeviceInfo, Failure, Params, RoundContext, Strategy, WeightedMean

__all__ = ["FULL_BATCH", "FedAvg", "FedSGD"]

FULL_BATCH = 2**31 - 1
"""A batch size that means "all local examples in one batch"."""


class FedAvg(Strategy[WeightedMean]):
    """Federated averaging: ``w <- w + eta * sum_k (n_k / n) * delta_k`` over the devices that answered.

    ``server_learning_rate`` (eta) is 1.0 in McMahan et al.: the new model is then exactly the
    n_k-weighted mean of the devices' models. Failed devices simply do not count; a round
    where nobody answered keeps the model unchanged.
    """

    name: ClassVar[str] = "fedavg"

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        if not server_learning_rate > 0:
            raise StrategyError("server_learning_rate must be positive", strategy=self.name)
        self.server_learning_rate = float(server_learning_rate)

    def aggregate(
        self, server_round: int, global_params: Params, accumulator: WeightedMean, failures: Sequence[Failure]
    ) -> Params | None:
        if not isinstance(accumulator, WeightedMean):  # a wrapper that hands over something else
            raise StrategyError(f"expected a WeightedMean accumulator, got {type(accumulator).__name__}",
                                strategy=self.name)
        if accumulator.count == 0:
            return None
        return accumulator.apply_to(global_params, self.server_learning_rate)


class FedSGD(FedAvg):
    """FedSGD: each selected device takes one gradient step on all its data (E = 1, B = infinity).

    With the n_k weighting this is ``w <- w - lr * sum_k (n_k / n) * g_k``, a large-batch SGD step.
    """

    name: ClassVar[str] = "fedsgd"

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        return [
            Assignment(a.device_id, 1, FULL_BATCH, a.learning_rate, a.config)
            for a in super().configure_round(context, devices)
        ]
