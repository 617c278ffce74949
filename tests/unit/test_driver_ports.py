"""The drivers' decisions by direct calls: a plain job state and a recording outbox, no broker.

The drivers get the job's state (``JobView``) and what they may send (``Outbox``) instead of the
aggregator (``unus_edge/aggregator/_ports.py``), so a test can hand them fakes and read what
they decided to send. (That the aggregator itself is a ``JobView`` and an ``Outbox`` is checked
by mypy, where it hands itself to its driver.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tests.unit.test_service_memory import config, run
from unus_edge.aggregator import prepare_job
from unus_edge.aggregator._driver import RoundDriver
from unus_edge.aggregator._ports import Evaluate
from unus_edge.aggregator._registry import Registry
from unus_edge.aggregator._results import Counters, RoundProgress
from unus_edge.aggregator._ssp import SSPDriver
from unus_edge.config import JobConfig
from unus_edge.errors import StrategyError
from unus_edge.messages import Message, Registration, RoundMetrics, Task, Update
from unus_edge.strategies import (
    ClientUpdate,
    Failure,
    NormClipping,
    Params,
    SavableAccumulator,
    Strategy,
    WeightedMean,
)
from unus_edge.topics import Channel


@dataclass
class View:
    """A job's state as a plain object (what the aggregator holds, without the aggregator)."""

    config: JobConfig
    strategy: Strategy[Any]
    registry: Registry
    params: Params
    job: str = "test"
    session: str = "agg"
    counters: Counters = field(default_factory=Counters)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    history: list[RoundMetrics] = field(default_factory=list)
    evaluate_fn: Evaluate | None = None
    on_round: Callable[[RoundMetrics], None] | None = None
    on_progress: Callable[[RoundProgress], None] | None = None
    devices_changed: asyncio.Event = field(default_factory=asyncio.Event)
    version: int = 0
    published_version: int = 0
    server_round: int = 0
    state: str = "waiting"

    def start_training_clock(self) -> None:
        return None

    def wall_seconds(self) -> float:
        return 0.0


