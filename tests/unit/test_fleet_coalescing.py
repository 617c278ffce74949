"""The fleet summary is published at a bounded rate, not on every registry change (issue 21).

It lists every registered device, so one publication per registration made registering a
fleet quadratic: 1,000 devices cost 1,000 summaries of up to 1,000 entries each.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_service_memory import config, make_aggregator, make_device, run, run_device, shards
from unus_edge.aggregator._coalesce import Coalescer
from unus_edge.messages import FleetMetrics, decode_message
from unus_edge.topics import Channel
from unus_edge.transport import MemoryBroker


class CountingBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.fleets: list[bytes] = []

    def route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if topic.endswith("/metrics/devices"):
            self.fleets.append(payload)
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
    assert len(final.devices) == num_devices
