"""The steps, in order: each drives the device through one rule of docs/protocol.md and says
what it saw, or raises :class:`StepFailedError`."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Awaitable, Callable

from unus_edge.conformance._kit import EXAMPLES, Kit, StepFailedError
from unus_edge.messages import Ack, Heartbeat, Registration, RegistrationReply, Status, Update

__all__ = ["STEPS"]



async def _presence(kit: Kit) -> str:
    _, first = await kit.next_message((Status, Heartbeat), "status or heartbeat")
    if not isinstance(first, Status) or first.state != "online":
        raise StepFailedError(f"the first presence message was {first!r}, not a status online"[:400])
    kit.device_session = first.session
    return f"status online of session {first.session} before any heartbeat"


async def _registration(kit: Kit) -> str:
    _, registration = await kit.expect(Registration, "registration")
    if registration.model_fingerprint != kit.fingerprint:
        raise StepFailedError(f"fingerprint {registration.model_fingerprint}, the job's model is {kit.fingerprint}")
    if registration.session != kit.device_session or registration.num_examples != EXAMPLES:
        raise StepFailedError(f"session {registration.session!r} / {registration.num_examples} examples; expected "
                      f"{kit.device_session!r} / {EXAMPLES}")
    await kit.send(RegistrationReply(kit.device_id, True, kit.session, clock=0, session=registration.session))
    await kit.expect(Heartbeat, "heartbeat of the registered session", lambda h: h.session == kit.device_session)
    return f"registered with the job's fingerprint and {EXAMPLES} examples; heartbeats follow"


async def _round(kit: Kit) -> str:
    await kit.publish_model(1)
    await kit.publish_clock(1, 0, 1)
    task = kit.last_task = kit.task("1")
    await kit.send(task)
    envelope, update = await kit.expect(Update, f"update for {task.task_id}", lambda u: u.task_id == task.task_id)
    kit.check_update(update, task, 1)
    await kit.send(Ack(kit.device_id, envelope.msg_id, task.task_id, True, "", 1, 2))
    return "trained from the retained model; the update matches the model's tensors"


async def _redelivery(kit: Kit) -> str:
    assert kit.last_task is not None
    await kit.send(kit.last_task)
    await kit.quiet(Update, "a redelivered task must not be trained again")
    return f"no second update in {kit.quiet_seconds:.0f} s"


async def _republication(kit: Kit) -> str:
    task = kit.task("2")
    await kit.send(task)
    first, _ = await kit.expect(Update, f"update for {task.task_id}", lambda u: u.task_id == task.task_id)
    again, _ = await kit.expect(Update, "the same update re-published while unacknowledged",
                                lambda u: u.task_id == task.task_id, within=max(kit.timeout, 60.0))
    if again.msg_id != first.msg_id:
        raise StepFailedError(f"re-published with msg_id {again.msg_id}, first sent as {first.msg_id}: not idempotent")
    await kit.send(Ack(kit.device_id, first.msg_id, task.task_id, True, "", 2, 3))
    await kit.quiet(Update, "an acknowledged update must not be sent again")
    return "same msg_id until acknowledged, then silence"


async def _malformed(kit: Kit) -> str:
    task = kit.task("3", client=f"no-such-half-{secrets.token_hex(4)}")
    await kit.send(task)
    await kit.quiet(Update, "a task naming an unknown device half must be refused, not trained")
    await kit.expect(Heartbeat, "heartbeat after the malformed task")
    return "refused without an update; the device keeps heartbeating"


async def _refusal(kit: Kit) -> str:
    task = kit.task("4")
    await kit.send(task)
    envelope, update = await kit.expect(Update, f"update for {task.task_id}", lambda u: u.task_id == task.task_id)
    kit.check_update(update, task, 1)
    await kit.send(Ack(kit.device_id, envelope.msg_id, task.task_id, False, "stale_base", 3, 3))
    await kit.quiet(Update, "a refused update must not be re-published")
    return "the next task trained; a refusal settles the update"


async def _new_session(kit: Kit) -> str:
    await kit.announce(f"conformance-{secrets.token_hex(4)}")
    _, registration = await kit.expect(Registration, "registration with the new aggregator session")
    await kit.send(RegistrationReply(kit.device_id, True, kit.session, clock=0, session=registration.session))
    return "registered again when the aggregator's session changed"


async def _ssp(kit: Kit) -> str:
    await kit.publish_model(1)
    await kit.publish_clock(1, 0, 1)
    standing = kit.task("ssp", mode="ssp", job_seed=7)
    await kit.send(standing)
    envelope, update = await kit.expect(Update, "SSP update at clock 0", lambda u: u.task_id == standing.task_id)
    if update.clock != 0:
        raise StepFailedError(f"first SSP update at clock {update.clock}, the device is at 0")
    await kit.send(Ack(kit.device_id, envelope.msg_id, standing.task_id, True, "", 1, 2))
    await kit.publish_clock(2, 0, 1)  # the device is at 1 > c_min 0 + s 0: it must wait
    await kit.quiet(Update, "with s = 0 a device at clock 1 must wait while c_min is 0")
    await kit.publish_model(2)
    await kit.publish_clock(3, 1, 2)
    envelope, update = await kit.expect(Update, "SSP update once c_min reached 1",
                                        lambda u: u.task_id == standing.task_id)
    if update.clock != 1 or update.base_version < 2:
        raise StepFailedError(f"update at clock {update.clock} from version {update.base_version}; expected "
                               "clock 1 from version 2 or later (the clock's model_version)")
    await kit.send(Ack(kit.device_id, envelope.msg_id, standing.task_id, True, "", 2, 3))
    return "waited at c_i > c_min + s; resumed from the clock's model once c_min rose"


async def _end(kit: Kit) -> str:
    await kit.publish_clock(4, 2, 2, state="finished")
    await kit.quiet(Update, "no computation after the clock says finished")
    return "no computation after `finished`"


async def _will(kit: Kit) -> str:
    process = kit.process
    assert process is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    _, status = await kit.expect(Status, "last will (status offline) after SIGKILL",
                                 lambda s: s.state == "offline" and s.session == kit.device_session)
    return f"the broker published its will: offline ({status.reason or 'no reason'})"


STEPS: tuple[tuple[str, Callable[[Kit], Awaitable[str]]], ...] = (
    ("status before heartbeat", _presence),
    ("registration", _registration),
    ("synchronous round", _round),
    ("redelivered task", _redelivery),
    ("re-publication until acknowledged", _republication),
    ("malformed task", _malformed),
    ("refused update", _refusal),
    ("new aggregator session", _new_session),
    ("SSP clock rule", _ssp),
    ("end of the job", _end),
    ("last will", _will),
)