class RecordingOutbox:
    """Records what a driver sends; spawned work waits in ``spawned`` until the test runs it."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.sent: list[tuple[str, Message]] = []
        self.models: list[int] = []
        """The version of every model publication, in order."""
        self.clocks: list[tuple[int, int | None]] = []
        self.states = 0
        self.sent_event = asyncio.Event()
        """Publications of the retained clock and the job metrics."""
        self.spawned: list[tuple[str, Coroutine[Any, Any, object]]] = []
        self.rounds_done: list[int] = []
        self.spawn_event = asyncio.Event()
        self.driver: RoundDriver | SSPDriver | None = None

    async def send_to_device(self, device_id: str, message: Message) -> None:
        self.sent.append((device_id, message))
        self.sent_event.set()

    def post(self, device_id: str, message: Message) -> None:
        self.sent.append((device_id, message))
        self.sent_event.set()

    def round_done(self, server_round: int) -> None:
        self.rounds_done.append(server_round)

    async def evaluations_done(self, grace: float | None = None) -> None:
        return None

    async def publish(self, topic: str, channel: Channel, message: Message) -> int:
        return 0

    async def publish_model(self) -> None:
        self.models.append(self.view.version)
        self.view.published_version = self.view.version

    async def publish_state(self, reason: str = "") -> None:
        self.states += 1
        if self.driver is not None:
            c_min, bound, _ = self.driver.clock_state()
            self.clocks.append((c_min, bound))

    async def commit(self) -> None:
        return None

    def spawn(self, coroutine: Coroutine[Any, Any, object], name: str) -> None:
        self.spawned.append((name, coroutine))
        self.spawn_event.set()

    async def standing_tasks(self, count: int) -> dict[str, Task]:
        """Wait until the SSP driver spawned ``count`` standing tasks; send them."""
        while sum(name == "aggregator-ssp-task" for name, _ in self.spawned) < count:
            self.spawn_event.clear()
            await self.spawn_event.wait()
        await self.run_spawned()
        return self.tasks()

    async def run_spawned(self) -> list[str]:
        names = []
        while self.spawned:
            name, coroutine = self.spawned.pop(0)
            names.append(name)
            await coroutine
        return names

    def tasks(self) -> dict[str, Task]:
        return {device_id: message for device_id, message in self.sent if isinstance(message, Task)}


def setup(num_devices: int, **settings: Any) -> tuple[View, RecordingOutbox]:
    job_config = config(**settings)
    parts = prepare_job(job_config)
    registry = Registry(parts.fingerprint, job_config.job.heartbeat_timeout)
    for index in range(num_devices):
        registry.register(Registration(f"d{index}", f"s{index}", 100, parts.fingerprint, "test"), time.time())
    view = View(job_config, parts.strategy, registry, {k: np.array(v) for k, v in parts.params.items()})
    return view, RecordingOutbox(view)


async def start_ssp(view: View, outbox: RecordingOutbox, devices: int) -> tuple[SSPDriver, asyncio.Task[None]]:
    """An SSP driver running on ``view``, its ``devices`` standing tasks sent."""
    driver = SSPDriver(view, outbox, view.strategy)  # type: ignore[arg-type]
    outbox.driver = driver
    running = asyncio.create_task(driver.run())
    await outbox.standing_tasks(devices)
    return driver, running


async def stop_ssp(driver: SSPDriver, running: asyncio.Task[None]) -> None:
    driver.done.set()
    await running


def update(view: View, device_id: str, task_id: str, *, base_version: int = 0, clock: int = 0,
           encoding: str = "delta") -> Update:
    tensors = {name: np.zeros_like(value) for name, value in view.params.items()}
    return Update(device_id, "s", task_id, 1, base_version, 100, 0.5, tensors, encoding, clock)  # type: ignore[arg-type]


def test_a_round_is_assigned_and_its_updates_judged_without_a_broker() -> None:
    async def scenario() -> None:
        view, outbox = setup(3, job__rounds=1)
        driver = RoundDriver(view, outbox, view.strategy)
        current = await driver._start_round(1)
        tasks = outbox.tasks()
        assert sorted(tasks) == ["d0", "d1", "d2"] and view.state == "running"
        assert outbox.states == 1 and driver.round_in_progress() == 1  # operators see round 1 under way
        assert {task.model_version for task in tasks.values()} == {0}
        d0 = tasks["d0"].task_id
        assert driver.judge(update(view, "d0", "r1.0.dX")) == (
            "unassigned", "task 'r1.0.dX' is not an open assignment of this device")
        assert driver.judge(update(view, "d0", d0, base_version=3))[0] == "stale_base"  # type: ignore[index]
        assert driver.judge(update(view, "d0", d0, encoding="weights"))[0] == "bad_encoding"  # type: ignore[index]
        assert driver.judge(update(view, "d0", d0)) is None
        driver.apply("m0", update(view, "d0", d0))
        assert driver.judge(update(view, "d0", d0))[0] == "already_applied"  # type: ignore[index]
        assert list(current.accepted) == ["d0"] and driver.round_changed.is_set()
        driver.device_offline("d1", "heartbeat timeout")
        assert "d1" in current.failures

    run(scenario)


def test_a_device_back_mid_round_gets_its_task_again() -> None:
    async def scenario() -> None:
        view, outbox = setup(2)
        driver = RoundDriver(view, outbox, view.strategy)
        await driver._start_round(1)
        first = outbox.tasks()["d1"]
        outbox.sent.clear()
        driver.device_joined("d1")
        assert await outbox.run_spawned() == ["aggregator-task-resend"]
        assert outbox.tasks() == {"d1": first}

    run(scenario)


@pytest.mark.parametrize("bound", ["0", "1"])
def test_ssp_publishes_a_model_only_when_someone_may_start_from_it(bound: str) -> None:
    async def scenario() -> None:
        view, outbox = setup(2, job__mode="ssp", job__staleness_bound=bound, job__rounds=5)
        driver, running = await start_ssp(view, outbox, 2)
        task_id = outbox.tasks()["d0"].task_id
        # d0 reports its first clock; d1 has not. With s = 0, d0 (now at clock 1) may not start
        # again until c_min rises, so no model goes out; with s = 1 it may, so one does.
        assert driver.judge(update(view, "d0", task_id, clock=1)) == ("bad_clock", "clock 1 is ahead of the device's 0")
        assert driver.judge(update(view, "d0", task_id, clock=0)) is None
        view.registry.get("d0").clock += 1  # type: ignore[union-attr]  # what on_update does before apply
        driver.apply("m0", update(view, "d0", task_id, clock=0))
        await outbox.run_spawned()
        assert outbox.models == ([] if bound == "0" else [view.version])
        # d1 reports: c_min rises to 1, and the model (which holds both clocks-0 updates) goes out.
        d1_task = outbox.tasks()["d1"].task_id
        view.registry.get("d1").clock += 1  # type: ignore[union-attr]
        driver.apply("m1", update(view, "d1", d1_task, clock=0))
        assert driver.c_min == 1
        await outbox.run_spawned()
        assert outbox.models[-1] == view.version and outbox.clocks[-1] == (1, int(bound))
        await stop_ssp(driver, running)

    run(scenario)


def test_the_ssp_clock_never_names_a_c_min_the_retained_model_does_not_hold() -> None:
    async def scenario() -> None:
        view, outbox = setup(2, job__mode="ssp", job__staleness_bound="0", job__rounds=5)
        driver, running = await start_ssp(view, outbox, 2)
        for index, device_id in enumerate(("d0", "d1")):
            view.registry.get(device_id).clock += 1  # type: ignore[union-attr]
            driver.apply(f"m{index}", update(view, device_id, outbox.tasks()[device_id].task_id))
        assert driver.c_min == 1
        assert driver.clock_state()[0] == 0  # the model of c_min 1 is not published yet
        await outbox.run_spawned()
        assert driver.clock_state()[0] == 1  # now it is
        await stop_ssp(driver, running)

    run(scenario)


def test_an_ssp_device_that_rejoins_starts_at_c_min_and_gets_its_task() -> None:
    async def scenario() -> None:
        view, outbox = setup(3, job__mode="ssp", job__staleness_bound="2", job__rounds=5)
        driver, running = await start_ssp(view, outbox, 3)
        view.registry.status("d2", False, "s2", time.time())
        driver.device_offline("d2", "will")
        for device_id in ("d0", "d1"):
            view.registry.get(device_id).clock += 1  # type: ignore[union-attr]
            driver.apply(f"m-{device_id}", update(view, device_id, outbox.tasks()[device_id].task_id))
        await outbox.run_spawned()
        assert driver.c_min == 1  # d2 left: nobody waits for it
        outbox.sent.clear()
        view.registry.status("d2", True, "s2", time.time())
        driver.device_joined("d2")
        assert view.registry.get("d2").clock == 1  # type: ignore[union-attr]
        assert list(outbox.tasks()) == []  # the task goes out through a spawned send
        await outbox.run_spawned()
        assert list(outbox.tasks()) == ["d2"]
        await stop_ssp(driver, running)

    run(scenario)


def test_a_round_takes_the_encoding_its_task_asked_for() -> None:
    """One place decides the encoding (``Task.encoding``): the device uploads what the task asks,
    and the round judges the update against the same task (sync rounds refused weights before)."""
    from dataclasses import replace

    from unus_edge.strategies import Assignment, DeviceInfo, FedAvg, RoundContext

    class WeightsFedAvg(FedAvg):
        def configure_round(self, context: RoundContext, devices: list[DeviceInfo]) -> list[Assignment]:
            return [replace(a, config={**a.config, "encoding": "weights"})
                    for a in super().configure_round(context, devices)]

    async def scenario() -> None:
        view, outbox = setup(1)
        view.strategy = WeightsFedAvg()
        driver = RoundDriver(view, outbox, view.strategy)
        await driver._start_round(1)
        task = outbox.tasks()["d0"]
        assert task.encoding == "weights"
        assert driver.judge(update(view, "d0", task.task_id, encoding="weights")) is None
        assert driver.judge(update(view, "d0", task.task_id)) == ("bad_encoding", "the task asked for weights")

    run(scenario)


def test_an_ssp_update_counts_only_under_a_standing_task_the_driver_handed_out() -> None:
    """The standing task's id was ``ssp.<session>.<device>``, recognised by its shape, so any
    device could name one; now it is random, and the driver keeps each device's recent ones."""

    async def scenario() -> None:
        view, outbox = setup(1, job__mode="ssp", job__staleness_bound="inf", job__rounds=5)
        driver, running = await start_ssp(view, outbox, 1)
        first = outbox.tasks()["d0"].task_id
        assert first not in (f"ssp.{view.session}.d0", "ssp.agg.d0")
        assert driver.judge(update(view, "d0", f"ssp.{view.session}.d0"))[0] == "unassigned"  # type: ignore[index]
        assert driver.judge(update(view, "d0", first)) is None
        outbox.sent.clear()
        driver.device_joined("d0")  # a rejoin: a new standing task
        await outbox.run_spawned()
        second = outbox.tasks()["d0"].task_id
        assert second != first
        assert driver.judge(update(view, "d0", first)) is None  # an update sent before the rejoin still counts
        state, _ = driver.state()
        assert state["standing"] == {"d0": [first, second]}  # and over a restart, through the checkpoint
        await stop_ssp(driver, running)

    run(scenario)


