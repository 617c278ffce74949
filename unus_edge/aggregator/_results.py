"""What the aggregator reports: the job's result, live round progress, and its counters."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from unus_edge.messages import FederatedMetrics, RoundMetrics
from unus_edge.strategies import Params

__all__ = ["Counters", "JobResult", "RoundProgress"]


@dataclass(frozen=True)
class RoundProgress:
    """Live progress of the current round (for progress bars)."""

    server_round: int
    total_rounds: int
    selected: int
    received: int
    failed: int


@dataclass
class JobResult:
    job: str
    state: str
    rounds: int
    version: int
    params: Params
    history: list[RoundMetrics]
    wall_seconds: float
    bytes_up: int
    bytes_down: int
    rejected: dict[str, int]
    reason: str = ""
    updates: int = 0
    """Updates applied over the whole job."""
    mean_staleness: float = 0.0
    """SSP: mean of (model version - base version) over applied updates; 0 in synchronous rounds."""
    federated: list[FederatedMetrics] = field(default_factory=list)
    """The federated evaluations (``evaluation.mode``), in order."""

    @property
    def final_accuracy(self) -> float | None:
        evaluated = [m.eval_accuracy for m in self.history if m.eval_accuracy is not None]
        return evaluated[-1] if evaluated else None

    @property
    def final_loss(self) -> float | None:
        evaluated = [m.eval_loss for m in self.history if m.eval_loss is not None]
        return evaluated[-1] if evaluated else None


@dataclass
class Counters:
    """Every inbound message ends up in exactly one of ``accepted``, ``ignored`` or ``rejected``."""

    bytes_up: int = 0
    bytes_down: int = 0
    refused: int = 0
    """Updates refused (a subset of ``rejected``)."""
    inbound: int = 0
    accepted: int = 0
    """Messages acted upon: registrations, presence, heartbeats and updates of registered devices."""
    ignored: int = 0
    """Valid messages of no concern: other jobs' topics, statuses of unregistered sessions, heartbeats of
    announced but unregistered sessions (``_inbound.on_presence``)."""
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        """The totals as plain values, for a checkpoint."""
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "refused": self.refused,
                "inbound": self.inbound, "accepted": self.accepted, "ignored": self.ignored,
                "rejected": dict(self.rejected)}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Go on from the totals of a checkpoint (an empty one: from zero)."""
        for name in ("bytes_up", "bytes_down", "refused", "inbound", "accepted", "ignored"):
            setattr(self, name, int(saved.get(name, 0)))
        self.rejected = collections.Counter({str(k): int(v) for k, v in saved.get("rejected", {}).items()})
