"""The device daemon: registers, trains on local data when asked, and reports.

One :class:`asyncio.TaskGroup` spans the daemon's life, with named tasks:

* ``device-receive``: tasks, acknowledgements, registration replies, the retained model, the
  clock and the aggregator's presence;
* ``device-heartbeat``: a heartbeat every ``heartbeat_interval`` seconds (QoS 0);
* ``device-worker``: takes tasks one at a time, waits for the model version the task names,
  trains in a worker thread, publishes the update and keeps it until it is acknowledged
  (re-publishing it after a reconnection or an acknowledgement timeout).

The daemon ends when its shutdown trigger is set (SIGTERM: it abandons the step in progress,
publishes ``status: offline`` and disconnects gracefully), when the aggregator refuses it
(:class:`~unus_edge.errors.RejectedError`), or, with ``exit_when_finished``, when the job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from typing import Literal

from unus_edge import __version__, topics
from unus_edge.codec import Limits
from unus_edge.config import DeviceConfig
from unus_edge.data import Dataset, LocalData
from unus_edge.device import _worker
from unus_edge.device._evaluate import evaluate_on_request
from unus_edge.device._pace import NO_PACE, Pace
from unus_edge.device._register import keep_registered, on_registration_reply
from unus_edge.device._release import keep_release
from unus_edge.device._serve import QUEUED, accept_prediction, serve_predictions
from unus_edge.device._view import AggregatorView
from unus_edge.device._worker import Pending
from unus_edge.errors import ProtocolError, PublishError, RejectedError, describe_error
from unus_edge.messages import (
    Ack,
    Clock,
    EvaluateTask,
    GlobalModel,
    Message,
    PredictRequest,
    RegistrationReply,
    Release,
    Status,
    Task,
    decode_message,
    encode_message,
)
from unus_edge.nn import Graph
from unus_edge.strategies import ClientStrategy
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, Transport, Will

__all__ = ["Device"]

logger = logging.getLogger("unus_edge.device")

DeviceState = Literal["idle", "training", "waiting", "uploading"]


class Device:
    """One device of a federated job. Construct, connect the transport, then ``await run()``."""

    def __init__(
        self,
        config: DeviceConfig,
        transport: Transport,
        *,
        graph: Graph,
        fingerprint: str,
        dataset: Dataset,
        session: str | None = None,
        shutdown_trigger: asyncio.Event | None = None,
        exit_when_finished: bool = False,
        compute_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.settings = config.device
        self.job = config.device.job
        self.device_id = config.device.id
        self.transport = transport
        self.graph = graph
        self.fingerprint = fingerprint
        self.dataset = dataset
        self.session = session or secrets.token_hex(8)
        self.shutdown_trigger = shutdown_trigger or asyncio.Event()
        self.exit_when_finished = exit_when_finished
        self.compute_slots: contextlib.AbstractAsyncContextManager[object] = (
            compute_slots if compute_slots is not None else contextlib.nullcontext())
        """Held while training: shared by the devices of one process to bound concurrent trainings."""
        self.pace: Pace = NO_PACE
        """Simulation only: makes computations and transfers as slow as a device profile says."""
        self.template = graph.model.initializers
        # Twice the dense model: a partial (sparse) model costs index + value per entry.
        self.limits = Limits(max_payload_bytes=2 * sum(v.nbytes for v in self.template.values()) + 65_536)
        self.predict_limits = Limits(max_payload_bytes=self.settings.predict_max_bytes, max_tensors=1)
        self.view = AggregatorView(self.template, fingerprint)
        """What this device knows of the aggregator (session, model, clocks): the protocol's device
        rules, without I/O (:mod:`unus_edge.device._view`)."""
        self.model_changed = asyncio.Event()
        self.model_messages = 0
        """Model messages received (the device subscribes to the model only to fetch one)."""
        self.model_bytes = 0
        """Bytes of model messages received; each update reports those since the previous one."""
        self.model_bytes_reported = 0
        self.models_while_training = 0
        """Model messages that arrived while this device trained (the protocol says none should)."""
        self.client: ClientStrategy | None = None
        self.registered = asyncio.Event()
        self.registration_wanted = asyncio.Event()
        self.state: DeviceState = "idle"
        self.tasks: asyncio.Queue[Task] = asyncio.Queue()
        self.done_tasks: set[str] = set()
        self.pending: Pending | None = None
        self.acked = asyncio.Event()
        self.gate = asyncio.Event()
        """Set whenever the SSP start rule may have changed its answer (a clock, an ack)."""
        self.standing: Task | None = None
        self.stop_training = threading.Event()
        self.started = time.monotonic()
        self.updates_sent = 0
        self.held_out: Dataset | None = None
        """Examples kept aside for federated evaluation (``device.holdout``), never trained on."""
        self.evaluations: asyncio.Queue[EvaluateTask] = asyncio.Queue()
        self.predictions: asyncio.Queue[PredictRequest] = asyncio.Queue(QUEUED)
        self.evaluations_idle = asyncio.Event()
        """Set while no evaluation is queued or under way."""
        self.evaluations_idle.set()
        self.fetch_lock = asyncio.Lock()
        """One model fetch at a time (the training worker's and the evaluator's)."""
        self.local_data: LocalData | None = None
        """The data source ``dataset`` was read from (None: data handed in); re-read when it changes."""
        self.registrations_sent = 0
        """Registrations published; more than one per aggregator session means one went unanswered."""
        self._group: asyncio.TaskGroup | None = None
        self._connections = 0
        transport.add_connection_listener(self._on_connect)

    @staticmethod
    def connect_options(config: DeviceConfig, session: str) -> ConnectOptions:
        """A persistent session under a stable client id, with ``status: offline`` as last will."""
        job, device_id = config.device.job, config.device.id
        will = Will(topics.device_topic(job, device_id, Channel.STATUS),
                    encode_message(Status(device_id, "offline", session, reason="will"), job, Channel.STATUS))
        options = config.broker.connect_options(client_id=f"unus-{job}-{device_id}", clean_session=False, will=will)
        # A daemon waits for its broker; a refusal (credentials) still fails at once.
        return dataclasses.replace(options, retry_first_connect=True)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve until the shutdown trigger (or the job's end with ``exit_when_finished``).

        Every ending says goodbye the same way: a retained ``offline`` status whose reason says
        why (``shutdown``; ``rejected: ...`` when the aggregator refused the device; ``crashed:
        Type: message`` when something raised), published explicitly because a graceful
        disconnect discards the last will. The exception is raised again after that.
        """
        reason = "shutdown"
        await self._publish(Channel.STATUS, Status(self.device_id, "online", self.session,
                                                   software_version=__version__))
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                tasks = [group.create_task(self._receive(), name="device-receive")]
                await self.transport.subscribe(topics.device_topic(self.job, self.device_id, Channel.TASKS), qos=1)
                for topic in (topics.clock(self.job), topics.aggregator_status(self.job)):
                    await self.transport.subscribe(topic, qos=1)
                if self.settings.release_dir:  # the trained model, kept for local applications (_release)
                    await self.transport.subscribe(topics.release(self.job), qos=1)
                if self.settings.serve_predictions:  # and used for theirs over MQTT (_serve)
                    await self.transport.subscribe(self._topic(Channel.PREDICT_REQUEST), qos=1)
                    tasks.append(group.create_task(serve_predictions(self), name="device-predictions"))
                # The model is fetched per computation (_worker.fetch_model), never followed: drop
                # the subscription a persistent session may still hold from an older daemon.
                await self.transport.unsubscribe(topics.model(self.job))
                tasks += [
                    group.create_task(keep_registered(self), name="device-registration"),
                    group.create_task(_worker.heartbeat(self), name="device-heartbeat"),
                    group.create_task(_worker.work(self), name="device-worker"),
                    group.create_task(evaluate_on_request(self), name="device-evaluate"),
                ]
                await self.shutdown_trigger.wait()
                self.stop_training.set()
                for task in tasks:
                    task.cancel()
        except BaseExceptionGroup as group:
            # A refusal by the aggregator is this daemon's answer: raise it as itself.
            matched, _ = group.split(RejectedError)
            if matched is not None:
                reason = f"rejected: {matched.exceptions[0]}"[:200]
                raise matched.exceptions[0] from None
            reason = f"crashed: {describe_error(group)}"
            raise
        except BaseException as error:  # re-raised, after the goodbye below
            if not isinstance(error, asyncio.CancelledError | KeyboardInterrupt):
                reason = f"crashed: {describe_error(error)}"
            raise
        finally:
            self._group = None
            if reason != "shutdown":
                logger.error("device %s stopping: %s", self.device_id, reason)
            with contextlib.suppress(PublishError, TimeoutError):
                async with asyncio.timeout(5):
                    await self._publish(Channel.STATUS, Status(self.device_id, "offline", self.session,
                                                               reason=reason, software_version=__version__))
            logger.info("device %s stopped after %d update(s)", self.device_id, self.updates_sent)

    def _on_connect(self, session_present: bool) -> None:
        """After a reconnection: say ``online`` again, and re-publish an unacknowledged update (same msg_id).

        The connection that was lost left the retained status at ``offline`` (the broker
        published the will, also when another client took this client id over), so the status is
        published again after every reconnect, not only at start (issue 14)."""
        self._connections += 1
        if self._group is None:
            return
        if self._connections > 1:  # the first connection's status is run()'s own
            self._group.create_task(self._announce_again(), name="device-status")
        if self.pending is not None:
            logger.info("reconnected: re-publishing update %s", self.pending.msg_id)
            self._group.create_task(self._republish(), name="device-republish")

    # ------------------------------------------------------------------ sending

    async def publish_on(self, channel: Channel, message: Message) -> bytes:
        """Publish ``message`` on this device's topic of ``channel`` (its QoS and retain flag)."""
        return await self._publish(channel, message)

    async def _publish(self, channel: Channel, message: Message, *, msg_id: str | None = None) -> bytes:
        spec = topics.TOPIC_SPECS[channel]
        payload = encode_message(message, self.job, channel, msg_id=msg_id)
        await self.transport.publish(self._topic(channel), payload, qos=spec.qos, retain=spec.retain)
        return payload

    def _topic(self, channel: Channel) -> str:
        return topics.device_topic(self.job, self.device_id, channel)

    async def _announce_again(self) -> None:
        with contextlib.suppress(PublishError):  # lost again: the next reconnect announces it
            await self._publish(Channel.STATUS, Status(self.device_id, "online", self.session,
                                                       software_version=__version__))

    async def _republish(self) -> None:
        pending = self.pending
        if pending is not None:
            await self.transport.publish(self._topic(Channel.UPDATE), pending.payload, qos=1)

    # ------------------------------------------------------------------ receiving

    async def _receive(self) -> None:
        async for message in self.transport.messages():
            try:
                parsed = topics.parse(message.topic)
                if parsed.job != self.job or (parsed.device_id and parsed.device_id != self.device_id):
                    continue  # not ours (brokers may leak retained topics: docs/brokers.md)
                if parsed.channel is Channel.MODEL:
                    self.model_bytes += len(message.payload)
                limits = self.predict_limits if parsed.channel is Channel.PREDICT_REQUEST else self.limits
                _, decoded = decode_message(message.payload, parsed.channel, limits=limits)
            except ProtocolError as error:
                logger.warning("ignoring a message on %s: %s", message.topic, error)
                continue
            self._dispatch(decoded)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Task):
            if message.mode == "ssp":
                running = self.standing is not None
                self.standing = message  # a new aggregator session replaces the standing task
                self.gate.set()
                if not running:
                    self.tasks.put_nowait(message)
                return
            if message.task_id in self.done_tasks or (self.pending and self.pending.task_id == message.task_id):
                return  # a redelivery of a task we already did
            self.tasks.put_nowait(message)
        elif isinstance(message, EvaluateTask):
            self.evaluations_idle.clear()
            self.evaluations.put_nowait(message)
        elif isinstance(message, Release) and self._group is not None and self.settings.release_dir:
            self._group.create_task(keep_release(self, message), name="device-release")
        elif isinstance(message, PredictRequest) and self._group is not None and self.settings.serve_predictions:
            accept_prediction(self, message, self._group)
        elif isinstance(message, Ack):
            self._on_ack(message)
        elif isinstance(message, GlobalModel):
            self.model_messages += 1
            if self.state == "training":
                self.models_while_training += 1
                logger.warning("model version %d arrived while training", message.version)
            self._on_model(message)
            self.model_changed.set()  # a fetch waits for the arrival even of a model it already has
        elif isinstance(message, RegistrationReply):
            on_registration_reply(self, message)
        elif isinstance(message, Clock):
            if self.view.on_clock(message):
                self._clock_applied()
        elif isinstance(message, Status) and message.role == "aggregator":
            if message.state == "online" and message.session != self.view.session:
                if self.view.session:
                    logger.info("the aggregator restarted (session %s): registering again", message.session)
                    if self.pending is not None and self._group is not None:
                        # It resumes from its checkpoint: the update may have to be applied there.
                        self._group.create_task(self._republish(), name="device-republish")
                self.follow(message.session)
                self.registration_wanted.set()
            elif message.state == "offline":
                logger.warning("the aggregator is offline (%s)", message.reason or "no reason given")

    def _on_ack(self, ack: Ack) -> None:
        pending = self.pending
        if pending is None or ack.update_msg_id != pending.msg_id:
            return
        self.pending = None
        self.view.on_ack(ack)
        self.gate.set()
        if ack.accepted:
            logger.info("update %s for %s applied (clock %d)", ack.update_msg_id, ack.task_id, ack.clock)
        else:
            level = logging.INFO if ack.reason == "not_running" else logging.WARNING  # the job just ended
            logger.log(level, "update for %s refused by the aggregator: %s", ack.task_id, ack.reason)
            standing = self.standing
            if ack.reason == "unassigned" and standing is not None and standing.task_id == ack.task_id:
                # The aggregator does not count this device in the SSP computation (it lost track
                # of it: an offline verdict, a restart). Computing again with the same task would be
                # refused again; registering again hands out a new standing task.
                logger.warning("standing task %s is no longer valid: registering again", ack.task_id)
                self.standing = None
                self.registration_wanted.set()
        self.acked.set()

    def follow(self, session: str) -> None:
        """Follow an aggregator session (:meth:`AggregatorView.follow`); a fetch for the old one gives up."""
        if self.view.follow(session):
            self.model_changed.set()
            self._clock_applied()

    def _clock_applied(self) -> None:
        self.gate.set()
        if self.view.job_over and self.exit_when_finished:
            state = self.view.latest_clock.state if self.view.latest_clock else "over"
            logger.info("job %s is %s: device %s exits", self.job, state, self.device_id)
            if self.evaluations_idle.is_set() or self._group is None:
                self.shutdown_trigger.set()
            else:  # answer the evaluations it was asked for first (bounded)
                self._group.create_task(self._exit_after_evaluations(), name="device-exit")

    async def _exit_after_evaluations(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.evaluations_idle.wait()
        self.shutdown_trigger.set()

    def _on_model(self, model: GlobalModel) -> None:
        if self.view.on_model(model) in ("wrong_fingerprint", "bad_tensors"):
            logger.error("ignoring a model message: %s", self.view.model_problem)
