"""The aggregator and device services end to end over the in-memory broker (no sockets).

Covers a whole job, registration refusals, and every kind of hostile or broken input on the
aggregator's inbound topics: each is rejected with its reason, counted, and nothing stalls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from unus_edge import topics
from unus_edge.aggregator import Aggregator, JobResult, prepare_job
from unus_edge.codec import Envelope, encode
from unus_edge.config import DeviceConfig, DeviceSettings, JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device import Device
from unus_edge.errors import RejectedError
from unus_edge.messages import (
    Ack,
    Heartbeat,
    Registration,
    RegistrationReply,
    RoundMetrics,
    Status,
    Task,
    Update,
    decode_message,
    encode_message,
)
from unus_edge.nn import Graph
from unus_edge.strategies import Strategy
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MemoryBroker, MemoryTransport
from unus_edge.zoo import resolve_model

JOB = "memjob"


def config(**extra: Any) -> JobConfig:
    overrides = [f"job.name={JOB}", "job.rounds=2", "job.round_deadline=60", "job.wait_for_devices=60",
                 "model.source=logreg", "evaluation.dataset=synthetic", "evaluation.num_examples=300",
                 "train.learning_rate=0.1"]
    overrides += [f"{key.replace('__', '.')}={value}" for key, value in extra.items()]
    return load_job_config(environ={}, overrides=overrides)


def run(factory: Callable[[], Any], timeout: float = 60) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await factory()

    return asyncio.run(bounded())


def make_aggregator(broker: MemoryBroker, job_config: JobConfig, *, resume: bool = False,
                    strategy: Strategy | None = None) -> Aggregator:
    parts = prepare_job(job_config)
    transport = MemoryTransport(broker, Aggregator.connect_options(job_config, "agg"))
    return Aggregator(job_config, transport, params=parts.params, fingerprint=parts.fingerprint,
                      strategy=strategy or parts.strategy, evaluate=parts.evaluate, session="agg", resume=resume)


def make_device(broker: MemoryBroker, device_id: str, data: Dataset, *, model: str = "logreg") -> Device:
    device_config = DeviceConfig(device=DeviceSettings(id=device_id, job=JOB, data="-", model=model,
                                                       heartbeat_interval=0.2))
    onnx_model = resolve_model(model)
    from unus_edge.onnx_io import fingerprint

    transport = MemoryTransport(broker, Device.connect_options(device_config, f"session-{device_id}"))
    return Device(device_config, transport, graph=Graph(onnx_model), fingerprint=fingerprint(onnx_model),
                  dataset=data, session=f"session-{device_id}", exit_when_finished=True)


def shards(count: int) -> list[Dataset]:
    data = load_dataset("synthetic", "train", seed=0, num_examples=600)
    return [Dataset(data.x[i], data.y[i], data.num_classes) for i in partition(data.y, count, "iid", seed=0)]


async def run_device(device: Device) -> None:
    async with device.transport:
        await device.run()


def test_a_whole_job_in_memory() -> None:
    async def scenario() -> JobResult:
        broker = MemoryBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=3))
        devices = [make_device(broker, f"d{i}", shard) for i, shard in enumerate(shards(3))]
        device_tasks = [asyncio.create_task(run_device(d)) for d in devices]
        async with aggregator.transport:
            result = await aggregator.run()
        await asyncio.gather(*device_tasks)
        assert all(d.updates_sent == 2 for d in devices)
        return result

    result = run(scenario)
    assert result.state == "finished"
    assert [m.num_updates for m in result.history] == [3, 3]
    assert result.final_accuracy is not None
    assert result.final_accuracy > 0.5  # synthetic data is easy; chance is 0.1
    assert result.rejected == {}


def test_a_device_running_another_model_is_refused_with_a_reason() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=1, job__wait_for_devices=5))
        intruder = make_device(broker, "wrong", shards(1)[0], model="mnist_2nn")
        async with aggregator.transport:
            job = asyncio.create_task(aggregator.run())
            with pytest.raises(RejectedError) as caught:
                await run_device(intruder)
            assert caught.value.reason == "fingerprint_mismatch"
            assert "sha256:" in caught.value.detail
            aggregator.shutdown_trigger.set()
            await job
        assert aggregator.counters.rejected["fingerprint_mismatch"] == 1

    run(scenario)


# ------------------------------------------------------------------------------ hostile input


@dataclass
class Harness:
    broker: MemoryBroker
    aggregator: Aggregator
    device: MemoryTransport
    task: Task
    rejections: asyncio.Queue[str]
    replies: asyncio.Queue[Any]
    rounds: asyncio.Queue[RoundMetrics]
    """Each round's metrics when it closes (the aggregator's ``on_round``): an ack says an update
    is durable, not that its round is over."""

    def topic(self, channel: Channel, device_id: str = "d1") -> str:
        return topics.device_topic(JOB, device_id, channel)

    def update(self, **changes: Any) -> Update:
        params = self.aggregator.params
        base = Update("d1", "s1", self.task.task_id, self.task.server_round, self.task.model_version, 100, 0.3,
                      {name: np.zeros_like(value) for name, value in params.items()})
        return replace(base, **changes)

    async def send(self, channel: Channel, payload: bytes, device_id: str = "d1") -> None:
        await self.device.publish(self.topic(channel, device_id), payload, qos=1)

    async def rejected(self) -> str:
        return await self.rejections.get()


async def aggregator_online(broker: MemoryBroker) -> None:
    """Wait, as a real device does, for the aggregator's retained online status."""
    async with MemoryTransport(broker) as watcher:
        await watcher.subscribe(topics.aggregator_status(JOB))
        async for message in watcher.messages():
            if decode_message(message.payload, Channel.AGGREGATOR_STATUS)[1].state == "online":  # type: ignore[attr-defined]
                return