def test_round_task_ids_carry_a_nonce_and_survive_a_restore() -> None:
    """``r5.0.pi-002`` was guessable (issue 14): a device could relabel an old update as this round's."""

    async def scenario() -> None:
        view, outbox = setup(2)
        driver = RoundDriver(view, outbox, view.strategy)
        await driver._start_round(1)
        ids = {device_id: task.task_id for device_id, task in outbox.tasks().items()}
        assert ids["d0"] != "r1.0.d0" and ids["d0"].startswith("r1.0.") and ids["d0"].endswith(".d0")
        assert driver.judge(update(view, "d1", "r1.0.d1"))[0] == "unassigned"  # type: ignore[index]
        state, tensors = driver.state()
        restored = RoundDriver(view, RecordingOutbox(view), view.strategy)
        restored.restore(state, tensors)
        restored.device_joined("d1")  # the task re-sent after a restart is the same assignment
        await restored.outbox.run_spawned()  # type: ignore[attr-defined]
        assert restored.outbox.tasks()["d1"].task_id == ids["d1"]  # type: ignore[attr-defined]
        assert restored.judge(update(view, "d1", ids["d1"])) is None

    run(scenario)


class Tally:
    """An accumulator that only counts: an ``Accumulator`` that cannot be saved."""

    def __init__(self) -> None:
        self.count = 0
        self.num_examples = 0

    def add(self, update: ClientUpdate) -> None:
        self.count += 1
        self.num_examples += update.num_examples

    @property
    def train_loss(self) -> float | None:
        return None


