"""The fleet is published at a bounded rate, and at a cost that follows the changes (issue 21).

The summary once listed every registered device and went out on every registry change, which
made registering a fleet quadratic: 1,000 devices cost 1,000 summaries of up to 1,000 entries
each. Now it is a few counts, and each device's facts have their own retained topic, published
when that device changes.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_service_memory import (
    JOB,
    aggregator_online,
    config,
    make_aggregator,
    make_device,
    run,
    run_device,
    shards,
)
from unus_edge import topics
from unus_edge.aggregator._coalesce import Coalescer
from unus_edge.messages import DeviceFacts, FleetMetrics, Registration, decode_message, encode_message
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MemoryBroker, MemoryTransport

_AGGREGATOR_CHANNELS = {Channel.TASKS, Channel.MODEL, Channel.CLOCK, Channel.METRICS, Channel.AGGREGATOR_STATUS}


class CountingBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.fleets: list[bytes] = []
        self.facts: list[bytes] = []
        self.sent = 0
        """Messages on the topics only the aggregator writes, and their bytes:"""
        self.sent_bytes = 0

    def route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if topic.endswith("/metrics/devices"):
            self.fleets.append(payload)
        elif "/metrics/devices/" in topic:
            self.facts.append(payload)
        if topics.parse(topic).channel in _AGGREGATOR_CHANNELS and payload:
            self.sent += 1
            self.sent_bytes += len(payload)
        super().route(topic, payload, qos, retain)


def test_a_burst_of_changes_is_flushed_once_and_a_later_change_once_more() -> None:
    async def scenario() -> list[int]:
        flushed = asyncio.Event()
        counts: list[int] = []

        def flush() -> None:
            counts.append(len(counts))
            flushed.set()

        coalescer = Coalescer(flush, interval=0.05)
        for _ in range(1000):
            coalescer.mark()
        await flushed.wait()
        flushed.clear()
        coalescer.mark()  # within the interval: deferred, not dropped
        assert coalescer.pending
        await flushed.wait()
        return counts

    assert run(scenario) == [0, 1]


def test_a_cancelled_flush_does_not_run() -> None:
    async def scenario() -> int:
        calls: list[None] = []
        coalescer = Coalescer(lambda: calls.append(None), interval=0.0)
        coalescer.mark()
        coalescer.cancel()
        await asyncio.sleep(0)  # one loop iteration: where a call_soon would have run
        await asyncio.sleep(0)
        return len(calls)

    assert run(scenario) == 0


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        Coalescer(lambda: None, interval=-1)


def test_registering_a_fleet_publishes_a_bounded_number_of_summaries() -> None:
    num_devices = 30

    async def scenario() -> CountingBroker:
        broker = CountingBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=num_devices, job__rounds=1,
                                                    job__fleet_interval=3600))
        devices = [make_device(broker, f"d{i:02d}", shard) for i, shard in enumerate(shards(num_devices))]
        tasks = [asyncio.create_task(run_device(d)) for d in devices]
        async with aggregator.transport:
            result = await aggregator.run()
        await asyncio.gather(*tasks)
        assert result.state == "finished"
        return broker

    broker = run(scenario)
    # One at the start, at most one coalesced flush (the interval outlasts the job), one per
    # published state (after each round, and the goodbye): not one per registration.
    assert 2 <= len(broker.fleets) <= 5, len(broker.fleets)
    _, final = decode_message(broker.fleets[-1], Channel.METRICS)
    assert isinstance(final, FleetMetrics)
    assert (final.registered, final.online, sum(final.platforms.values())) == (num_devices, num_devices, num_devices)
    last = {}
    for payload in broker.facts:
        _, facts = decode_message(payload, Channel.METRICS)
        assert isinstance(facts, DeviceFacts)
        last[facts.device_id] = facts
    assert sorted(last) == [f"d{i:02d}" for i in range(num_devices)]
    assert all(f.rounds_contributed == 1 and f.online for f in last.values())  # as the goodbye saw them


def register_fleet(num_devices: int) -> CountingBroker:
    """Register ``num_devices`` devices (raw registrations, no training) with an aggregator that
    publishes the fleet after every change (``job.fleet_interval = 0``, the worst case)."""

    async def scenario() -> CountingBroker:
        broker = CountingBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=num_devices + 1, job__fleet_interval=0))
        fleet = MemoryTransport(broker, ConnectOptions(client_id="fleet"))
        async with aggregator.transport, fleet:
            job = asyncio.create_task(aggregator.run())
            await fleet.subscribe(topics.device_filter(JOB, Channel.TASKS))
            await aggregator_online(broker)
            for index in range(num_devices):
                device_id = f"d{index:04d}"
                registration = Registration(device_id, f"s-{device_id}", 100, aggregator.fingerprint, "test",
                                            platform=f"platform-{index % 20}")
                await fleet.publish(topics.device_topic(JOB, device_id, Channel.REGISTER),
                                    encode_message(registration, JOB, Channel.REGISTER), qos=1)
            answered = 0
            async for _ in fleet.messages():  # one reply per registration
                answered += 1
                if answered == num_devices:
                    break
            aggregator.shutdown_trigger.set()
            await job
        assert aggregator.registry.online_count == num_devices
        return broker

    broker: CountingBroker = run(scenario)
    return broker


def test_what_the_aggregator_publishes_grows_linearly_with_the_registrations() -> None:
    small, large = register_fleet(100), register_fleet(400)
    for broker, num_devices in ((small, 100), (large, 400)):
        # One answer and one facts message per device, plus a bounded number of others per change.
        assert broker.sent <= 3 * num_devices + 20, broker.sent
        assert len(broker.facts) == num_devices  # each device changed once: its facts went out once
    assert large.sent <= 4.5 * small.sent, (small.sent, large.sent)
    # Bytes too: no message grows with the fleet (the quadratic summary made this ratio ~16).
    assert large.sent_bytes <= 4.5 * small.sent_bytes, (small.sent_bytes, large.sent_bytes)
    _, summary = decode_message(large.fleets[-1], Channel.METRICS)
    assert isinstance(summary, FleetMetrics)
    assert (summary.registered, summary.online) == (400, 400)
    assert len(summary.platforms) == 17 and summary.platforms["other"] == 80  # 16 named, 4 x 20 summed