@asynccontextmanager
async def harness(**extra: Any) -> AsyncIterator[Harness]:
    broker = MemoryBroker()
    settings: dict[str, Any] = {"job__min_devices": 1, "job__rounds": 1, "evaluation__dataset": "none"}
    aggregator = make_aggregator(broker, config(**(settings | extra)))
    rejections: asyncio.Queue[str] = asyncio.Queue()
    original = aggregator.reject

    def counting(reason: str, detail: str, device_id: str = "") -> None:
        original(reason, detail, device_id)
        rejections.put_nowait(reason)

    aggregator.reject = counting  # type: ignore[method-assign]
    rounds: asyncio.Queue[RoundMetrics] = asyncio.Queue()
    aggregator.on_round = rounds.put_nowait
    device = MemoryTransport(broker, ConnectOptions(client_id="fake-d1", clean_session=False))
    replies: asyncio.Queue[Any] = asyncio.Queue()
    async with aggregator.transport, device:
        job = asyncio.create_task(aggregator.run())
        await device.subscribe(topics.device_topic(JOB, "d1", Channel.TASKS))

        async def listen() -> None:
            async for message in device.messages():
                replies.put_nowait(decode_message(message.payload, Channel.TASKS)[1])

        listener = asyncio.create_task(listen())
        await aggregator_online(broker)
        await device.publish(topics.device_topic(JOB, "d1", Channel.STATUS),
                             encode_message(Status("d1", "online", "s1"), JOB, Channel.STATUS), retain=True)
        fingerprint = aggregator.fingerprint
        await device.publish(topics.device_topic(JOB, "d1", Channel.REGISTER),
                             encode_message(Registration("d1", "s1", 100, fingerprint, "test"), JOB, Channel.REGISTER))
        reply = await replies.get()
        assert isinstance(reply, RegistrationReply)
        assert reply.accepted
        task = await replies.get()
        assert isinstance(task, Task)
        yield Harness(broker, aggregator, device, task, rejections, replies, rounds)
        listener.cancel()
        aggregator.shutdown_trigger.set()
        await job