class KeepModel(Strategy[Tally]):
    """A strategy generic over its own accumulator type: its ``aggregate`` gets a ``Tally``."""

    name = "keep"

    def new_accumulator(self, server_round: int, global_params: Params) -> Tally:
        return Tally()

    def aggregate(self, server_round: int, global_params: Params, accumulator: Tally,
                  failures: Sequence[Failure]) -> Params | None:
        assert isinstance(accumulator, Tally)
        return None


def test_a_round_with_an_accumulator_that_cannot_be_saved_is_not_checkpointed_and_reports_its_totals() -> None:
    async def scenario() -> None:
        view, outbox = setup(1, job__rounds=1)
        view.strategy = KeepModel()
        driver = RoundDriver(view, outbox, view.strategy)
        outbox.driver = driver
        await driver._start_round(1)
        task = outbox.tasks()["d0"]
        assert not isinstance(driver.accumulator, SavableAccumulator)
        driver.apply("m0", update(view, "d0", task.task_id))
        state, _ = driver.state()
        assert "round" not in state  # nothing to save it with: a restart runs the round again
        await driver._aggregate(driver.current_round)  # type: ignore[arg-type]
        assert view.history[-1].num_examples == 100 and view.history[-1].train_loss is None
        assert isinstance(WeightedMean(view.params), SavableAccumulator)

    run(scenario)


def test_norm_clipping_refuses_an_inner_accumulator_it_could_not_save() -> None:
    with pytest.raises(StrategyError, match="cannot clip into Tally"):
        NormClipping(Tally(), 1.0)


def test_a_round_without_updates_is_retried_with_the_device_that_came_back() -> None:
    """Issue 14: with min_fraction 0 a round of 0/4 updates counted and the job went on. Now the
    quorum is at least one update: the retry asks the device that went offline and came back,
    with a new task of the retry."""

    async def scenario() -> None:
        view, outbox = setup(1, job__rounds=1, job__round_deadline=30, job__min_fraction=0)
        driver = RoundDriver(view, outbox, view.strategy)
        outbox.driver = driver
        current = await driver._start_round(1)
        first = outbox.tasks()["d0"]
        driver.device_offline("d0", "will")  # its will: offline mid-round, the round has no one left
        view.registry.status("d0", True, "s0", time.time())  # and it is back
        outbox.sent_event.clear()
        finishing = asyncio.create_task(driver._finish_round(current))
        await outbox.sent_event.wait()  # the retry's task
        second = outbox.tasks()["d0"]
        assert second.task_id != first.task_id and second.task_id.startswith("r1.1.")
        assert not view.history  # the empty attempt did not count as a round
        driver.apply("m1", update(view, "d0", second.task_id))
        await finishing
        assert view.history[-1].num_updates == 1

    run(scenario)


def test_an_empty_round_counts_only_when_the_job_allows_it() -> None:
    async def scenario() -> None:
        view, outbox = setup(1, job__rounds=1, job__round_deadline=30, job__allow_empty_rounds="true")
        driver = RoundDriver(view, outbox, view.strategy)
        outbox.driver = driver
        current = await driver._start_round(1)
        driver.device_offline("d0", "will")
        await driver._finish_round(current)
        assert view.history[-1].num_updates == 0 and current.attempt == 0

    run(scenario)


def test_devices_that_time_out_are_logged_with_the_numbers_for_the_deadline(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        view, outbox = setup(2, job__rounds=1, job__round_deadline=0.05, job__max_retries=0)
        driver = RoundDriver(view, outbox, view.strategy)
        outbox.driver = driver
        current = await driver._start_round(1)
        task = outbox.tasks()["d0"]
        driver.apply("m0", dataclasses.replace(update(view, "d0", task.task_id), train_seconds=42.0))
        await driver._finish_round(current)  # d1 never answers: the deadline passes

    with caplog.at_level(logging.WARNING, logger="unus_edge.aggregator"):
        run(scenario)
    warning = next(r.getMessage() for r in caplog.records if "timed out" in r.getMessage())
    assert "1 device(s) timed out after job.round_deadline = 0.05 s" in warning
    assert "the 1 that answered trained for up to 42 s" in warning and "raise job.round_deadline" in warning
