"""FedProx (Li et al., MLSys 2020): FedAvg with a proximal term in every device's local objective.

Each selected device k minimises ``F_k(w) + mu / 2 * ||w - w_global||^2`` instead of ``F_k(w)``,
starting from ``w_global``. The term adds ``mu * (w - w_global)`` to every local gradient, which
bounds how far a device drifts from the global model during its local epochs: on non-IID data,
and when devices do different amounts of local work, the updates then disagree less. The
aggregation is FedAvg's (``w <- w + eta * sum_k (n_k / n) * delta_k``).

The two halves:

* server (this class): FedAvg's selection and aggregation; each task carries
  ``{"client": "fedprox", "proximal_mu": mu}``;
* device: the default :class:`~unus_edge.strategies.ClientStrategy`, which turns
  ``proximal_mu > 0`` into a :class:`~unus_edge.strategies.ProximalHook` anchored at the model
  the task trains from (``w_global``). ``"fedprox"`` names that same class in
  ``CLIENT_STRATEGIES``; it is sent anyway so that a device log (and a future device-side
  FedProx with more to it, e.g. a local time budget) can tell the two apart.

With ``mu = 0`` the device adds no hook, so FedProx *is* FedAvg: the same selection (it calls
FedAvg's ``configure_round`` with the same seeded RNG), the same local training, the same
aggregation, bit for bit (``tests/unit/test_fedprox.py``).

What FedProx is not, here: the paper also lets stragglers send *partial work* (fewer local
epochs than asked) instead of being dropped. How much a device can do is a property of the
device, not of the algorithm, so it is not an option of this class: the FedProx experiment
simulates it with a bench-only subclass (``bench/fedprox_experiment.py``) that gives a seeded
half of the devices fewer epochs, for every mu including 0 (the FedAvg baseline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from unus_edge.errors import StrategyError
from unus_edge.strategies._base import Assignment, DeviceInfo, RoundContext
from unus_edge.strategies._fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg whose devices add ``mu / 2 * ||w - w_global||^2`` to their local objective.

    Options: ``mu`` (the proximal coefficient, >= 0; the paper tunes it in {0.001, 0.01, 0.1, 1})
    and ``server_learning_rate`` (FedAvg's eta, 1.0).
    """

    name: ClassVar[str] = "fedprox"

    def __init__(self, mu: float = 0.01, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
            raise StrategyError(f"mu must be a finite number >= 0, got {mu!r}", strategy=self.name)
        self.mu = float(mu)

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        """FedAvg's selection; every task also carries the device half and ``proximal_mu``.

        Settings already in an assignment's ``config`` (from a subclass) are kept, except that
        ``client`` and ``proximal_mu`` are FedProx's own.
        """
        return [
            Assignment(a.device_id, a.epochs, a.batch_size, a.learning_rate,
                       {**a.config, "client": "fedprox", "proximal_mu": self.mu})
            for a in super().configure_round(context, devices)
        ]