CBOR_CASES: list[tuple[str, Callable[[Harness], bytes], str]] = [
    ("malformed CBOR", lambda h: b"\xa1\x61", "truncated"),
    ("garbage bytes", lambda h: bytes(range(256)), "trailing_bytes"),
    ("wrong schema version", lambda h: encode(Envelope("update", JOB, h.update().body(), schema=2)),
     "unsupported_schema"),
    ("wrong job", lambda h: encode_message(h.update(), "otherjob", Channel.UPDATE), "wrong_job"),
    ("another device's topic", lambda h: encode_message(h.update(device_id="d2"), JOB, Channel.UPDATE),
     "identity_mismatch"),
    ("a missing field", lambda h: encode(Envelope("update", JOB, {"device_id": "d1"})), "missing_field"),
    ("shape mismatch", lambda h: encode_message(h.update(tensors={
        **{n: np.zeros_like(v) for n, v in h.aggregator.params.items()},
        next(iter(h.aggregator.params)): np.zeros((3, 3), np.float32)}), JOB, Channel.UPDATE), "shape_mismatch"),
    ("dtype mismatch", lambda h: encode_message(h.update(tensors={
        n: np.zeros(v.shape, np.float16) for n, v in h.aggregator.params.items()}), JOB, Channel.UPDATE),
     "dtype_mismatch"),
    ("NaN", lambda h: encode_message(h.update(tensors={
        n: np.full_like(v, np.nan) for n, v in h.aggregator.params.items()}), JOB, Channel.UPDATE), "not_finite"),
    ("infinity", lambda h: encode_message(h.update(tensors={
        n: np.full_like(v, np.inf) for n, v in h.aggregator.params.items()}), JOB, Channel.UPDATE), "not_finite"),
    ("norm above the bound", lambda h: encode_message(h.update(tensors={
        n: np.full_like(v, 10.0) for n, v in h.aggregator.params.items()}), JOB, Channel.UPDATE), "norm_too_large"),
    ("oversized payload", lambda h: encode(Envelope("update", JOB, h.update().body(),
                                                    {"huge": np.zeros(2_000_000, np.float32)})), "too_large"),
    ("a round the device was not assigned", lambda h: encode_message(h.update(task_id="r9.0.d1"), JOB,
                                                                      Channel.UPDATE), "unassigned"),
    ("a stale base version", lambda h: encode_message(h.update(base_version=h.task.model_version + 5), JOB,
                                                       Channel.UPDATE), "stale_base"),
    ("weights instead of a delta", lambda h: encode_message(h.update(encoding="weights"), JOB, Channel.UPDATE),
     "bad_encoding"),
]


@pytest.mark.parametrize(("case", "payload", "reason"), CBOR_CASES, ids=[c[0] for c in CBOR_CASES])
def test_hostile_update_is_rejected_with_its_reason(case: str, payload: Callable[[Harness], bytes],
                                                    reason: str) -> None:
    async def scenario() -> None:
        async with harness(job__max_update_norm=100.0) as h:
            await h.send(Channel.UPDATE, payload(h))
            assert await h.rejected() == reason
            assert h.aggregator.counters.rejected[reason] == 1
            # Nothing stalled: a good update from the same device is still applied.
            await h.send(Channel.UPDATE, encode_message(h.update(), JOB, Channel.UPDATE))
            while True:
                ack = await h.replies.get()
                if isinstance(ack, Ack) and ack.accepted:
                    break
            assert h.aggregator.state in ("running", "finished")

    run(scenario)


def test_a_weight_claim_above_the_registration_is_refused_under_the_refuse_policy() -> None:
    """Issue 14: ``num_examples = 1e9`` with an honest-looking delta outweighed the whole round."""

    async def scenario() -> None:
        async with harness(job__weight_policy="refuse") as h:
            await h.send(Channel.UPDATE, encode_message(h.update(num_examples=10**9), JOB, Channel.UPDATE))
            assert await h.rejected() == "weight_mismatch"
            await h.send(Channel.UPDATE, encode_message(h.update(), JOB, Channel.UPDATE))  # the honest one counts
            while not (isinstance(ack := await h.replies.get(), Ack) and ack.accepted):
                pass

    run(scenario)


def test_a_weight_claim_above_the_registration_is_capped_by_default() -> None:
    async def scenario() -> None:
        async with harness(job__rounds=1) as h:
            await h.send(Channel.UPDATE, encode_message(h.update(num_examples=10**9), JOB, Channel.UPDATE))
            while not (isinstance(ack := await h.replies.get(), Ack) and ack.accepted):
                pass
            assert (await h.rounds.get()).num_examples == 100  # the registered 100, not 10**9

    run(scenario)


