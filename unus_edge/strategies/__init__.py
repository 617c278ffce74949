"""Aggregation strategies and the strategy API (see ``docs/strategies.md``).

Write a new algorithm by subclassing :class:`Strategy` (or :class:`FedAvg`) and run it with
``unus-edge simulate --strategy path/to/file.py:MyStrategy``.
"""

from __future__ import annotations

from unus_edge.strategies._async import STALENESS_FUNCTIONS, FedAsync, FedBuff, SSPAveraging, staleness_function
from unus_edge.strategies._base import (
    Accumulator,
    Assignment,
    AsyncContext,
    ClientUpdate,
    DeviceInfo,
    Failure,
    Params,
    RoundContext,
    Scalar,
    Strategy,
    WeightedMean,
    add_scaled,
    fold,
)
from unus_edge.strategies._client import (
    CLIENT_STRATEGIES,
    ClientStrategy,
    ProximalHook,
    client_strategy,
    register_client_strategy,
)
from unus_edge.strategies._dssgd import DSSGD, DSSGDAsync, DSSGDClient  # also registers the "dssgd" device half
from unus_edge.strategies._fedavg import FULL_BATCH, FedAvg, FedSGD
from unus_edge.strategies._loader import BUILTIN_STRATEGIES, load_strategy, strategy_class

__all__ = [
    "BUILTIN_STRATEGIES",
    "CLIENT_STRATEGIES",
    "DSSGD",
    "FULL_BATCH",
    "STALENESS_FUNCTIONS",
    "Accumulator",
    "Assignment",
    "AsyncContext",
    "ClientStrategy",
    "ClientUpdate",
    "DSSGDAsync",
    "DSSGDClient",
    "DeviceInfo",
    "Failure",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "FedSGD",
    "Params",
    "ProximalHook",
    "RoundContext",
    "SSPAveraging",
    "Scalar",
    "Strategy",
    "WeightedMean",
    "add_scaled",
    "client_strategy",
    "fold",
    "load_strategy",
    "register_client_strategy",
    "staleness_function",
    "strategy_class",
]
