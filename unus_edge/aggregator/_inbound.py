"""What the aggregator does with inbound messages: registrations, updates, presence and liveness.

Procedures over the :class:`~unus_edge.aggregator._ports.Inbound` port (the aggregator, which
owns the state, receives, dispatches and counts every message, satisfies it), not over the
service itself: what they may touch is declared there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from unus_edge import topics
from unus_edge.aggregator._ports import Inbound
from unus_edge.aggregator._round import check_tensors
from unus_edge.codec import SCHEMA_VERSION, Envelope
from unus_edge.errors import CodecError, ProtocolError
from unus_edge.messages import (
    Ack,
    EvaluationResult,
    Heartbeat,
    Registration,
    RegistrationReply,
    Status,
    Update,
    decode_message,
)
from unus_edge.topics import Channel

__all__ = ["liveness", "on_evaluation", "on_presence", "on_registration", "on_update", "receive",
           "refuse_registration"]

logger = logging.getLogger("unus_edge.aggregator")

_INBOUND = {Channel.STATUS, Channel.HEARTBEAT, Channel.REGISTER, Channel.UPDATE}


async def receive(service: Inbound) -> None:
    """Read the devices' topics: check the topic, decode within limits, check the job and the
    sender's identity, then hand each message to its handler. Every message is counted once."""
    async for message in service.transport.messages():
        service.counters.inbound += 1
        try:
            parsed = topics.parse(message.topic)
        except ProtocolError as error:
            service.reject("bad_topic", error.detail)
            continue
        if parsed.job != service.job or parsed.channel not in _INBOUND:
            service.counters.ignored += 1  # not ours (a broker may leak retained topics: docs/brokers.md)
            continue
        try:
            envelope, decoded = decode_message(message.payload, parsed.channel, limits=service.limits)
        except ProtocolError as error:
            service.reject(error.reason, error.detail, parsed.device_id)
            if parsed.channel is Channel.REGISTER and isinstance(error, CodecError):
                refuse_registration(service, parsed.device_id, error)
            continue
        if envelope.job != service.job:
            service.reject("wrong_job", f"payload names job {envelope.job!r}", parsed.device_id)
            continue
        if not isinstance(decoded, Update | Registration | Heartbeat | Status | EvaluationResult):
            service.counters.ignored += 1  # a kind the devices' channels do not carry
            continue
        if decoded.device_id != parsed.device_id:
            service.reject("identity_mismatch", f"topic says {parsed.device_id!r}, payload {decoded.device_id!r}",
                           parsed.device_id)
            continue
        if isinstance(decoded, Update):
            service.counters.bytes_up += len(message.payload)
            on_update(service, envelope, decoded)
        elif isinstance(decoded, Registration):
            on_registration(service, decoded, time.time())
        elif isinstance(decoded, EvaluationResult):
            on_evaluation(service, decoded)
        else:
            on_presence(service, decoded, time.time())


def on_evaluation(service: Inbound, result: EvaluationResult) -> None:
    """A device's federated-evaluation answer: from its registered session, to a request it got."""
    record = service.registry.get(result.device_id)
    if record is None or record.session != result.session:
        service.reject("unregistered", "an evaluation from a session that is not registered", result.device_id)
        return
    reason = service.federated.on_result(result)
    if reason is not None:
        service.reject(reason, f"evaluation {result.task_id}", result.device_id)


def on_registration(service: Inbound, registration: Registration, now: float) -> None:
    """Accept or refuse a registration and answer it on the device's tasks topic."""
    verdict = service.registry.register(registration, now)
    if verdict.accepted:
        service.counters.accepted += 1
        logger.info("device %s registered (%d examples, %s)", registration.device_id,
                    registration.num_examples, registration.platform or "unknown platform")
        service.registry_updated()
        service.driver.device_joined(registration.device_id)  # may move its clock (SSP rejoin)
    else:
        service.reject(verdict.reason, verdict.detail, registration.device_id)
    record = service.registry.get(registration.device_id)
    reply = RegistrationReply(registration.device_id, verdict.accepted, service.session, verdict.reason,
                              verdict.detail, record.clock if record else 0, registration.session)
    service.post(registration.device_id, reply)


def refuse_registration(service: Inbound, device_id: str, error: CodecError) -> None:
    """A registration in another schema: tell the device why (it may be able to read it)."""
    if error.reason != "unsupported_schema":
        return
    reply = RegistrationReply(device_id, False, service.session, "schema_version",
                              f"the aggregator speaks schema {SCHEMA_VERSION}: {error.detail}")
    service.post(device_id, reply)