def test_unregistered_device_and_replayed_update_are_rejected() -> None:
    async def scenario() -> None:
        async with harness() as h:
            stranger = h.update(device_id="stranger")
            await h.send(Channel.UPDATE, encode_message(stranger, JOB, Channel.UPDATE), device_id="stranger")
            assert await h.rejected() == "unregistered"
            good = encode_message(h.update(), JOB, Channel.UPDATE, msg_id="once")
            await h.send(Channel.UPDATE, good)
            await h.send(Channel.UPDATE, good)  # a replay of the same msg_id
            acks = [await h.replies.get(), await h.replies.get()]
            assert [(a.update_msg_id, a.accepted) for a in acks] == [("once", True), ("once", True)]
            assert h.aggregator.counters.rejected["duplicate"] == 1
            assert h.aggregator.history[0].num_updates == 1 if h.aggregator.history else True

    run(scenario)


def test_hostile_input_on_the_other_inbound_topics() -> None:
    async def scenario() -> None:
        async with harness() as h:
            await h.send(Channel.HEARTBEAT, b"{not json")
            assert await h.rejected() == "bad_json"
            await h.send(Channel.STATUS, json.dumps({"schema": 1, "kind": "status", "job": JOB, "msg_id": "x",
                                                     "ts": 1, "body": {"device_id": "d1", "state": "maybe",
                                                                       "session": "s"}}).encode())
            assert await h.rejected() == "bad_field"
            await h.send(Channel.REGISTER, encode(Envelope("register", JOB, {"device_id": "d1"}, schema=3)))
            assert await h.rejected() == "unsupported_schema"
            reply = await h.replies.get()
            assert isinstance(reply, RegistrationReply)
            assert (reply.accepted, reply.reason) == (False, "schema_version")
            # Matches the aggregator's devices/+/update filter, but ".hidden" is not a valid device id.
            await h.device.publish(f"unus/v1/{JOB}/devices/.hidden/update", b"x")
            assert await h.rejected() == "bad_topic"

    run(scenario)


def presence(message: Heartbeat | Status) -> bytes:
    return encode_message(message, JOB, Channel.HEARTBEAT if isinstance(message, Heartbeat) else Channel.STATUS)


def test_presence_of_sessions_that_are_not_registered() -> None:
    """Stray heartbeats are refused with a reason; the routine races of presence are not."""

    async def scenario() -> None:
        async with harness(job__rounds=5) as h:
            counters = h.aggregator.counters
            record = h.aggregator.registry.get("d1")
            assert record is not None
            ignored = counters.ignored
            # A heartbeat of a device that never announced itself, and of a session d1 never had.
            await h.send(Channel.HEARTBEAT, presence(Heartbeat("ghost", "g1", 1)), device_id="ghost")
            assert await h.rejected() == "unregistered"
            await h.send(Channel.HEARTBEAT, presence(Heartbeat("d1", "s9", 1)))
            assert await h.rejected() == "stale_session"
            # Routine, ignored: a device between its start (status) and its registration, and
            # the late will of an older process of d1 followed by that process's last heartbeat.
            await h.send(Channel.STATUS, presence(Status("ghost", "online", "g2")), device_id="ghost")
            await h.send(Channel.HEARTBEAT, presence(Heartbeat("ghost", "g2", 1)), device_id="ghost")
            await h.send(Channel.STATUS, presence(Status("d1", "offline", "s0", reason="will")))
            await h.send(Channel.HEARTBEAT, presence(Heartbeat("d1", "s0", 9)))
            await h.send(Channel.HEARTBEAT, b"{not json")  # a marker: everything before it was handled
            assert await h.rejected() == "bad_json"
            assert counters.ignored == ignored + 4
            assert record.online and record.session == "s1"
            # d1 declared offline (its own will), then its last heartbeat arrives: it is back, no refusal.
            await h.send(Channel.STATUS, presence(Status("d1", "offline", "s1", reason="will")))
            await h.send(Channel.HEARTBEAT, b"{not json")
            assert await h.rejected() == "bad_json"
            assert not record.online
            await h.send(Channel.HEARTBEAT, presence(Heartbeat("d1", "s1", 2)))
            await h.send(Channel.HEARTBEAT, b"{not json")
            assert await h.rejected() == "bad_json"
            assert record.online
            assert counters.rejected == {"unregistered": 1, "stale_session": 1, "bad_json": 3}
            assert counters.inbound == counters.accepted + counters.ignored + sum(counters.rejected.values())

    run(scenario)


