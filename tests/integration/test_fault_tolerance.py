"""Dropped devices over a real amqtt broker: round deadline, quorum and retries, half-open links.

The aggregator and the devices run in this process and speak MQTT to an embedded amqtt broker
on loopback. A *silent* device registers with the right model and then never answers its
tasks; a *held* device is a real device whose link goes half-open (the fault proxy forwards
nothing, the socket stays open). A recording FedAvg shows what the engine handed the strategy.

* the round deadline: what arrived is aggregated, the silent device is a ``timeout`` failure;
* the quorum (``job.min_fraction``): the round is retried with newly selected devices, up to
  ``job.max_retries``, then the job fails with an error that says how many answered;
* half-open detection on amqtt, which never enforces keepalive: only the application
  heartbeats (``job.heartbeat_timeout``) notice, and the round goes on without the device.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tests.brokers import AmqttBroker
from unus_edge import topics
from unus_edge.aggregator import Aggregator, JobResult, prepare_job
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings, JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device import run_device
from unus_edge.faults import FaultProxy
from unus_edge.messages import (
    Registration,
    RegistrationReply,
    RoundMetrics,
    Status,
    Task,
    decode_message,
    encode_message,
)
from unus_edge.strategies import Assignment, ClientUpdate, DeviceInfo, Failure, FedAvg, RoundContext, WeightedMean
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MqttTransport

JOB = "faults"
ROUND_DEADLINE = 3.0
"""Short: the tests wait for it. The real devices answer a logistic regression task in milliseconds."""
TIMEOUT = 120
"""Generous: the machine may be busy. Nothing waits for it unless something is broken."""


def job_config(url: str, **settings: object) -> JobConfig:
    overrides = [f"job.name={JOB}", "job.rounds=1", "job.fraction=1.0", f"job.round_deadline={ROUND_DEADLINE}",
                 "job.heartbeat_timeout=60", "job.wait_for_devices=60", "model.source=logreg",
                 "evaluation.dataset=none", "train.batch_size=20", "train.learning_rate=0.1", f"broker.url={url}"]
    overrides += [f"{key.replace('__', '.')}={value}" for key, value in settings.items()]
    return load_job_config(environ={}, overrides=overrides)


class RecordingMean(WeightedMean):
    def __init__(self, template: Any) -> None:
        super().__init__(template)
        self.devices: list[str] = []

    def add(self, update: ClientUpdate) -> None:
        super().add(update)
        self.devices.append(update.device_id)


class RecordingFedAvg(FedAvg):
    """FedAvg that records its selections and what it aggregates, with the failures it is given.

    ``first`` imposes the first selection (so that a known device is silent); ``on_first_round``
    runs when the first round is configured, before any task is sent.
    """

    def __init__(self, first: Sequence[str] = (), on_first_round: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.first = list(first)
        self.on_first_round = on_first_round
        self.selections: list[tuple[int, list[str], list[str]]] = []
        self.aggregated: list[tuple[int, list[str], list[Failure]]] = []

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        if self.first and not self.selections:
            chosen = [Assignment(d, context.epochs, context.batch_size, context.learning_rate) for d in self.first]
        else:
            chosen = super().configure_round(context, devices)
        self.selections.append((context.server_round, sorted(d.device_id for d in devices),
                                [a.device_id for a in chosen]))
        if self.on_first_round is not None and len(self.selections) == 1:
            self.on_first_round()
        return chosen

    def new_accumulator(self, server_round: int, global_params: Any) -> RecordingMean:
        return RecordingMean(global_params)

    def aggregate(self, server_round: int, global_params: Any, accumulator: Any,
                  failures: Sequence[Failure]) -> Any:
        self.aggregated.append((server_round, sorted(accumulator.devices), list(failures)))
        return super().aggregate(server_round, global_params, accumulator, failures)


TIMED_OUT = "timeout", "no update before the round deadline"


@dataclass
class SilentDevice:
    """Registers with the job's model, then never answers; records the tasks it is given."""

    device_id: str
    tasks: list[Task] = field(default_factory=list)


@contextlib.asynccontextmanager
async def silent_device(port: int, device_id: str, fingerprint: str) -> AsyncIterator[SilentDevice]:
    device = SilentDevice(device_id)
    session = f"silent-{device_id}"
    aggregator_online, registered = asyncio.Event(), asyncio.Event()
    async with MqttTransport(ConnectOptions(port=port, client_id=f"silent-{JOB}-{device_id}")) as transport:

        async def listen() -> None:
            async for message in transport.messages():
                _, decoded = decode_message(message.payload, topics.parse(message.topic).channel)
                if isinstance(decoded, Status) and decoded.state == "online":
                    aggregator_online.set()
                elif isinstance(decoded, RegistrationReply) and decoded.accepted:
                    registered.set()
                elif isinstance(decoded, Task):
                    device.tasks.append(decoded)

        listener = asyncio.create_task(listen())
        try:
            await transport.subscribe(topics.device_topic(JOB, device_id, Channel.TASKS), qos=1)
            await transport.subscribe(topics.aggregator_status(JOB), qos=1)
            await aggregator_online.wait()  # as a real device: register once the aggregator listens
            await transport.publish(topics.device_topic(JOB, device_id, Channel.STATUS),
                                    encode_message(Status(device_id, "online", session), JOB, Channel.STATUS),
                                    qos=1, retain=True)
            await transport.publish(topics.device_topic(JOB, device_id, Channel.REGISTER),
                                    encode_message(Registration(device_id, session, 100, fingerprint, "test"), JOB,
                                                   Channel.REGISTER), qos=1)
            await registered.wait()
            yield device
        finally:
            listener.cancel()