def on_update(service: Inbound, envelope: Envelope, update: Update) -> None:
    """Judge an update; apply it (acknowledged after the next commit) or refuse it (at once)."""
    known = service.dedup.get(envelope.msg_id)
    if known is not None:  # a redelivery or re-publication: same verdict, never applied twice
        service.counters.rejected["duplicate"] += 1
        if envelope.msg_id not in service.committer.pending_ids:  # else its acknowledgement follows its commit
            service.ack(update, envelope.msg_id, known[0], known[1])
        return
    model_bytes = update.metrics.get("model_bytes")  # what reached the device since its last update
    if isinstance(model_bytes, int) and not isinstance(model_bytes, bool) and model_bytes > 0:
        service.counters.bytes_down += model_bytes
    verdict: tuple[str, str] | None
    registered = service.registry.get(update.device_id)
    if registered is None:
        verdict = "unregistered", "the device has not registered"
    else:
        verdict = service.driver.judge(update) or check_tensors(update.tensors, service.params,
                                                             max_norm=service.config.job.max_update_norm)
        if verdict is None and update.num_examples > registered.num_examples:
            # The weight is self-reported: bound it by the registration's claim (issue 14).
            if service.config.job.weight_policy == "refuse":
                verdict = "weight_mismatch", (f"claims {update.num_examples} examples, registered with "
                                              f"{registered.num_examples}")
            else:
                logger.warning("update %s of %s claims %d examples, registered with %d: weight capped",
                               envelope.msg_id, update.device_id, update.num_examples, registered.num_examples)
                update = dataclasses.replace(update, num_examples=registered.num_examples)
    if verdict is not None:
        reason, detail = verdict
        service.reject(reason, detail, update.device_id)
        service.counters.refused += 1
        service.dedup.remember(envelope.msg_id, False, reason)
        service.ack(update, envelope.msg_id, False, reason)
        return
    service.registry.contributed(update.device_id, update.train_loss)
    service.counters.accepted += 1
    step = service.server_round + 1 if service.config.job.mode == "sync" else update.clock
    clock, version = service.driver.apply(envelope.msg_id, update)
    service.dedup.remember(envelope.msg_id, True)
    # Acknowledged once durable: the next commit writes a checkpoint holding this update.
    service.committer.add(Ack(update.device_id, envelope.msg_id, update.task_id, True, "", clock, version), {
        "msg_id": envelope.msg_id, "device_id": update.device_id, "task_id": update.task_id, "step": step,
        "base_version": update.base_version, "version": version, "session": service.session,
    })


def on_presence(service: Inbound, presence: Heartbeat | Status, now: float) -> None:
    """A status or heartbeat: presence of a registered session, routine noise, or a stray heartbeat.

    Only the registered session's presence counts. A device publishes its status before it
    registers, and its last will may arrive after its next process registered, so a status of
    another session is ignored (and remembered as announced). So is a heartbeat of an announced
    session (a device between its start and its registration). A heartbeat of a session that
    never announced itself on its status topic is refused: ``unregistered`` (unknown device) or
    ``stale_session`` (a registered device, another session).
    """
    registry = service.registry
    if isinstance(presence, Status):
        registry.announce(presence.device_id, presence.session)
    record = registry.get(presence.device_id)
    if record is None or presence.session != record.session:
        if isinstance(presence, Status) or registry.announced(presence.device_id, presence.session):
            service.counters.ignored += 1
        else:
            service.reject("unregistered" if record is None else "stale_session",
                           f"a heartbeat of session {presence.session!r}, neither registered nor announced",
                           presence.device_id)
        return
    service.counters.accepted += 1
    if isinstance(presence, Heartbeat):
        if registry.heartbeat(presence.device_id, presence.session, now):  # back online (e.g. after a timeout)
            service.registry_updated()
            service.driver.device_joined(presence.device_id)
    elif registry.status(presence.device_id, presence.state == "online", presence.session, now):
        service.registry_updated()
        if presence.state == "offline":
            service.driver.device_offline(presence.device_id, presence.reason or "offline")
        else:  # back online (a reconnection after its will said offline): it rejoins, as on a heartbeat
            service.driver.device_joined(presence.device_id)


async def liveness(service: Inbound) -> None:
    """Mark devices offline when their heartbeats stop (a timer on the next expiry, no polling)."""
    while True:
        deadline = service.registry.next_expiry()
        delay = None if deadline is None else max(0.0, deadline - time.time()) + 0.01
        service.registry_changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await service.registry_changed.wait()
        expired = service.registry.expire(time.time())
        for device_id in expired:
            logger.warning("device %s missed its heartbeats for %.0f s: offline", device_id,
                           service.registry.heartbeat_timeout)
            service.driver.device_offline(device_id, "heartbeat timeout")
        if expired:
            service.fleet.mark()
