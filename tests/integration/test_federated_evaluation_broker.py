"""Federated evaluation through a real Mosquitto, with a device that never answers (issue 16).

Three device daemons with real MQTT connections keep a held-out fifth of their examples; one
of them ignores every evaluation request. Each round's federated evaluation counts it as a
failure after the timeout and combines the other two; the rounds do not wait for it; and an
operator reads the result, retained, on ``metrics/evaluation``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import MosquittoBroker
from unus_edge import topics
from unus_edge.aggregator import JobResult, run_aggregator
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings, load_job_config
from unus_edge.data import Dataset, holdout_split, load_dataset, partition
from unus_edge.device import Device
from unus_edge.messages import EvaluateTask
from unus_edge.nn import Graph
from unus_edge.onnx_io import fingerprint
from unus_edge.transport import ConnectOptions, MqttTransport
from unus_edge.zoo import resolve_model

JOB = "fedeval"


class NeverBusy(asyncio.Event):
    """The deaf device's idle flag: it never has an evaluation to finish before it leaves."""

    def clear(self) -> None:
        return None


class Deaf(asyncio.Queue[EvaluateTask]):
    def put_nowait(self, item: EvaluateTask) -> None:
        return None


async def device(broker: MosquittoBroker, index: int, shard: Dataset, stop: asyncio.Event, *, deaf: bool) -> Device:
    settings = DeviceSettings(id=f"pi-{index}", job=JOB, data="-", model="logreg", heartbeat_interval=1.0)
    config = DeviceConfig(device=settings, broker=BrokerSettings(url=broker.url))
    session = secrets.token_hex(8)
    model = resolve_model("logreg")
    train, held_out = holdout_split(shard, 0.2, index)
    daemon = Device(config, MqttTransport(Device.connect_options(config, session)), graph=Graph(model),
                    fingerprint=fingerprint(model), dataset=train, session=session, shutdown_trigger=stop,
                    exit_when_finished=True)
    daemon.held_out = held_out
    if deaf:
        daemon.evaluations = Deaf()
        daemon.evaluations_idle = NeverBusy()
        daemon.evaluations_idle.set()
    async with daemon.transport:
        await daemon.run()
    return daemon


@pytest.mark.mosquitto
def test_federated_evaluation_over_mosquitto_counts_a_silent_device(tmp_path: Path) -> None:
    async def scenario() -> tuple[JobResult, dict[str, Any]]:
        broker = MosquittoBroker(tmp_path)
        await broker.start()
        try:
            config = load_job_config(environ={}, overrides=[
                f"job.name={JOB}", "job.rounds=2", "job.min_devices=3", "job.round_deadline=60", "model.source=logreg",
                "train.learning_rate=0.1", "evaluation.mode=federated", "evaluation.federated_fraction=1.0",
                "evaluation.federated_timeout=2", f"broker.url={broker.url}"])
            data = load_dataset("synthetic", "train", seed=0, num_examples=600)
            shards = [Dataset(data.x[i], data.y[i], data.num_classes) for i in partition(data.y, 3, "iid", seed=0)]
            stop = asyncio.Event()
            devices = [asyncio.create_task(device(broker, i, s, stop, deaf=i == 2)) for i, s in enumerate(shards)]
            async with asyncio.timeout(180):
                result = await run_aggregator(config, resume=False)
                await asyncio.gather(*devices)
            async with MqttTransport(ConnectOptions(host="127.0.0.1", port=broker.port)) as reader:
                await reader.subscribe(topics.metrics(JOB, "evaluation"))
                async with asyncio.timeout(30):
                    async for message in reader.messages():
                        return result, json.loads(message.payload)["body"]
            raise AssertionError("no retained metrics/evaluation")
        finally:
            await broker.stop()

    result, retained = asyncio.run(scenario())
    assert result.state == "finished" and result.rounds == 2
    assert [(m.num_selected, m.num_answered, m.num_failures) for m in result.federated] == [(3, 2, 1), (3, 2, 1)]
    assert all(m.num_examples == 80 and m.accuracy is not None for m in result.federated)  # 2 x 20 % of 200
    assert retained["server_round"] == 2 and retained["num_failures"] == 1 and retained["accuracy"] is not None
    assert all(m.eval_accuracy is None for m in result.history)  # no test set at this gateway
