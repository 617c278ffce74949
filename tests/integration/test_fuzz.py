"""Fuzz: 10,000 random and mutated messages on every inbound topic of a running FedAvg job.

The job, through a real Mosquitto, must finish with exactly the model of the same job without
the fuzzing (same seeds: fuzzed messages must never be applied), and every inbound message must
be accounted for: accepted, ignored, or rejected with a reason.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import MosquittoBroker
from unus_edge import topics
from unus_edge.aggregator import Aggregator, JobResult, prepare_job
from unus_edge.codec import Envelope, encode
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings, JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device import run_device
from unus_edge.messages import Heartbeat, Registration, Status, Update, encode_message
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MqttTransport

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

FUZZ_MESSAGES = 10_000
DEVICES = 3


def job_config(url: str) -> JobConfig:
    return load_job_config(environ={}, overrides=[
        "job.name=fuzz", "job.rounds=3", f"job.min_devices={DEVICES}", "job.round_deadline=120",
        "model.source=logreg", "evaluation.dataset=synthetic", "evaluation.num_examples=500",
        "train.learning_rate=0.1", f"broker.url={url}",
    ])


def templates(params: dict[str, np.ndarray]) -> list[tuple[Channel, bytes]]:
    update = Update("fuzz-0", "s", "fuzz-task", 1, 0, 10, 0.5, {n: np.ones_like(v) for n, v in params.items()})
    return [
        (Channel.UPDATE, encode_message(update, "fuzz", Channel.UPDATE)),
        (Channel.REGISTER, encode_message(Registration("fuzz-0", "s", 10, "sha256:fuzz", "x"), "fuzz",
                                          Channel.REGISTER)),
        (Channel.HEARTBEAT, encode_message(Heartbeat("fuzz-0", "s", 1), "fuzz", Channel.HEARTBEAT)),
        (Channel.STATUS, encode_message(Status("fuzz-0", "offline", "s"), "fuzz", Channel.STATUS)),
        (Channel.UPDATE, encode(Envelope("update", "fuzz", {"device_id": "fuzz-0"}, schema=7))),
    ]


def mutate(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 8)):
        if not data:
            break
        position = rng.randrange(len(data))
        operation = rng.random()
        if operation < 0.5:
            data[position] = rng.randrange(256)
        elif operation < 0.75:
            del data[position]
        else:
            data.insert(position, rng.randrange(256))
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


async def fuzz(url: str, params: dict[str, np.ndarray], seed: int, count: int = FUZZ_MESSAGES) -> int:
    rng = random.Random(seed)
    port = int(url.rsplit(":", 1)[1])
    bank = templates(params)
    device_ids = [f"fuzz-{i}" for i in range(40)] + [f"device-{i:03d}" for i in range(DEVICES)]
    channels = [Channel.STATUS, Channel.HEARTBEAT, Channel.REGISTER, Channel.UPDATE]
    sent = 0
    async with MqttTransport(ConnectOptions(port=port, max_inflight=200)) as fuzzer:
        pending = []
        for _ in range(count):
            kind = rng.random()
            channel_template, template = bank[rng.randrange(len(bank))]
            if kind < 0.25:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
            elif kind < 0.85:
                payload = mutate(rng, template)
            else:
                payload = template  # valid bytes on a random device's topic: identity mismatch, wrong job...
            if rng.random() < 0.03:  # a topic that matches the filters but names no valid device
                topic = f"unus/v1/fuzz/devices/.bad{rng.randrange(9)}/{rng.choice(channels).value}"
            else:
                channel = channel_template if rng.random() < 0.5 else rng.choice(channels)
                topic = topics.device_topic("fuzz", rng.choice(device_ids), channel)
            pending.append(fuzzer.publish(topic, payload, qos=1))
            sent += 1
            if len(pending) >= 200:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    return sent


class CountingAggregator(Aggregator):
    """Lets the test wait (on an event) until a number of inbound messages has been handled."""

    target = 0
    reached: asyncio.Event

    def _dispatch(self, message, envelope, decoded) -> None:  # type: ignore[no-untyped-def]
        super()._dispatch(message, envelope, decoded)
        self._check()

    def reject(self, reason: str, detail: str, device_id: str = "") -> None:
        super().reject(reason, detail, device_id)
        self._check()

    def _check(self) -> None:
        counters = self.counters
        if self.target and counters.accepted + counters.ignored + sum(counters.rejected.values()) >= self.target:
            self.reached.set()


async def run_job(broker_url: str, *, fuzzing: bool) -> tuple[JobResult, Aggregator, int]:
    config = job_config(broker_url)
    parts = prepare_job(config)
    model_bytes = sum(v.nbytes for v in parts.params.values())
    transport = MqttTransport(Aggregator.connect_options(config, "agg", model_bytes=model_bytes))
    aggregator = CountingAggregator(config, transport, params=parts.params, fingerprint=parts.fingerprint,
                                    strategy=parts.strategy, evaluate=parts.evaluate, session="agg", resume=False)
    aggregator.reached = asyncio.Event()
    data = load_dataset("synthetic", "train", seed=0, num_examples=1500)
    shards = [Dataset(data.x[i], data.y[i], data.num_classes) for i in partition(data.y, DEVICES, "iid", seed=0)]

    def device(index: int) -> asyncio.Task[object]:
        settings = DeviceSettings(id=f"device-{index:03d}", job="fuzz", data="-", model="logreg")
        return asyncio.create_task(run_device(DeviceConfig(settings, BrokerSettings(url=broker_url)),
                                              dataset=shards[index], exit_when_finished=True))

    sent = 0
    async with transport:
        job = asyncio.create_task(aggregator.run())
        devices = [device(i) for i in range(DEVICES - 1)]  # the job runs, waiting for its last device
        if fuzzing:
            sent = await fuzz(broker_url, parts.params, seed=1)
            aggregator.target = sent  # wait until the aggregator has handled every fuzzed message
            aggregator._check()
            await aggregator.reached.wait()
        devices.append(device(DEVICES - 1))
        if fuzzing:  # and more while the rounds run
            sent += await fuzz(broker_url, parts.params, seed=2, count=2_000)
        result = await job
    await asyncio.gather(*devices)
    return result, aggregator, sent


def test_fuzzing_every_inbound_topic_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> tuple[JobResult, JobResult, Aggregator, int]:
        broker = MosquittoBroker(tmp_path)
        await broker.start()
        try:
            async with asyncio.timeout(300):
                clean, _, _ = await run_job(broker.url, fuzzing=False)
                fuzzed, aggregator, sent = await run_job(broker.url, fuzzing=True)
            return clean, fuzzed, aggregator, sent
        finally:
            await broker.stop()

    clean, fuzzed, aggregator, sent = asyncio.run(scenario())
    assert sent == FUZZ_MESSAGES + 2_000
    assert fuzzed.state == "finished"
    for name in clean.params:  # no fuzzed message was applied: the same model, bit for bit
        assert np.array_equal(fuzzed.params[name], clean.params[name]), name
    assert fuzzed.final_accuracy == clean.final_accuracy
    counters = aggregator.counters
    rejected = sum(counters.rejected.values())
    assert counters.inbound == counters.accepted + counters.ignored + rejected  # every message accounted for
    assert counters.inbound >= FUZZ_MESSAGES  # the first 10,000 all reached the aggregator ...
    assert counters.ignored + rejected >= FUZZ_MESSAGES  # ... and none was acted upon
    assert len(counters.rejected) >= 8  # many different reasons were exercised
