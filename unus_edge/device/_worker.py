"""The device daemon's work: heartbeats, the task loop, the SSP loop, and running one task.

These are procedures over a :class:`~unus_edge.device.Device` (which holds the state and the
message handling); the daemon starts :func:`heartbeat` and :func:`work` as named tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unus_edge import topics
from unus_edge.codec import new_msg_id
from unus_edge.device._training import Abandoned, check_dataset, train_task
from unus_edge.errors import (
    ConfigError,
    DataError,
    MessageError,
    PublishError,
    StrategyError,
    SubscribeError,
    TransportError,
)
from unus_edge.messages import Heartbeat, Task, Update, encode_message
from unus_edge.seeds import device_seed
from unus_edge.strategies import CLIENT_STRATEGIES, ClientStrategy, Params, client_strategy
from unus_edge.topics import Channel

if TYPE_CHECKING:
    from unus_edge.device._daemon import Device

__all__ = [
    "Pending", "do_task", "fetch_model", "heartbeat", "prepare_client", "run_ssp", "ssp_required_version",
    "wait_for_model", "wait_gate", "work",
]

logger = logging.getLogger("unus_edge.device")
ssp_logger = logging.getLogger("unus_edge.device.ssp")


@dataclass
class Pending:
    """An update published but not yet acknowledged."""

    msg_id: str
    task_id: str
    payload: bytes


def prepare_client(task: Task, current: ClientStrategy | None) -> ClientStrategy:
    """The device half ``task`` names, configured with its settings; a task the device cannot
    carry out is refused here, before any training (``MessageError``: ``unknown_client`` or
    ``bad_config``), and the daemon goes on."""
    try:
        return client_strategy(task.config, current)
    except (StrategyError, ConfigError) as error:
        known = str(task.config.get("client", "default")) in CLIENT_STRATEGIES
        raise MessageError("bad_config" if known else "unknown_client", str(error), kind="task",
                           field="config") from error


def _job_seed(task: Task) -> int:
    value = task.config.get("job_seed", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError("bad_config", f"job_seed must be an integer, got {value!r}", kind="task",
                           field="config.job_seed")
    return value


def _refused(task: Task, error: MessageError) -> None:
    logger.warning("task %s refused (%s): %s", task.task_id, error.reason, error.detail)


def _over(device: Device) -> bool:
    """Whether the job ended (a separate call: the flag changes while we await)."""
    return device.view.job_over


async def heartbeat(device: Device) -> None:
    """A heartbeat every ``heartbeat_interval`` seconds (QoS 0: skipped while disconnected)."""
    sequence = 0
    while True:
        sequence += 1
        uptime = time.monotonic() - device.started
        heartbeat = Heartbeat(device.device_id, device.session, sequence, device.state, device.view.clock, uptime)
        with contextlib.suppress(PublishError):  # QoS 0 while disconnected: skip this beat
            await device._publish(Channel.HEARTBEAT, heartbeat)
        await asyncio.sleep(device.settings.heartbeat_interval)


FETCH_QOS = 0
"""The model subscription's QoS. Not 1: a device killed while it holds the subscription keeps
it in its persistent session, and at QoS 1 the broker would queue every model published while
the device is away and deliver them all when it returns (Mosquitto's production limits allow
512 MB); no broker queues QoS 0 for an offline client. A copy lost to a dropped connection
comes again: the transport re-subscribes on reconnect, which makes the broker re-send the
retained copy, and :func:`wait_for_model` re-subscribes when it waits too long."""


async def fetch_model(device: Device, version: int, budget: float) -> bool:
    """One fetch at a time (:func:`_fetch_model`): the evaluator and the trainer may both ask."""
    async with device.fetch_lock:
        return await _fetch_model(device, version, budget)


async def _fetch_model(device: Device, version: int, budget: float) -> bool:
    """Fetch the model for one computation: subscribe to the retained model, take it, unsubscribe.

    The device receives a model only when it is about to train, and one model per computation
    (docs/protocol.md, "Model delivery"). When the last clock says the retained copy is recent
    enough (``version`` at most the clock's ``model_version``), the SUBSCRIBE and the
    UNSUBSCRIBE go out back to back: the broker queues the retained copy for the first and
    removes the subscription with the second, so no later publication slips in between (holding
    the subscription until the copy arrived let one in for a third of the fetches, measured).
    Otherwise, or if that copy does not come within ``device.model_wait``, the device holds the
    subscription until a model of ``version`` or newer arrives. False if none came within
    ``budget`` seconds.
    """
    if device.view.model is not None and device.view.model_version >= max(version, device.view.published_version):
        return True  # it already holds the retained model (e.g. FedBuff between two flushes)
    topic = topics.model(device.job)
    seen, received = device.model_messages, device.model_bytes
    loop = asyncio.get_running_loop()
    end = loop.time() + budget
    arrived = False
    if version <= device.view.published_version:
        with contextlib.suppress(TimeoutError, SubscribeError):  # then hold the subscription instead
            async with asyncio.timeout(min(budget, device.settings.model_wait)):
                await asyncio.gather(device.transport.subscribe(topic, qos=FETCH_QOS),
                                     device.transport.unsubscribe(topic))
                arrived = await wait_for_model(device, version, budget, after=seen)
    if not arrived:
        await device.transport.subscribe(topic, qos=FETCH_QOS)
        try:
            arrived = await wait_for_model(device, version, max(0.0, end - loop.time()), after=seen)
        finally:
            with contextlib.suppress(TransportError):  # closing: the subscription goes with the session
                await device.transport.unsubscribe(topic)
    await device.pace.transfer(device.model_bytes - received)
    return arrived


async def wait_for_model(device: Device, version: int, budget: float, *, after: int = -1) -> bool:
    """Wait until the model of ``version`` (or newer) is here, and more than ``after`` model
    messages have arrived; re-subscribe if it is late (the broker re-sends the retained copy)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + budget
    session = device.view.session
    while device.view.model_version < version or device.model_messages <= after:
        remaining = end - loop.time()
        if remaining <= 0 or device.view.session != session:
            return False  # a new aggregator session: the caller decides again what it needs
        device.model_changed.clear()
        try:
            async with asyncio.timeout(min(remaining, device.settings.model_wait)):
                await device.model_changed.wait()
        except TimeoutError:
            logger.warning("model version %d has not arrived; fetching the retained copy again", version)
            await device.transport.unsubscribe(topics.model(device.job))
            await device.transport.subscribe(topics.model(device.job), qos=FETCH_QOS)
    return True


async def work(device: Device) -> None:
    """Take tasks one at a time; a standing SSP task runs the SSP loop."""
    await device.registered.wait()
    while True:
        task = await device.tasks.get()
        await device.registered.wait()
        if task.mode == "ssp":
            logger.info("standing SSP task %s received: computing while the clock allows", task.task_id)
            await run_ssp(device)
            continue
        logger.info("task %s received: round %d, model version %d, %d epoch(s), batch %d", task.task_id,
                    task.server_round, task.model_version, task.epochs, task.batch_size)
        budget = task.deadline_seconds or 3600.0
        have = device.view.model is not None and device.view.model_version == task.model_version  # e.g. a retried round
        if not have and not await fetch_model(device, task.model_version, budget):
            logger.warning("task %s dropped: model version %d never arrived", task.task_id, task.model_version)
            continue
        if device.view.model_version != task.model_version or device.view.model is None:
            logger.info("task %s is stale (model is at version %d)", task.task_id, device.view.model_version)
            continue
        try:
            await do_task(device, task, device.view.model, task.model_version)
        except MessageError as error:
            device.done_tasks.add(task.task_id)  # a redelivery is refused the same way: not retried
            _refused(task, error)


async def wait_gate(device: Device) -> None:
    """Wait until the SSP rule lets this device start: c_i <= c_min + s (event-driven)."""
    while not device.view.job_over and not device.view.may_start():
        device.state = "waiting"
        device.gate.clear()
        await device.gate.wait()


def ssp_required_version(device: Device) -> int:
    """The oldest model an SSP computation may start from (:meth:`AggregatorView.ssp_required_version`)."""
    return device.view.ssp_required_version()


async def run_ssp(device: Device) -> None:
    """SSP: update after update, each started only when the clock allows it."""
    while not device.view.job_over and device.standing is not None:
        await wait_gate(device)
        if _over(device):
            break
        if not await fetch_model(device, ssp_required_version(device), 3600.0) or device.view.model is None:
            continue
        task, base, version, clock = device.standing, device.view.model, device.view.model_version, device.view.clock
        try:
            job_seed = _job_seed(task)
        except MessageError as error:
            _refused(task, error)
            device.standing = None  # the same standing task would be refused at every clock
            break
        # The SSP invariant, logged at every start (tests check it over whole runs).
        ssp_logger.info("ssp start device=%s clock=%d c_min=%d bound=%s version=%d", device.device_id, clock,
                        device.view.c_min, "inf" if device.view.bound is None else device.view.bound, version)
        step = dataclasses.replace(task, server_round=clock + 1, model_version=version,
                                   config={**task.config, "seed": device_seed(job_seed, clock + 1,
                                                                              device.device_id)})
        try:
            await do_task(device, step, base, version, clock=clock)
        except MessageError as error:
            _refused(task, error)
            device.standing = None
            break
    # The loop is over (the job ended, or its task was refused): the next standing task must start
    # it again, and the daemon queues one only when it holds none (an aggregator restarted after a
    # `failed` clock sends one; it was dropped while this was still set: found by test_rejoin).
    device.standing = None
    device.state = "idle"


async def refresh_data(device: Device) -> None:
    """Read the device's data source again if it changed (a growing folder); register the new count."""
    local = device.local_data
    if local is None:
        return
    before = len(device.dataset)
    try:
        if not await asyncio.to_thread(local.refresh):
            return
        check_dataset(device.graph, local.train, str(local.path))
    except DataError as error:
        logger.error("device %s: its data changed but cannot be used (%s); training on the previous %d examples",
                     device.device_id, error, before)
        return
    device.dataset = local.train
    logger.info("device %s: its data changed: %d examples (were %d); registering the new count", device.device_id,
                len(device.dataset), before)
    if len(device.dataset) != before:
        device.registration_wanted.set()  # the aggregator weighs updates by the registered count


async def do_task(device: Device, task: Task, base: Params, base_version: int, *, clock: int | None = None) -> None:
    """Train, publish the update, and keep it until acknowledged (re-publishing on timeouts).

    Raises ``MessageError`` for a task this device cannot carry out (nothing is published).
    """
    device.client = prepare_client(task, device.client)
    await refresh_data(device)
    device.state = "training"
    started = time.perf_counter()
    paced_from = device.pace.now()
    start = device.client.starting_point(base, device.view.download)
    try:
        async with device.compute_slots:
            result = await asyncio.to_thread(train_task, device.graph, start, device.dataset, task,
                                             device.stop_training, device.client)
        # a simulated device's own speed (the simulator's hook; nothing in production)
        await device.pace.training(paced_from, result.steps, result.cpu_seconds)
    except Abandoned:
        logger.info("training of %s abandoned for shutdown", task.task_id)
        return
    except ConfigError as error:  # settings the local trainer refuses (TrainConfig)
        raise MessageError("bad_config", str(error), kind="task", field="config") from error
    finally:
        device.state = "idle"
    encoding = task.encoding
    update = Update(device.device_id, device.session, task.task_id, task.server_round, base_version,
                    result.num_examples, result.train_loss, result.delta, encoding,
                    device.view.clock if clock is None else clock, time.perf_counter() - started,
                    {"steps": result.steps, "cpu_seconds": result.cpu_seconds,
                     "model_bytes": device.model_bytes - device.model_bytes_reported})
    device.model_bytes_reported = device.model_bytes
    msg_id = new_msg_id()
    device.state = "uploading"
    device.acked.clear()
    payload = encode_message(update, device.job, Channel.UPDATE, msg_id=msg_id)
    await device.pace.transfer(len(payload))
    device.pending = Pending(msg_id, task.task_id, payload)
    if task.mode == "sync":
        device.done_tasks.add(task.task_id)
    try:
        await device.transport.publish(device._topic(Channel.UPDATE), payload, qos=1)
        device.updates_sent += 1
        attempts = 1
        while device.pending is not None and device.pending.msg_id == msg_id:
            try:
                async with asyncio.timeout(device.settings.ack_timeout):
                    await device.acked.wait()
            except TimeoutError:
                attempts += 1
                logger.warning("no acknowledgement for %s after %.0f s: re-publishing (attempt %d)",
                               task.task_id, device.settings.ack_timeout, attempts)
                await device._republish()
    finally:
        device.state = "idle"