def shards(count: int) -> list[Dataset]:
    data = load_dataset("synthetic", "train", seed=0, num_examples=200 * count)
    return [Dataset(data.x[i], data.y[i], data.num_classes) for i in partition(data.y, count, "iid", seed=0)]


def device_config(url: str, device_id: str, heartbeat_interval: float = 0.5) -> DeviceConfig:
    return DeviceConfig(DeviceSettings(id=device_id, job=JOB, data="-", model="logreg",
                                       heartbeat_interval=heartbeat_interval), BrokerSettings(url=url))


def make_aggregator(config: JobConfig, strategy: RecordingFedAvg,
                    on_round: Callable[[RoundMetrics], None] | None = None) -> Aggregator:
    parts = prepare_job(config)
    transport = MqttTransport(Aggregator.connect_options(config, "agg"))
    return Aggregator(config, transport, params=parts.params, fingerprint=parts.fingerprint, strategy=strategy,
                      session="agg", resume=False, on_round=on_round)


@dataclass
class Outcome:
    result: JobResult
    aggregator: Aggregator
    strategy: RecordingFedAvg
    silent: dict[str, SilentDevice]


async def run_job(strategy: RecordingFedAvg, silent: Sequence[str], devices: Sequence[str],
                  **settings: object) -> Outcome:
    """A job over a fresh amqtt broker with silent devices first, then real ones (that exit with it)."""
    broker = AmqttBroker()
    await broker.start()
    try:
        async with asyncio.timeout(TIMEOUT):
            config = job_config(broker.url, job__min_devices=len(silent) + len(devices), **settings)
            aggregator = make_aggregator(config, strategy)
            async with aggregator.transport, contextlib.AsyncExitStack() as stack:
                job = asyncio.create_task(aggregator.run())
                quiet = {d: await stack.enter_async_context(silent_device(broker.port, d, aggregator.fingerprint))
                         for d in silent}
                real = [asyncio.create_task(run_device(device_config(broker.url, d), dataset=shard,
                                                       exit_when_finished=True))
                        for d, shard in zip(devices, shards(len(devices)), strict=True)]
                result = await job
                await asyncio.gather(*real)
            return Outcome(result, aggregator, strategy, quiet)
    finally:
        await broker.stop()


# ------------------------------------------------------------------------------ round deadline


def test_the_deadline_aggregates_what_arrived_and_hands_the_failures_to_the_strategy() -> None:
    outcome = asyncio.run(run_job(RecordingFedAvg(), silent=["mute"], devices=["d0", "d1"]))
    result, strategy = outcome.result, outcome.strategy
    assert result.state == "finished", result.reason
    assert strategy.selections == [(1, ["d0", "d1", "mute"], ["d0", "d1", "mute"])]
    [task] = outcome.silent["mute"].tasks  # it was given its task, and kept quiet
    assert task.deadline_seconds == ROUND_DEADLINE
    assert strategy.aggregated == [(1, ["d0", "d1"], [Failure("mute", *TIMED_OUT)])]
    [metrics] = result.history
    assert (metrics.num_selected, metrics.num_updates, metrics.num_failures) == (3, 2, 1)
    assert metrics.duration_seconds >= ROUND_DEADLINE * 0.9  # the round waited for the deadline ...
    assert result.version == 1  # ... and then applied what had arrived
    assert result.rejected == {}  # the devices' start-up presence is routine, not a refusal


# ------------------------------------------------------------------------------ quorum and retries


def test_below_quorum_the_round_is_retried_with_new_devices() -> None:
    strategy = RecordingFedAvg(first=["d0", "mute"])
    outcome = asyncio.run(run_job(strategy, silent=["mute"], devices=["d0", "d1"], job__min_fraction=1.0,
                                  job__max_retries=2))
    result = outcome.result
    assert result.state == "finished", result.reason
    # d0 answered, mute did not: 1 of 2 is below the quorum of 2, so the round took d1 as well.
    assert strategy.selections == [(1, ["d0", "d1", "mute"], ["d0", "mute"]), (1, ["d1"], ["d1"])]
    assert strategy.aggregated == [(1, ["d0", "d1"], [Failure("mute", *TIMED_OUT)])]
    [metrics] = result.history
    assert (metrics.num_selected, metrics.num_updates, metrics.num_failures) == (3, 2, 1)
    assert result.version == 1
    assert result.rejected == {}


