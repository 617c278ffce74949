"""Aggregation strategies and the strategy API (see ``docs/strategies.md``).

Write a new algorithm by subclassing :class:`Strategy` (or :class:`FedAvg`) and run it with
``unus-edge simulate --strategy path/to/file.py:MyStrategy``.
"""

from __future__ import annotations

from unus_edge.strategies._base import (
    Accumulator,
    Assignment,
    ClientUpdate,
    DeviceInfo,
    Failure,
    Params,
    RoundContext,
    Scalar,
    Strategy,
    WeightedMean,
    add_scaled,
)
from unus_edge.strategies._fedavg import FULL_BATCH, FedAvg, FedSGD
from unus_edge.strategies._loader import BUILTIN_STRATEGIES, load_strategy, strategy_class

__all__ = [
    "BUILTIN_STRATEGIES",
    "FULL_BATCH",
    "Accumulator",
    "Assignment",
    "ClientUpdate",
    "DeviceInfo",
    "Failure",
    "FedAvg",
    "FedSGD",
    "Params",
    "RoundContext",
    "Scalar",
    "Strategy",
    "WeightedMean",
    "add_scaled",
    "load_strategy",
    "strategy_class",
]
