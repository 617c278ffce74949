"""Aggregation strategies and the strategy API (see ``docs/strategies.md``).

Write a new algorithm by subclassing :class:`Strategy` (or :class:`FedAvg`; for SSP and
asynchronous training :class:`AsyncStrategy`) and run it with
``unus-edge simulate --strategy path/to/file.py:MyStrategy``.
"""

from __future__ import annotations

from unus_edge.strategies._async import STALENESS_FUNCTIONS, FedAsync, FedBuff, SSPAveraging, staleness_function
from unus_edge.strategies._base import (
    Accumulator,
    AccumulatorT,
    Assignment,
    AsyncContext,
    AsyncStrategy,
    ClientUpdate,
    DeviceInfo,
    Failure,
    Params,
    RoundContext,
    SavableAccumulator,
    Scalar,
    Strategy,
    StrategyBase,
    WeightedMean,
    add_scaled,
    fold,
    new_scratch,
)
from unus_edge.strategies._client import (
    CLIENT_STRATEGIES,
    ClientStrategy,
    ProximalHook,
    client_strategy,
    load_client_strategies,
    register_client_strategy,
)
from unus_edge.strategies._dssgd import DSSGD, DSSGDAsync, DSSGDClient  # also registers the "dssgd" device half
from unus_edge.strategies._fedavg import FULL_BATCH, FedAvg, FedSGD
from unus_edge.strategies._fedprox import FedProx
from unus_edge.strategies._loader import BUILTIN_STRATEGIES, load_strategy, strategy_class
from unus_edge.strategies._robust import (
    ROBUST_RULES,
    CoordinateMedian,
    NormClipping,
    Robust,
    RobustFedAvg,
    RobustFedProx,
    TrimmedMean,
    robust_view,
    update_norm,
)

__all__ = [
    "BUILTIN_STRATEGIES",
    "CLIENT_STRATEGIES",
    "DSSGD",
    "FULL_BATCH",
    "ROBUST_RULES",
    "STALENESS_FUNCTIONS",
    "Accumulator",
    "AccumulatorT",
    "Assignment",
    "AsyncContext",
    "AsyncStrategy",
    "ClientStrategy",
    "ClientUpdate",
    "CoordinateMedian",
    "DSSGDAsync",
    "DSSGDClient",
    "DeviceInfo",
    "Failure",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "FedProx",
    "FedSGD",
    "NormClipping",
    "Params",
    "ProximalHook",
    "Robust",
    "RobustFedAvg",
    "RobustFedProx",
    "RoundContext",
    "SSPAveraging",
    "SavableAccumulator",
    "Scalar",
    "Strategy",
    "StrategyBase",
    "TrimmedMean",
    "WeightedMean",
    "add_scaled",
    "client_strategy",
    "fold",
    "load_client_strategies",
    "load_strategy",
    "new_scratch",
    "register_client_strategy",
    "robust_view",
    "staleness_function",
    "strategy_class",
    "update_norm",
]