def test_a_quorum_still_missed_after_the_retries_fails_the_job_with_a_clear_error() -> None:
    strategy = RecordingFedAvg(first=["d0", "mute-a"])
    outcome = asyncio.run(run_job(strategy, silent=["mute-a", "mute-b"], devices=["d0"], job__min_fraction=1.0,
                                  job__max_retries=1))
    result = outcome.result
    assert result.state == "failed"
    assert "round 1: 1 of 2 selected devices answered, below the quorum of 2" in result.reason
    assert "gave up after 1 retries" in result.reason
    # The retry selected the only device left, which was silent too.
    assert strategy.selections == [(1, ["d0", "mute-a", "mute-b"], ["d0", "mute-a"]),
                                   (1, ["mute-b"], ["mute-b"])]
    (retry,) = [task.task_id for task in outcome.silent["mute-b"].tasks]
    assert retry.startswith("r1.1.") and retry.endswith(".mute-b")  # round 1, attempt 1, a random nonce
    assert strategy.aggregated == []  # a failed round is never aggregated
    assert result.version == 0 and result.history == []


# ------------------------------------------------------------------------------ half-open links on amqtt


HEARTBEAT_TIMEOUT = 3.0


def test_a_half_open_device_is_found_by_its_missing_heartbeats_and_the_round_goes_on() -> None:
    async def scenario() -> tuple[JobResult, Aggregator, RecordingFedAvg, FaultProxy]:
        broker = AmqttBroker()
        await broker.start()
        proxy = FaultProxy("127.0.0.1", broker.port)
        await proxy.start()
        try:
            async with asyncio.timeout(TIMEOUT):
                # The held device is the only client behind the proxy. When the first round is
                # configured (all three registered, no task sent yet), its link goes silent; once
                # that round is over, the link is cut and the device reconnects.
                held: list[bool] = []
                strategy = RecordingFedAvg(on_first_round=lambda: held.append(proxy.hold(seconds=TIMEOUT)))
                # A deadline far away: only the heartbeat timeout can end round 1 early.
                config = job_config(broker.url, job__rounds=2, job__min_devices=3, job__round_deadline=TIMEOUT,
                                    job__heartbeat_timeout=HEARTBEAT_TIMEOUT)

                def release(metrics: RoundMetrics) -> None:
                    if metrics.server_round == 1:
                        proxy.cut_all()

                aggregator = make_aggregator(config, strategy, on_round=release)
                parts = shards(3)
                # Its registration reply may be lost in the hold: it asks again soon after.
                behind_proxy = DeviceConfig(DeviceSettings(id="held", job=JOB, data="-", model="logreg",
                                                           heartbeat_interval=0.2, registration_retry=1.0,
                                                           registration_retry_max=4.0),
                                            BrokerSettings(url=f"mqtt://127.0.0.1:{proxy.port}"))
                async with aggregator.transport:
                    job = asyncio.create_task(aggregator.run())
                    devices = [asyncio.create_task(run_device(behind_proxy, dataset=parts[2], exit_when_finished=True))]
                    devices += [asyncio.create_task(run_device(device_config(broker.url, f"d{i}", 0.2),
                                                               dataset=parts[i], exit_when_finished=True))
                                for i in range(2)]
                    result = await job
                    await asyncio.gather(*devices)
                assert held == [True]
            return result, aggregator, strategy, proxy
        finally:
            await proxy.stop()
            await broker.stop()

    result, aggregator, strategy, proxy = asyncio.run(scenario())
    assert result.state == "finished", result.reason
    assert (proxy.stats.holds, proxy.stats.cuts) == (1, 1)
    # Round 1: all three were selected; the held one failed, offline by heartbeat timeout, and
    # the round ended then, far before its deadline, with the two updates that had arrived.
    assert strategy.selections[0] == (1, ["d0", "d1", "held"], ["d0", "d1", "held"])
    assert strategy.aggregated[0] == (1, ["d0", "d1"], [Failure("held", "offline", "heartbeat timeout")])
    first = result.history[0]
    assert (first.num_updates, first.num_failures) == (2, 1)
    assert first.duration_seconds < TIMEOUT / 2
    # Round 2: the device came back (new connection, same session) and carried on from the current model.
    assert strategy.selections[1] == (2, ["d0", "d1", "held"], ["d0", "d1", "held"])
    assert strategy.aggregated[1] == (2, ["d0", "d1", "held"], [])
    assert result.rounds == 2 and result.version == 2
    record = aggregator.registry.get("held")
    assert record is not None and record.rounds_contributed == 1
    # Its heartbeats after it was declared offline count as proof of life, not as refusals.
    assert not {"unregistered", "stale_session"} & set(result.rejected)
    assert all(np.isfinite(value).all() for value in result.params.values())
