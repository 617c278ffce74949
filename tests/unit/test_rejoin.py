"""A device that the aggregator lost track of comes back: after a restart that followed a
``failed`` clock, after its last will said offline, and after an ``unassigned`` refusal.

Found by the protocol review (docs/open-work.md): a stopped aggregator's ``failed`` clock made
SSP devices give the job up for good, a ``status: online`` brought a device back without a task,
and an SSP device whose standing task was refused as ``unassigned`` computed again with it forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.unit.test_durability import ScriptedDevice
from tests.unit.test_service_memory import aggregator_online, config, make_device, run, run_device, shards
from unus_edge.aggregator import Aggregator, JobResult, prepare_job
from unus_edge.config import JobConfig
from unus_edge.device import Device
from unus_edge.device._worker import Pending, run_ssp
from unus_edge.messages import Ack, Status, Task
from unus_edge.topics import Channel
from unus_edge.transport import MemoryBroker, MemoryTransport


def _aggregator(broker: MemoryBroker, settings: JobConfig, session: str, *, resume: bool) -> Aggregator:
    parts = prepare_job(settings)
    transport = MemoryTransport(broker, Aggregator.connect_options(settings, session))
    return Aggregator(settings, transport, params=parts.params, fingerprint=parts.fingerprint,
                      strategy=parts.strategy, evaluate=parts.evaluate, session=session, resume=resume)


async def _acknowledged(device: Device, count: int) -> None:
    """Until ``count`` of the device's updates were answered (each answer sets ``acked``)."""
    answered = 0
    while answered < count:
        await device.acked.wait()
        device.acked.clear()
        answered += 1


def test_an_ssp_daemon_trains_for_the_restarted_aggregator_after_a_failed_clock(tmp_path: Path) -> None:
    async def scenario() -> tuple[JobResult, JobResult, int]:
        broker = MemoryBroker()
        settings = config(job__mode="ssp", strategy__name="ssp", job__rounds=5, job__staleness_bound="inf",
                          job__min_devices=1, evaluation__dataset="none", checkpoint__dir=str(tmp_path))
        device = make_device(broker, "d0", shards(1)[0])
        device.exit_when_finished = False  # a systemd daemon: it outlives the aggregator's runs
        running = asyncio.create_task(run_device(device))
        first = _aggregator(broker, settings, "agg-1", resume=False)
        async with first.transport:
            job = asyncio.create_task(first.run())
            await _acknowledged(device, 2)
            first.shutdown_trigger.set()  # an operator stops it before the end: the clock says failed
            stopped = await job
        assert device.view.job_over  # the daemon saw the failed clock
        second = _aggregator(broker, settings, "agg-2", resume=True)
        async with second.transport:
            finished = await second.run()
        sent = device.updates_sent
        device.shutdown_trigger.set()
        await running
        return stopped, finished, sent

    stopped, finished, sent = run(scenario, timeout=40)
    assert stopped.state == "stopped"  # and its clock said `failed`, which the daemon saw
    assert finished.state == "finished"  # the daemon carried the job to its end for the new session
    assert sent >= 5


def test_a_status_online_after_the_will_gives_an_ssp_device_a_new_standing_task() -> None:
    async def scenario() -> tuple[Task, Task]:
        broker = MemoryBroker()
        settings = config(job__mode="ssp", strategy__name="ssp", job__rounds=3, job__staleness_bound="inf",
                          job__min_devices=1, evaluation__dataset="none")
        aggregator = _aggregator(broker, settings, "agg", resume=False)
        device = ScriptedDevice(broker, "d0")
        async with aggregator.transport:
            job = asyncio.create_task(aggregator.run())
            await aggregator_online(broker)
            await device.start(aggregator.fingerprint)
            first = await device.next(Task)
            await device.send(Channel.STATUS, Status("d0", "offline", "s", reason="connection lost"))  # its will
            await device.send(Channel.STATUS, Status("d0", "online", "s"))  # reconnected, same session
            async with asyncio.timeout(10):
                second = await device.next(Task)
            aggregator.shutdown_trigger.set()
            await job
        if device.listener:
            device.listener.cancel()
        assert isinstance(first, Task) and isinstance(second, Task)
        return first, second

    first, second = run(scenario)
    assert first.mode == second.mode == "ssp"
    assert second.task_id != first.task_id  # a fresh standing task: its updates count again


def test_an_unassigned_standing_task_is_dropped_and_the_device_registers_again() -> None:
    device = make_device(MemoryBroker(), "d0", shards(1)[0])
    standing = Task("d0", "ssp.0123456789abcdef.d0", 0, 0, 1, 10, 0.1, mode="ssp")
    device.standing = standing
    device.registration_wanted.clear()
    other = Ack("d0", "m1", "ssp.fedcba9876543210.d0", False, "unassigned", 0, 0)
    device.pending = Pending("m1", other.task_id, b"")
    device._on_ack(other)
    assert device.standing is standing and not device.registration_wanted.is_set()  # not about this task
    device.pending = Pending("m2", standing.task_id, b"")
    device._on_ack(Ack("d0", "m2", standing.task_id, False, "unassigned", 0, 0))
    assert device.standing is None
    assert device.registration_wanted.is_set()


def test_an_ssp_loop_that_ended_lets_the_next_standing_task_start_it_again() -> None:
    """The timeout of the first test in one full run: the daemon's SSP loop ended on the `failed`
    clock but kept its standing task, so the restarted aggregator's standing task replaced it
    without being queued, and nothing trained (whether the loop had ended first was a race)."""

    async def scenario() -> None:
        device = make_device(MemoryBroker(), "d0", shards(1)[0])
        device.view.follow("agg-1")
        device.standing = Task("d0", "ssp.00000000000000aa.d0", 0, 0, 1, 10, 0.1, mode="ssp")
        device.view.job_over = True  # the failed clock of agg-1
        await run_ssp(device)  # ends at once: the job is over
        assert device.standing is None and device.tasks.empty()
        device.view.follow("agg-2")
        device._dispatch(Task("d0", "ssp.00000000000000bb.d0", 0, 0, 1, 10, 0.1, mode="ssp"))
        assert device.tasks.qsize() == 1  # queued: the worker starts the SSP loop again

    run(scenario)
