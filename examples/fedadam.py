"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), on the public strategy API only.

The devices run FedAvg's local SGD; the server treats the mean delta as a pseudo-gradient and
takes an Adam step with it:  m <- b1*m + (1-b1)*d,  v <- b2*v + (1-b2)*d^2,  w <- w + eta*m/(sqrt(v)+tau)

    unus-edge simulate --strategy examples/fedadam.py:FedAdam --set strategy.server_learning_rate=0.01
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unus_edge.strategies import Failure, FedAvg, Params


class FedAdam(FedAvg):
    name = "fedadam"

    def __init__(self, server_learning_rate: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self.m: dict[str, np.ndarray] = {}  # the moments, float64, created at the first round
        self.v: dict[str, np.ndarray] = {}

    def aggregate(self, server_round: int, global_params: Params, accumulator: Any,
                  failures: Sequence[Failure]) -> Params | None:
        if accumulator.count == 0:
            return None  # nobody answered: keep the model (and the moments)
        new = {}
        for name, delta in accumulator.mean().items():  # FedAvg's n_k-weighted mean delta
            d = delta.astype(np.float64)
            m = self.m.get(name, np.zeros_like(d))
            v = self.v.get(name, np.full_like(d, self.tau**2))  # v_0 = tau^2, as in the paper
            self.m[name] = self.beta1 * m + (1 - self.beta1) * d
            self.v[name] = self.beta2 * v + (1 - self.beta2) * d * d
            step = self.server_learning_rate * self.m[name] / (np.sqrt(self.v[name]) + self.tau)
            new[name] = (global_params[name] + step).astype(global_params[name].dtype)
        return new

    # Checkpoints: the moments are the strategy's state; an aggregator restart resumes them.
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {f"m/{n}": a for n, a in self.m.items()} | {f"v/{n}": a for n, a in self.v.items()}, {}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray], scalars: Mapping[str, Any]) -> None:
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            (self.m if kind == "m" else self.v)[name] = np.array(value, dtype=np.float64)