async def next_ack(h: Harness) -> Ack:
    while not isinstance(reply := await h.replies.get(), Ack):
        pass
    return reply


def test_an_ssp_update_beyond_max_staleness_is_refused_as_too_stale() -> None:
    async def scenario() -> None:
        async with harness(job__mode="ssp", strategy__name="ssp", job__rounds=5, job__staleness_bound="inf",
                           job__max_staleness=0) as h:
            assert h.task.mode == "ssp"
            await h.send(Channel.UPDATE, encode_message(h.update(clock=0, base_version=0), JOB, Channel.UPDATE))
            first = await next_ack(h)
            assert first.accepted and first.version == 1
            # Trained from version 0 while the model is at 1: staleness 1 > job.max_staleness = 0.
            stale = h.update(clock=1, base_version=0)
            await h.send(Channel.UPDATE, encode_message(stale, JOB, Channel.UPDATE))
            assert await h.rejected() == "too_stale"
            refusal = await next_ack(h)
            assert (refusal.accepted, refusal.reason) == (False, "too_stale")
            assert h.aggregator.counters.rejected == {"too_stale": 1}
            assert h.aggregator.counters.refused == 1
            # The same clock trained from the current model is still taken.
            await h.send(Channel.UPDATE, encode_message(h.update(clock=1, base_version=1), JOB, Channel.UPDATE))
            assert (await next_ack(h)).accepted

    run(scenario)


# ------------------------------------------------------------------------------ metrics that mean what they say


def test_num_rejected_counts_the_rounds_own_refusals() -> None:
    """Round 1 refuses one update and round 2 none: 1 then 0 (it was the job's running total)."""

    async def scenario() -> list[RoundMetrics]:
        async with harness(job__rounds=2) as h:
            stale = h.update(base_version=h.task.model_version + 5)
            await h.send(Channel.UPDATE, encode_message(stale, JOB, Channel.UPDATE))
            assert await h.rejected() == "stale_base"
            await h.send(Channel.UPDATE, encode_message(h.update(), JOB, Channel.UPDATE))
            while not isinstance(second := await h.replies.get(), Task):
                pass
            update = replace(h.update(), task_id=second.task_id, server_round=second.server_round,
                             base_version=second.model_version)
            await h.send(Channel.UPDATE, encode_message(update, JOB, Channel.UPDATE))
            return [await h.rounds.get(), await h.rounds.get()]

    history = run(scenario)
    assert [m.num_rejected for m in history] == [1, 0]
    assert [m.rejected for m in history] == [{"stale_base": 1}, {"stale_base": 1}]  # a job total, by reason


def test_ssp_reports_cover_the_updates_since_the_previous_one() -> None:
    """Per-report fields add up to the job's totals; durations add up to the last wall time."""

    async def scenario() -> JobResult:
        broker = MemoryBroker()
        aggregator = make_aggregator(broker, config(job__mode="ssp", strategy__name="ssp", job__rounds=4,
                                                    job__min_devices=3, job__staleness_bound="inf"))
        devices = [make_device(broker, f"d{i}", shard) for i, shard in enumerate(shards(3))]
        device_tasks = [asyncio.create_task(run_device(d)) for d in devices]
        async with aggregator.transport:
            result = await aggregator.run()
        await asyncio.gather(*device_tasks)
        return result

    result = run(scenario)
    history = result.history
    assert len(history) >= 2
    assert sum(m.num_updates for m in history) == result.updates
    assert sum(m.num_examples for m in history) == 200 * result.updates  # 600 examples over 3 devices
    assert all(m.duration_seconds >= 0 for m in history)
    assert sum(m.duration_seconds for m in history) == pytest.approx(history[-1].wall_seconds)
    # A fast device may send an update after the last clock: refused (not_running) in the last
    # report. Never negative, never more than the job refused.
    assert all(m.num_rejected >= 0 for m in history)
    assert sum(m.num_rejected for m in history) <= sum(result.rejected.values())
