"""The narrow ports between the aggregator's parts: what a driver may read, change and send.

The :class:`~unus_edge.aggregator.Aggregator` owns the job's state and its transport. The parts
that decide (the drivers of synchronous rounds and of SSP, the group commit) do not get the
service; they get these ports, as hypercorn's protocol classes get a ``send``:

* :class:`JobView`: the job's shared state (model, version, registry, counters, history) and
  its configuration. A driver reads it and moves the model forward;
* :class:`Outbox`: everything a part may send or start (a message to one device, a
  publication, the retained model and clock, a commit, a background task);
* :class:`Driver`: what the service asks of a driver, whether it runs rounds or SSP clocks;
* :class:`Inbound`: what the handlers of inbound messages (``_inbound``: registrations,
  updates, presence, liveness) may read, change and send.

The service satisfies :class:`JobView` and :class:`Outbox` structurally; a unit test passes
small fakes instead (``tests/unit/test_driver_ports.py``), and calls a driver's decisions
directly, without a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from unus_edge.aggregator._registry import Registry
from unus_edge.aggregator._results import Counters, RoundProgress
from unus_edge.codec import Limits
from unus_edge.config import JobConfig
from unus_edge.messages import Message, RoundMetrics, Update
from unus_edge.strategies import AsyncStrategy, Params, Strategy
from unus_edge.topics import Channel
from unus_edge.transport import Transport

if TYPE_CHECKING:  # these modules import this one
    from unus_edge.aggregator._commit import GroupCommit
    from unus_edge.aggregator._fedeval import FederatedEvaluation
    from unus_edge.aggregator._fleet import FleetPublisher
    from unus_edge.aggregator._round import DedupWindow

__all__ = ["Driver", "Evaluate", "Inbound", "JobView", "Outbox"]

Evaluate = Callable[[Params], dict[str, float]]
"""A central evaluation: the model's parameters in, metrics (``loss``, ``accuracy``) out."""


class JobView(Protocol):
    """The job's state that the drivers share with the service."""

    config: JobConfig
    job: str
    session: str
    strategy: Strategy[Any] | AsyncStrategy
    registry: Registry
    counters: Counters
    rng: np.random.Generator
    history: list[RoundMetrics]
    evaluate_fn: Evaluate | None
    on_round: Callable[[RoundMetrics], None] | None
    on_progress: Callable[[RoundProgress], None] | None
    devices_changed: asyncio.Event
    """Set on membership and presence changes."""
    params: Params
    """The global model."""
    version: int
    """The global model's version: it advances with every change of ``params``."""
    published_version: int
    """The version of the retained model (the last publication the broker acknowledged)."""
    server_round: int
    state: str
    """``waiting``, ``running``, ``finished``, ``failed`` or ``stopped``."""

    def start_training_clock(self) -> None:
        """Training begins now (the first round or clock); a resumed job continues its clock."""

    def wall_seconds(self) -> float:
        """Seconds of training so far."""


class Outbox(Protocol):
    """What the aggregator's parts may send, publish or start."""

    async def send_to_device(self, device_id: str, message: Message) -> None:
        """A message on the device's ``tasks`` topic (a task, an ack, a registration reply)."""

    def round_done(self, server_round: int) -> None:
        """A round (SSP: an evaluation point) is done, its model published: federated evaluation
        (``evaluation.mode``) and a release (``job.release_every``), if due; nothing is waited for."""

    async def evaluations_done(self, grace: float | None = None) -> None:
        """Wait until the federated evaluations under way are published (each bounded by its
        timeout, or by ``grace`` seconds more)."""

    def post(self, device_id: str, message: Message) -> None:
        """``send_to_device`` without waiting: queued, and sent with the next bounded batch (dropped
        when the service is not running)."""

    async def publish(self, topic: str, channel: Channel, message: Message) -> int:
        """A message on ``topic`` with its channel's QoS and retain flag; returns its size."""

    async def publish_model(self) -> None:
        """The retained global model, as it is now."""

    async def publish_state(self, reason: str = "") -> None:
        """The retained clock, the job metrics and the fleet summary."""

    async def commit(self) -> None:
        """A checkpoint of everything applied so far; the acknowledgements that waited for it go out."""

    def spawn(self, coroutine: Coroutine[Any, Any, object], name: str) -> None:
        """Run ``coroutine`` in the service's task group (closed unstarted when the service is not running)."""


class Driver(Protocol):
    """What the service asks of the driver of its job's mode (rounds or SSP)."""

    def judge(self, update: Update) -> tuple[str, str] | None:
        """Why ``update`` cannot be applied now (a reason code and a detail), or ``None`` if it can."""

    def apply(self, msg_id: str, update: Update) -> tuple[int, int]:
        """Apply an update ``judge`` accepted; returns the device's clock and the model version."""

    def device_joined(self, device_id: str) -> None:
        """A device registered or came back online."""

    def device_offline(self, device_id: str, reason: str) -> None:
        """A device went offline (its status, its will, or missed heartbeats)."""

    def clock_state(self) -> tuple[int, int | None, dict[str, int]]:
        """``c_min``, the staleness bound (``None``: infinite) and the live devices' clocks."""

    def round_in_progress(self) -> int:
        """The synchronous round under way (0: none, and always 0 in SSP)."""

    def staleness_histogram(self) -> dict[str, int]:
        """Applied updates by staleness bucket (``messages.staleness_bucket``)."""

    def totals(self) -> tuple[int, float]:
        """Updates applied over the job, and their mean staleness."""

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The driver's checkpoint: scalars and tensors."""

    def restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Put back what :meth:`state` saved (before :meth:`run`: updates may arrive first)."""

    async def run(self) -> None:
        """Drive the job until it is done; a job-level failure raises :class:`~unus_edge.errors.JobError`."""


class Inbound(Outbox, Protocol):
    """What the inbound handlers use: the registry and the driver they feed, the deduplication
    window and the group commit they answer through, and the counters they keep."""

    config: JobConfig
    job: str
    session: str
    params: Params
    server_round: int
    transport: Transport
    limits: Limits
    """Decoding limits derived from the model (nothing larger than an update can be)."""
    registry: Registry
    counters: Counters
    driver: Driver
    dedup: DedupWindow
    committer: GroupCommit
    fleet: FleetPublisher
    federated: FederatedEvaluation
    registry_changed: asyncio.Event
    """Set whenever a heartbeat deadline may have moved (the liveness timer re-arms)."""

    def registry_updated(self) -> None:
        """Membership or presence changed: the fleet summary and the liveness timer follow."""

    def reject(self, reason: str, detail: str, device_id: str = "") -> None:
        """Count and log a refused message."""

    def ack(self, update: Update, msg_id: str, accepted: bool, reason: str = "") -> None:
        """Answer an update at once (a refusal, or a duplicate's known verdict)."""
