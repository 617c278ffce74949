"""The aggregator: an asyncio service on the gateway (``unus-edge aggregator --config job.toml``).

* :class:`Aggregator`: registration, presence, rounds, aggregation through a
  :class:`~unus_edge.strategies.Strategy`, evaluation, metrics, checkpoints.
* :class:`Registry`, :class:`SyncRound`, :func:`check_tensors`: the pure logic underneath.
"""

from __future__ import annotations

from unus_edge.aggregator._checkpoint import CHECKPOINT_FILE, Checkpoint, load_checkpoint, save_checkpoint
from unus_edge.aggregator._registry import DeviceRecord, Registry, Verdict
from unus_edge.aggregator._release import publish_release, release_from_checkpoint
from unus_edge.aggregator._results import JobResult, RoundProgress
from unus_edge.aggregator._round import DedupWindow, SyncRound, check_tensors
from unus_edge.aggregator._service import Aggregator
from unus_edge.aggregator._setup import JobParts, prepare_job, run_aggregator
from unus_edge.seeds import device_seed

__all__ = [
    "CHECKPOINT_FILE",
    "Aggregator",
    "Checkpoint",
    "DedupWindow",
    "DeviceRecord",
    "JobParts",
    "JobResult",
    "Registry",
    "RoundProgress",
    "SyncRound",
    "Verdict",
    "check_tensors",
    "device_seed",
    "load_checkpoint",
    "prepare_job",
    "publish_release",
    "release_from_checkpoint",
    "run_aggregator",
    "save_checkpoint",
]
