"""Model delivery: a device fetches one model per computation and none while it trains.

Whole jobs in memory (the in-memory broker keeps retained messages and sessions as a broker
does); every device's deliveries are counted by the device itself and checked against the
computations it started.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from tests.unit.test_service_memory import config, make_aggregator, make_device, run, run_device, shards
from unus_edge import topics
from unus_edge.aggregator import Aggregator
from unus_edge.aggregator._ssp import SSPDriver
from unus_edge.device import Device
from unus_edge.device._worker import ssp_required_version
from unus_edge.transport import MemoryBroker


async def job(num_devices: int, **settings: Any) -> tuple[Aggregator, list[Device], MemoryBroker]:
    broker = MemoryBroker()
    aggregator = make_aggregator(broker, config(job__min_devices=num_devices, **settings))
    devices = [make_device(broker, f"d{i}", shard) for i, shard in enumerate(shards(num_devices))]
    tasks = [asyncio.create_task(run_device(d)) for d in devices]
    async with aggregator.transport:
        result = await aggregator.run()
    await asyncio.gather(*tasks)
    assert result.state == "finished", result.reason
    return aggregator, devices, broker


@pytest.mark.parametrize("bound", ["0", "1", "inf"])
def test_an_ssp_device_receives_one_model_per_computation_and_none_while_training(bound: str) -> None:
    aggregator, devices, _ = run(lambda: job(3, job__mode="ssp", job__staleness_bound=bound, job__rounds=4))
    model_size = len(aggregator.transport.broker.retained[topics.model(aggregator.job)].payload)  # type: ignore[attr-defined]
    for device in devices:
        assert device.models_while_training == 0, device.device_id
        # One fetch per computation; a computation the job's end cut short still fetched.
        assert device.updates_sent <= device.model_messages <= device.updates_sent + 1, device.device_id
        assert device.model_bytes <= device.model_messages * model_size
    updates = sum(d.updates_sent for d in devices)
    assert aggregator.counters.bytes_down >= updates * model_size  # counted from the devices' reports


def test_a_device_not_selected_for_a_round_receives_no_model() -> None:
    _, devices, _ = run(lambda: job(4, job__fraction="0.5", job__rounds=3))
    for device in devices:
        assert device.models_while_training == 0
        assert device.model_messages == device.updates_sent, device.device_id  # one per round it trained in
    assert sum(d.updates_sent for d in devices) == 2 * 3  # 2 of 4 devices selected per round


def test_a_device_holds_no_model_subscription_between_computations() -> None:
    aggregator, devices, broker = run(lambda: job(2, job__mode="ssp", job__staleness_bound="1", job__rounds=2))
    model = topics.model(aggregator.job)
    for device in devices:
        assert model not in broker._sessions[device.transport.client_id].subscriptions  # type: ignore[attr-defined]


def test_a_device_subscribes_to_the_model_at_qos_0_only() -> None:
    """At QoS 1 a device killed mid-fetch would find every model published in its absence queued
    in its persistent session (tests/integration/test_transport.py, the killed-during-a-fetch test)."""
    requests: list[tuple[str, int]] = []

    async def scenario() -> None:
        broker = MemoryBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=2, job__mode="ssp", job__staleness_bound="1",
                                                    job__rounds=3))
        devices = [make_device(broker, f"d{i}", shard) for i, shard in enumerate(shards(2))]
        for device in devices:
            subscribe = device.transport.subscribe

            async def recording(topic_filter: str, *, qos: int = 1, subscribe: Any = subscribe) -> int:
                requests.append((topic_filter, qos))
                return int(await subscribe(topic_filter, qos=qos))

            device.transport.subscribe = recording  # type: ignore[method-assign]
        tasks = [asyncio.create_task(run_device(d)) for d in devices]
        async with aggregator.transport:
            await aggregator.run()
        await asyncio.gather(*tasks)

    run(scenario)
    fetches = [qos for topic_filter, qos in requests if topic_filter.endswith("/model")]
    assert fetches and set(fetches) == {0}, requests


def test_ssp_needs_the_version_the_clock_names_not_the_devices_own_update() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        device = make_device(broker, "d0", shards(1)[0])
        device.view.ack_version, device.view.clock_version = 9, 8  # its own update made version 9
        assert ssp_required_version(device) == 9  # an aggregator that names no model version: the old wait
        device.view.published_version = 7  # the clock says the retained model is version 7
        assert ssp_required_version(device) == 7

    run(scenario)


def test_the_staleness_of_applied_updates_is_a_histogram_in_the_job_metrics() -> None:
    from unus_edge.messages import JobMetrics, decode_message, staleness_bucket
    from unus_edge.monitor import MonitorState, render

    assert [staleness_bucket(s) for s in (0, 1, 2, 3, 4, 7, 8, 100)] == ["0", "1", "2-3", "2-3", "4-7", "4-7",
                                                                         "8-15", "64-127"]
    aggregator, _, broker = run(lambda: job(3, job__mode="ssp", job__staleness_bound="inf", job__rounds=3))
    histogram = aggregator.driver.staleness_histogram()
    assert sum(histogram.values()) == aggregator.driver.totals()[0] > 0
    assert set(histogram) - {"0"}  # asynchronous: some updates were applied on a newer model
    retained = broker.retained[topics.metrics(aggregator.job, "job")]
    _, message = decode_message(retained.payload, topics.Channel.METRICS)
    assert isinstance(message, JobMetrics) and dict(message.staleness) == histogram
    state = MonitorState()
    state.job = message
    assert "staleness of applied updates: 0:" in render(state, aggregator.job)


def test_fedbuff_between_flushes_fetches_nothing_and_never_stalls() -> None:
    """FedBuff changes the model only once per buffer: a device that already holds the retained
    model starts again at once (it used to wait ``model_wait`` for a newer one that never came)."""
    _, devices, _ = run(lambda: job(3, job__mode="ssp", job__staleness_bound="2", job__rounds=4,
                                             strategy__name="fedbuff", strategy__buffer_size="3"), timeout=30)
    for device in devices:
        assert device.models_while_training == 0
        assert device.model_messages <= device.updates_sent + 1, device.device_id


def test_the_clock_never_announces_a_c_min_the_retained_model_does_not_hold() -> None:
    async def scenario() -> None:
        aggregator = make_aggregator(MemoryBroker(), config(job__mode="ssp", job__staleness_bound="0"))
        driver = aggregator.driver
        assert isinstance(driver, SSPDriver)
        driver.c_min, driver.published_c_min = 3, 2
        aggregator.version, aggregator.published_version = 10, 9  # the model with c_min 3 is still on its way
        assert driver.clock_state()[0] == 2
        aggregator.published_version = 10  # it is retained now
        assert driver.clock_state()[0] == 3

    run(scenario)


def test_a_fetch_ends_when_the_retained_copy_arrives_even_if_the_device_already_has_it() -> None:
    """Over MQTT the retained copy follows the SUBACK; if it is the version the device holds
    (FedBuff between flushes), its arrival must still end the wait (not ``model_wait`` later)."""
    from unus_edge.device._worker import wait_for_model
    from unus_edge.messages import GlobalModel

    async def scenario() -> None:
        device = make_device(MemoryBroker(), "d0", shards(1)[0])
        device.settings = dataclasses.replace(device.settings, model_wait=3600.0)
        device.view.session = "agg"
        device.view.model, device.view.model_version = dict(device.template), 5
        seen = device.model_messages
        waiting = asyncio.create_task(wait_for_model(device, 5, 3600.0, after=seen))
        await asyncio.sleep(0)  # the wait has begun
        device._dispatch(GlobalModel(5, 5, device.fingerprint, "agg", dict(device.template)))
        async with asyncio.timeout(5):  # a missed wake-up would wait an hour
            assert await waiting

    run(scenario)
