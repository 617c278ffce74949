"""A 300-device job through Mosquitto, in the fleet layout (issue 21).

The devices run in two device-host processes (``simulate --device-hosts 2``), each device with
its own MQTT connection, and the aggregator keeps the test's process. Every device registers
once (no registration went unanswered long enough to be sent again), every round applies all
300 updates, and what an operator reads afterwards is complete: the fleet summary counts 300,
and each device's facts are retained on their own topic.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import MosquittoBroker
from unus_edge import topics
from unus_edge.config import load_job_config
from unus_edge.simulation import SimulationOptions, SimulationReport, simulate
from unus_edge.transport import ConnectOptions, MqttTransport

NUM_DEVICES = 300
ROUNDS = 2
JOB = "fleet300"


async def retained_metrics(broker: MosquittoBroker, count: int) -> dict[str, dict[str, Any]]:
    """The retained metrics topics of the job, once ``count`` of them arrived."""
    found: dict[str, dict[str, Any]] = {}
    async with MqttTransport(ConnectOptions(host="127.0.0.1", port=broker.port, client_id="fleet-reader")) as reader:
        await reader.subscribe(topics.metrics_filter(JOB), qos=1)
        async with asyncio.timeout(60):
            async for message in reader.messages():
                found[message.topic] = json.loads(message.payload)["body"]
                if len(found) >= count:
                    return found
    raise AssertionError("the subscription ended")


OVERRIDES = [f"job.name={JOB}", f"job.rounds={ROUNDS}", "job.fraction=1.0", "job.round_deadline=240",
             "job.wait_for_devices=240", "model.source=logreg", "train.batch_size=10", "train.learning_rate=0.1",
             "evaluation.dataset=synthetic", "evaluation.num_examples=300"]


@pytest.mark.mosquitto
@pytest.mark.slow
def test_300_devices_in_two_host_processes_through_mosquitto(tmp_path: Path) -> None:
    async def scenario() -> tuple[SimulationReport, dict[str, dict[str, Any]]]:
        broker = MosquittoBroker(tmp_path)
        await broker.start()
        try:
            config = load_job_config(environ={}, overrides=[*OVERRIDES, f"broker.url={broker.url}"])
            options = SimulationOptions(config=config, num_devices=NUM_DEVICES, dataset="synthetic",
                                        train_examples=20 * NUM_DEVICES, embedded_broker=False, device_hosts=2,
                                        out_dir=tmp_path / "run")
            async with asyncio.timeout(400):
                report = await simulate(options)
            # job, round, the summary and one facts topic per device (all retained)
            return report, await retained_metrics(broker, 3 + NUM_DEVICES)
        finally:
            await broker.stop()

    report, retained = asyncio.run(scenario())
    result = report.result
    assert result.state == "finished", result
    assert [m.num_updates for m in result.history] == [NUM_DEVICES] * ROUNDS
    assert result.rejected == {}
    assert [h.devices for h in report.hosts] == [150, 150] and not any(h.failed for h in report.hosts)
    assert sum(h.registrations for h in report.hosts) == NUM_DEVICES  # none went unanswered for 15 s
    summary = retained[topics.metrics(JOB, "devices")]
    assert (summary["registered"], sum(summary["platforms"].values())) == (NUM_DEVICES, NUM_DEVICES)
    facts = {topic.rsplit("/", 1)[1]: body for topic, body in retained.items() if "/metrics/devices/" in topic}
    assert len(facts) == NUM_DEVICES
    assert all(body["rounds_contributed"] == ROUNDS for body in facts.values())
