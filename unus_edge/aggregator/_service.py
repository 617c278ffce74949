"""The aggregator service: registration, rounds, aggregation, evaluation, metrics, checkpoints.

One :class:`asyncio.TaskGroup` spans the service's life with three named tasks:

* ``aggregator-receive``: the only consumer of the transport; decodes, validates and dispatches
  every message (registration, presence, heartbeats, updates), counting rejections by reason;
* ``aggregator-liveness``: a timer that marks devices offline when their heartbeats stop;
* ``aggregator-rounds``: drives the synchronous rounds (see :mod:`unus_edge.aggregator._driver`).

The service stops when the job is done, when it fails, or when its injectable
``shutdown_trigger`` is set; it then publishes its final state and a graceful offline status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from unus_edge import __version__, topics
from unus_edge.aggregator import _inbound
from unus_edge.aggregator._checkpoint import Checkpoint, load_checkpoint
from unus_edge.aggregator._commit import GroupCommit
from unus_edge.aggregator._driver import RoundDriver
from unus_edge.aggregator._fedeval import FederatedEvaluation
from unus_edge.aggregator._fleet import FleetPublisher
from unus_edge.aggregator._ports import Driver, Evaluate
from unus_edge.aggregator._registry import Registry
from unus_edge.aggregator._release import build_release
from unus_edge.aggregator._results import Counters, JobResult, RoundProgress
from unus_edge.aggregator._round import DedupWindow
from unus_edge.aggregator._sender import DeviceSender
from unus_edge.aggregator._ssp import SSPDriver
from unus_edge.codec import Limits
from unus_edge.config import JobConfig
from unus_edge.errors import JobError, TransportError, UnusError, describe_error
from unus_edge.messages import (
    Ack,
    Clock,
    GlobalModel,
    JobMetrics,
    Message,
    Release,
    RoundMetrics,
    Status,
    Update,
    encode_message,
)
from unus_edge.strategies import AsyncStrategy, Params, Strategy
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, Transport, Will

__all__ = ["Aggregator"]

logger = logging.getLogger("unus_edge.aggregator")


class Aggregator:
    """A federated job on the gateway. Construct, then ``await run()``."""

    def __init__(
        self,
        config: JobConfig,
        transport: Transport,
        *,
        params: Params,
        fingerprint: str,
        strategy: Strategy[Any] | AsyncStrategy,
        evaluate: Evaluate | None = None,
        session: str | None = None,
        shutdown_trigger: asyncio.Event | None = None,
        on_round: Callable[[RoundMetrics], None] | None = None,
        on_progress: Callable[[RoundProgress], None] | None = None,
        resume: bool = True,
    ) -> None:
        self.config = config
        self.job = config.job.name
        self.transport = transport
        self.strategy = strategy
        self.fingerprint = fingerprint
        self.params: Params = {name: np.array(value) for name, value in params.items()}
        self.evaluate_fn = evaluate
        self.session = session or secrets.token_hex(8)
        self.shutdown_trigger = shutdown_trigger or asyncio.Event()
        self.on_round = on_round
        self.on_progress = on_progress
        self.registry = Registry(fingerprint, config.job.heartbeat_timeout)
        self.rng = np.random.default_rng(config.job.seed)
        self.version = 0
        self.published_version = -1
        """Version of the last model whose publication the broker acknowledged (the retained one)."""
        self.server_round = 0
        self.history: list[RoundMetrics] = []
        self._bodies: list[dict[str, Any]] = []
        """The history's records as dicts, for checkpoints (``_history_bodies``)."""
        self.dedup = DedupWindow()
        self.counters = Counters()
        self.registry_changed = asyncio.Event()
        """Set on membership/presence changes; consumed by the liveness timer."""
        self.devices_changed = asyncio.Event()
        """Set on membership/presence changes; consumed by the round driver."""
        self.state = "waiting"
        self.failure: UnusError | None = None
        self.limits = self._limits()
        self._tasks: asyncio.TaskGroup | None = None
        self.sender = DeviceSender(self._send_now, self._start)
        """Every message to a device, in one queue sent in bounded batches by one task."""
        self.federated = FederatedEvaluation(self.job, config.evaluation, self.registry, config.job.seed,
                                             post=self.post, publish=self.publish, spawn=self._start)
        """Evaluation on the devices (``evaluation.mode``); the drivers ask for it."""
        self.fleet = FleetPublisher(self.job, self.registry, self.publish, self.spawn, config.job.fleet_interval)
        """Registry changes mark it; the fleet goes out at most once per ``job.fleet_interval``."""
        self.committer = GroupCommit(config.checkpoint.dir, self.checkpoint, self, lambda: self.running)
        """Accepted updates are acknowledged only once a checkpoint holds them."""
        self._run_started = time.perf_counter()
        self.training_started: float | None = None
        self.driver: Driver
        if config.job.mode == "ssp":
            if not isinstance(strategy, AsyncStrategy):
                raise JobError(self.job, f"{strategy.name or type(strategy).__name__} is not an AsyncStrategy: "
                                         "it cannot run with job.mode = 'ssp'")
            self.driver = SSPDriver(self, self, strategy)
        else:
            if not isinstance(strategy, Strategy):
                raise JobError(self.job, f"{strategy.name or type(strategy).__name__} is asynchronous: it needs "
                                         "job.mode = 'ssp'")
            self.driver = RoundDriver(self, self, strategy)
        """The job's mode; it is given this service as its :class:`JobView` and :class:`Outbox` only."""
        self._connections = 0
        transport.add_connection_listener(self._on_connect)
        if resume and config.checkpoint.dir:
            self._resume()

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def connect_options(config: JobConfig, session: str, *, model_bytes: int = 0) -> ConnectOptions:
        """Transport options for the aggregator: persistent session, offline status as last will.

        The receive queue holds at most three updates' worth of bytes (at least 32 MiB), so a
        burst of updates from a large fleet waits in the broker, not in the aggregator's memory.
        """
        will = Will(
            topics.aggregator_status(config.job.name),
            encode_message(Status("aggregator", "offline", session, role="aggregator", reason="will"),
                           config.job.name, Channel.AGGREGATOR_STATUS),
        )
        client_id = f"unus-aggregator-{config.job.name}"
        options = config.broker.connect_options(client_id=client_id, clean_session=False, will=will,
                                                queue_bytes=max(32 << 20, 3 * model_bytes))
        # A daemon waits for its broker (it may start later, the network may flap at boot);
        # a refusal by the broker (credentials) still fails at once.
        return replace(options, retry_first_connect=True)

    def _limits(self) -> Limits:
        """Decoding limits derived from the model: nothing larger than an update can be."""
        elements = sum(int(v.size) for v in self.params.values())
        model_bytes = sum(int(v.nbytes) for v in self.params.values())
        return Limits(
            # Twice the dense model: a sparse tensor costs index + value per entry.
            max_payload_bytes=2 * model_bytes + 65_536,
            max_tensors=len(self.params),
            max_elements=elements,
        )

    def _resume(self) -> None:
        checkpoint = load_checkpoint(Path(self.config.checkpoint.dir))
        if checkpoint is None:
            return
        if checkpoint.job != self.job or checkpoint.fingerprint != self.fingerprint:
            raise JobError(self.job, f"the checkpoint in {self.config.checkpoint.dir} belongs to job "
                                     f"{checkpoint.job!r} / model {checkpoint.fingerprint}; use another checkpoint.dir")
        self.params = checkpoint.params
        self.version = checkpoint.version
        self.server_round = checkpoint.server_round
        self.rng.bit_generator.state = checkpoint.rng_state
        for record in checkpoint.devices:
            self.registry.restore(record)
        self.history = [RoundMetrics(**entry) for entry in checkpoint.history]
        for msg_id, accepted, reason in checkpoint.dedup:
            self.dedup.remember(msg_id, accepted, reason)
        self.committer.audit_count = checkpoint.audit_count
        self.counters.restore(checkpoint.counters)
        self.driver.restore(checkpoint.driver, checkpoint.tensors)
        logger.info("resuming job %s after round %d (model version %d)", self.job, self.server_round, self.version)

    def checkpoint(self, pending_audit: list[dict[str, Any]] | None = None) -> Checkpoint:
        driver, tensors = self.driver.state()
        return Checkpoint(
            job=self.job, fingerprint=self.fingerprint, server_round=self.server_round, version=self.version,
            params=self.params, rng_state=dict(self.rng.bit_generator.state),
            devices=list(self.registry), history=self._history_bodies(),
            dedup=self.dedup.items(), finished=self.state == "finished", driver=driver, tensors=tensors,
            audit_count=self.audit_count, pending_audit=pending_audit or [], counters=self.counters.as_dict(),
        )

    def _history_bodies(self) -> list[dict[str, Any]]:
        """The history as plain dicts; each record converted once (the history only grows)."""
        bodies = self._bodies
        if len(bodies) > len(self.history):
            bodies.clear()
        bodies.extend(m.body() for m in self.history[len(bodies):])
        return list(bodies)

    # ------------------------------------------------------------------ durability (group commit)

    @property
    def running(self) -> bool:
        """Whether the service's task group is up (spawned tasks run)."""
        return self._tasks is not None

    @property
    def audit_count(self) -> int:
        return self.committer.audit_count

    async def commit(self) -> None:
        """Checkpoint everything applied so far, then send the acknowledgements that waited for it."""
        await self.committer.commit(running=self.running)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> JobResult:
        """Run the job to completion (or failure, or shutdown). The transport must be connected.

        Every ending goes the same way out: a final checkpoint, the final clock and job state, and
        a retained ``offline`` status with its reason (``shutdown``, or ``crashed`` when something
        raised, the exception named in the job metrics' ``reason``). Publishing the status
        explicitly matters: a graceful disconnect discards the last will. An unexpected exception
        is raised again after that.
        """
        started = self._run_started = time.perf_counter()
        reason = ""
        crashed = False
        try:
            reason = await self._serve()
        except BaseException as error:  # re-raised below, after the goodbye
            crashed = not isinstance(error, asyncio.CancelledError | KeyboardInterrupt)
            self.state = "failed" if crashed else "stopped"
            reason = f"crashed: {describe_error(error)}" if crashed else "cancelled"
            logger.error("job %s: %s", self.job, reason)
            raise
        finally:
            self._tasks = None
            self.fleet.cancel()  # the goodbye publishes the final fleet itself
            await self._goodbye(reason, crashed=crashed)
        return self.result(self.state, reason, time.perf_counter() - started)

    def result(self, state: str, reason: str, wall_seconds: float) -> JobResult:
        """The job's result as it stands."""
        updates, staleness = self.driver.totals()
        return JobResult(self.job, state, self.server_round, self.version, self.params, self.history,
                         wall_seconds, self.counters.bytes_up, self.counters.bytes_down,
                         dict(self.counters.rejected), reason, updates, staleness, list(self.federated.history))

    async def _serve(self) -> str:
        """The service's task group, until the rounds end or the shutdown trigger; the reason it stopped."""
        reason = ""
        async with asyncio.TaskGroup() as group:
            self._tasks = group
            # Consume before subscribing: retained statuses of a large fleet must not fill the
            # receive queue while nobody drains it (reads would pause, and the SUBACKs with them).
            receiver = group.create_task(_inbound.receive(self), name="aggregator-receive")
            # Subscribe, publish the model and clock, and only then announce ourselves: devices
            # register when they see this online status, so nothing they send arrives unheard.
            for channel, qos in ((Channel.STATUS, 1), (Channel.HEARTBEAT, 0), (Channel.REGISTER, 1),
                                 (Channel.UPDATE, 1)):
                await self.transport.subscribe(topics.device_filter(self.job, channel), qos=qos)
            await self.publish_model()
            await self.publish_state()
            await self.publish(topics.aggregator_status(self.job), Channel.AGGREGATOR_STATUS,
                               Status("aggregator", "online", self.session, role="aggregator",
                                      software_version=__version__))
            committer = group.create_task(self.committer.run(), name="aggregator-commit")
            liveness = group.create_task(_inbound.liveness(self), name="aggregator-liveness")
            rounds = group.create_task(self._drive(), name="aggregator-rounds")
            stop = group.create_task(self.shutdown_trigger.wait(), name="aggregator-shutdown")
            await asyncio.wait({rounds, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in (receiver, liveness, stop, committer):
                task.cancel()
            if not rounds.done():
                rounds.cancel()
                self.state = "stopped"
                reason = "shut down before the last round"
            elif self.failure is None:
                self.state = "finished"
            else:
                self.state = "failed"
                reason = str(self.failure)
                logger.error("job %s failed: %s", self.job, self.failure)
        return reason

    async def _goodbye(self, reason: str, *, crashed: bool) -> None:
        """Durable first: the final checkpoint does not depend on the broker. The goodbye messages
        do, so they get a bounded time (the broker may be unreachable at shutdown)."""
        try:
            await self.commit()
        except (UnusError, OSError) as error:  # a full disk must not hide why the job ended
            logger.error("final checkpoint failed: %s", error)
        try:
            async with asyncio.timeout(5):
                if self.state == "finished" and self.config.job.release:
                    await self.publish(topics.release(self.job), Channel.RELEASE, self._release())
                await self.publish_state(reason=reason)
                await self.publish(topics.aggregator_status(self.job), Channel.AGGREGATOR_STATUS,
                                   Status("aggregator", "offline", self.session, role="aggregator",
                                          reason="crashed" if crashed else "shutdown"))
        except (TimeoutError, TransportError) as error:
            logger.warning("final state not published (%s); the retained topics will say so on the next start",
                           error or "the broker did not answer within 5 s")

    def _release(self) -> Release:
        """The trained model for the fleet, with the last accuracy or error known (central, else federated)."""
        return build_release(self.config, self.version, self.server_round, self.fingerprint, self.session,
                             {name: value.copy() for name, value in self.params.items()},  # dense, as it is now
                             [m.body() for m in self.history], [m.body() for m in self.federated.history])

    def start_training_clock(self) -> None:
        """Training begins now (the first round or clock); a resumed job continues its clock."""
        if self.training_started is None:
            already = self.history[-1].wall_seconds if self.history else 0.0
            self.training_started = time.perf_counter() - already

    def wall_seconds(self) -> float:
        """Seconds of training so far: since the first round or clock started (0 before)."""
        return 0.0 if self.training_started is None else time.perf_counter() - self.training_started

    async def _drive(self) -> None:
        """The round driver; a job-level failure is recorded, not raised into the task group."""
        try:
            await self.driver.run()
        except UnusError as error:
            self.failure = error

    def spawn(self, coroutine: Coroutine[Any, Any, object], name: str) -> None:
        """Run a fire-and-forget publish inside the service's task group."""
        self._start(coroutine, name)

    def _start(self, coroutine: Coroutine[Any, Any, object], name: str) -> bool:
        if self._tasks is None:
            coroutine.close()
            return False
        self._tasks.create_task(coroutine, name=name)
        return True

    def round_done(self, server_round: int) -> None:
        """A round (SSP: an evaluation point) is done: the devices evaluate, and a release goes
        out, if ``evaluation.mode`` and ``job.release_every`` ask for it."""
        self.federated.request(server_round, self.version)
        every = self.config.job.release_every
        if every and server_round % every == 0:
            self.spawn(self.publish(topics.release(self.job), Channel.RELEASE, self._release()), "aggregator-release")

    async def evaluations_done(self, grace: float | None = None) -> None:
        await self.federated.drain(grace)

    def post(self, device_id: str, message: Message) -> None:
        """Send ``message`` to the device without waiting, with the next batch (:mod:`._sender`)."""
        self.sender.post(device_id, message)

    # ------------------------------------------------------------------ publishing

    async def publish(self, topic: str, channel: Channel, message: Message) -> int:
        spec = topics.TOPIC_SPECS[channel]
        payload = encode_message(message, self.job, channel)
        await self.transport.publish(topic, payload, qos=spec.qos, retain=spec.retain)
        return len(payload)

    async def publish_model(self) -> None:
        """Publish the retained model. Devices fetch it when they start a computation, so what
        reaches them is counted from their own reports (``model_bytes`` in their updates)."""
        payload = self.strategy.model_payload(self.params)
        version = self.version
        await self.publish(topics.model(self.job), Channel.MODEL,
                           GlobalModel(version, self.server_round, self.fingerprint, self.session, payload))
        self.published_version = max(self.published_version, version)

    async def publish_state(self, reason: str = "") -> None:
        c_min, bound, clocks = self.driver.clock_state()
        clock = Clock(self.version, self.server_round, self.session, _clock_state(self.state), c_min, bound,
                      self.registry.online_count, clocks, self.published_version)
        await self.publish(topics.clock(self.job), Channel.CLOCK, clock)
        last = self.history[-1] if self.history else None
        job = JobMetrics(_clock_state(self.state), self.strategy.name or type(self.strategy).__name__,
                         self.server_round, self.config.job.rounds, self.version, self.session, bound, c_min,
                         eval_accuracy=last.eval_accuracy if last else None,
                         eval_loss=last.eval_loss if last else None, reason=reason,
                         staleness=self.driver.staleness_histogram(),
                         current_round=self.driver.round_in_progress())
        await self.publish(topics.metrics(self.job, "job"), Channel.METRICS, job)
        await self.fleet.publish()

    def reject(self, reason: str, detail: str, device_id: str = "") -> None:
        """Count a refused message; log the first ten of each reason, then every thousandth."""
        self.counters.rejected[reason] += 1
        count = self.counters.rejected[reason]
        if count <= 10 or count % 1000 == 0:
            level = logging.INFO if reason == "not_running" else logging.WARNING  # expected at the end of a job
            logger.log(level, "rejected message%s: %s (%s)%s", f" from {device_id}" if device_id else "", reason,
                           detail, f" [{count} so far]" if count > 10 else "")

    def _on_connect(self, session_present: bool) -> None:
        """After a reconnection, say ``online`` again: the lost connection's will left the retained
        status at ``offline``, and devices register only with an online aggregator."""
        self._connections += 1
        if self._connections > 1:
            self.spawn(self._announce_again(), "aggregator-status")

    async def _announce_again(self) -> None:
        with contextlib.suppress(TransportError):  # lost again: the next reconnection announces it
            await self.publish(topics.aggregator_status(self.job), Channel.AGGREGATOR_STATUS,
                               Status("aggregator", "online", self.session, role="aggregator",
                                      software_version=__version__))

    def registry_updated(self) -> None:
        self.registry_changed.set()
        self.devices_changed.set()
        self.fleet.mark()

    async def send_to_device(self, device_id: str, message: Message) -> None:
        """Publish on the device's ``tasks`` topic, in order with what was posted (:mod:`._sender`)."""
        await self.sender.send(device_id, message)

    async def _send_now(self, device_id: str, message: Message) -> None:
        size = await self.publish(topics.device_topic(self.job, device_id, Channel.TASKS), Channel.TASKS, message)
        self.counters.bytes_down += size

    def ack(self, update: Update, msg_id: str, accepted: bool, reason: str = "") -> None:
        record = self.registry.get(update.device_id)
        ack = Ack(update.device_id, msg_id, update.task_id, accepted, reason, record.clock if record else 0,
                  self.version)
        self.post(update.device_id, ack)




def _clock_state(state: str) -> Any:
    return state if state in ("waiting", "running", "finished", "failed") else "failed"

