"""The crash paths say goodbye: an aggregator whose evaluator raises, a device whose worker dies.

Before, ``Aggregator.run`` had no ``finally``: the exception left the retained status ``online``
and the clock ``running``, and the graceful disconnect discarded the last will, so nothing ever
said ``offline``. Now the final state and a retained ``offline`` (reason ``crashed``) go out,
and the exception is raised again.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import PYTHON, python_env, running_broker
from unus_edge import topics
from unus_edge.aggregator import Aggregator, prepare_job, run_aggregator
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings, load_job_config
from unus_edge.data import load_dataset
from unus_edge.device import run_device
from unus_edge.messages import Clock, JobMetrics, Message, Status, decode_message
from unus_edge.strategies import Params
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MqttTransport

JOB = "crash"
BROKERS = ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)]


class EvaluatorBrokeError(RuntimeError):
    pass


def broken_evaluator(params: Params) -> dict[str, float]:
    raise EvaluatorBrokeError("the test set is unreadable")


async def retained(port: int, *topic_names: str) -> dict[str, Message]:
    """The retained message of each topic, read by a fresh client.

    amqtt also sends a new client the retained messages of topics other clients subscribed to
    (docs/brokers.md): anything not asked for is skipped.
    """
    found: dict[str, Message] = {}
    async with MqttTransport(ConnectOptions(port=port, client_id="crash-reader")) as reader:
        for name in topic_names:
            await reader.subscribe(name, qos=1)
        async for message in reader.messages():
            if message.topic not in topic_names:
                continue
            _, decoded = decode_message(message.payload, topics.parse(message.topic).channel)
            found[message.topic] = decoded
            if len(found) == len(topic_names):
                return found
    raise AssertionError("the reader's connection ended")


@pytest.mark.parametrize("kind", BROKERS)
def test_an_evaluator_that_raises_ends_with_a_retained_offline(kind: str, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Message]:
        async with running_broker(kind, tmp_path) as broker:
            config = load_job_config(environ={}, overrides=[
                f"job.name={JOB}", "job.rounds=3", "job.min_devices=1", "job.wait_for_devices=60",
                "model.source=logreg", "evaluation.dataset=none", f"broker.url=mqtt://127.0.0.1:{broker.port}"])
            parts = prepare_job(config)
            aggregator = Aggregator(config, MqttTransport(Aggregator.connect_options(config, "agg")),
                                    params=parts.params, fingerprint=parts.fingerprint, strategy=parts.strategy,
                                    evaluate=broken_evaluator, session="agg", resume=False)
            data = load_dataset("synthetic", "train", seed=0, num_examples=100)
            stop = asyncio.Event()
            device = asyncio.create_task(run_device(
                DeviceConfig(DeviceSettings(id="d0", job=JOB, model="logreg", heartbeat_interval=0.5),
                             BrokerSettings(url=f"mqtt://127.0.0.1:{broker.port}")),
                dataset=data, shutdown_trigger=stop))
            try:
                with pytest.raises(ExceptionGroup) as raised:
                    async with aggregator.transport:
                        await aggregator.run()
                assert raised.value.subgroup(EvaluatorBrokeError) is not None
            finally:
                stop.set()
                await device
            return await retained(broker.port, topics.aggregator_status(JOB), topics.metrics(JOB, "job"),
                                  topics.clock(JOB))

    async def bounded() -> dict[str, Message]:
        async with asyncio.timeout(120):
            return await scenario()

    found = asyncio.run(bounded())
    status = found[topics.aggregator_status(JOB)]
    assert isinstance(status, Status)
    assert (status.state, status.reason) == ("offline", "crashed")
    job = found[topics.metrics(JOB, "job")]
    assert isinstance(job, JobMetrics)
    assert job.state == "failed"
    assert job.reason == "crashed: EvaluatorBrokeError: the test set is unreadable"
    clock = found[topics.clock(JOB)]
    assert isinstance(clock, Clock)
    assert clock.state == "failed"


class PaceBrokeError(RuntimeError):
    pass


class BrokenPace:
    """A pacing hook that raises after the first training: the device's worker dies of it."""

    def now(self) -> float:
        return 0.0

    async def training(self, started: float, steps: int, cpu_seconds: float = 0.0) -> None:
        raise PaceBrokeError("the simulated clock is gone")

    async def transfer(self, num_bytes: int) -> None:
        return None


@pytest.mark.parametrize("kind", BROKERS)
def test_a_device_that_crashes_ends_with_a_retained_offline_saying_why(kind: str, tmp_path: Path) -> None:
    """Before, the device's goodbye always said ``shutdown``, whatever ended it."""

    async def scenario() -> Message:
        async with running_broker(kind, tmp_path) as broker:
            url = f"mqtt://127.0.0.1:{broker.port}"
            config = load_job_config(environ={}, overrides=[
                f"job.name={JOB}", "job.rounds=3", "job.min_devices=1", "job.wait_for_devices=60",
                "model.source=logreg", "evaluation.dataset=none", f"broker.url={url}"])
            parts = prepare_job(config)
            stop = asyncio.Event()
            aggregator = Aggregator(config, MqttTransport(Aggregator.connect_options(config, "agg")),
                                    params=parts.params, fingerprint=parts.fingerprint, strategy=parts.strategy,
                                    session="agg", resume=False, shutdown_trigger=stop)

            async def serve() -> None:
                async with aggregator.transport:
                    await aggregator.run()

            serving = asyncio.create_task(serve())
            data = load_dataset("synthetic", "train", seed=0, num_examples=100)
            try:
                with pytest.raises(ExceptionGroup) as raised:
                    await run_device(DeviceConfig(DeviceSettings(id="d0", job=JOB, model="logreg"),
                                                  BrokerSettings(url=url)), dataset=data, pace=BrokenPace())
                assert raised.value.subgroup(PaceBrokeError) is not None
            finally:
                stop.set()
                await serving
            return (await retained(broker.port, topics.device_topic(JOB, "d0", Channel.STATUS)))[
                topics.device_topic(JOB, "d0", Channel.STATUS)]

    async def bounded() -> Message:
        async with asyncio.timeout(120):
            return await scenario()

    status = asyncio.run(bounded())
    assert isinstance(status, Status)
    assert (status.state, status.reason) == ("offline", "crashed: PaceBrokeError: the simulated clock is gone")


_INTRUDER = """
import asyncio, sys
from unus_edge.messages import Status, encode_message
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MqttTransport, Will
async def main():
    job, topic, client_id, sender = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    channel = Channel.AGGREGATOR_STATUS if sender == "aggregator" else Channel.STATUS
    role = "aggregator" if sender == "aggregator" else "device"
    will = Will(topic, encode_message(Status(sender, "offline", "intruder", role=role, reason="will"), job, channel),
                qos=1, retain=True)
    options = ConnectOptions(port=int(sys.argv[1]), client_id=client_id, clean_session=False, will=will)
    async with MqttTransport(options):
        print("connected", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


class StatusWatcher:
    """Reads a status topic and keeps every (state, reason) it saw, in order."""

    def __init__(self, stream: Any, channel: Channel) -> None:
        self.stream = stream
        self.channel = channel
        self.seen: list[tuple[str, str]] = []

    async def until(self, expected: tuple[str, str]) -> None:
        while True:
            message = await anext(self.stream)
            _, status = decode_message(message.payload, self.channel)
            assert isinstance(status, Status)
            self.seen.append((status.state, status.reason))
            if self.seen[-1] == expected:
                return


async def take_over_and_die(port: int, status_topic: str, client_id: str, sender: str) -> None:
    """An intruder connects with ``client_id`` and that client's will, then is SIGKILLed while
    connected: the broker publishes its will (``offline``, ``will``) on ``status_topic``."""
    intruder = await asyncio.create_subprocess_exec(
        PYTHON, "-c", _INTRUDER, str(port), JOB, status_topic, client_id, sender,
        stdout=asyncio.subprocess.PIPE, env=python_env())
    assert intruder.stdout is not None
    assert (await intruder.stdout.readline()).strip() == b"connected"
    intruder.kill()  # connected, then gone without a DISCONNECT
    await intruder.wait()



@pytest.mark.parametrize("kind", BROKERS)
def test_a_device_says_online_again_after_another_client_took_its_id_over(kind: str, tmp_path: Path) -> None:
    """Issue 14: two clients as pi-001 kicked each other; afterwards its retained status stayed
    ``offline (will)`` for an hour while it heartbeated. Here an intruder with the device's
    client id and will takes the connection over and dies: its will says ``offline``. The device
    reconnects and now announces itself after every reconnect, so the retained status ends ``online``."""

    async def scenario() -> list[tuple[str, str]]:
        async with running_broker(kind, tmp_path) as broker:
            url = f"mqtt://127.0.0.1:{broker.port}"
            status_topic = topics.device_topic(JOB, "d0", Channel.STATUS)
            stop = asyncio.Event()
            async with MqttTransport(ConnectOptions(port=broker.port, client_id="watcher")) as watcher:
                await watcher.subscribe(status_topic, qos=1)
                statuses = StatusWatcher(watcher.messages(), Channel.STATUS)
                device = asyncio.create_task(run_device(
                    DeviceConfig(DeviceSettings(id="d0", job=JOB, model="logreg"), BrokerSettings(url=url)),
                    dataset=load_dataset("synthetic", "train", seed=0, num_examples=50), shutdown_trigger=stop))
                await statuses.until(("online", ""))
                await take_over_and_die(broker.port, status_topic, f"unus-{JOB}-d0", "d0")
                await statuses.until(("offline", "will"))
                await statuses.until(("online", ""))  # the device, back, says so
                stop.set()
                await device
            return statuses.seen

    async def bounded() -> list[tuple[str, str]]:
        async with asyncio.timeout(60):
            return await scenario()

    seen = asyncio.run(bounded())
    assert seen[-2:] == [("offline", "will"), ("online", "")]


class _Retrying(logging.Handler):
    """Sets ``seen`` when the transport logs a connect retry (no polling of the log)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in" in record.getMessage():
            self.seen.set()


@pytest.mark.parametrize("service", ["device", "aggregator"])
def test_a_service_waiting_for_an_unreachable_broker_stops_when_asked(service: str) -> None:
    """Issue 14: while it retried an unreachable broker the device ignored SIGTERM for 12 minutes
    and the aggregator for 26 s (the CLI's signal handlers set the same shutdown trigger)."""
    from tests.brokers import free_port

    async def scenario() -> str:
        stop = asyncio.Event()
        retrying = _Retrying()
        logging.getLogger("unus_edge.transport").addHandler(retrying)
        url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens
        try:
            if service == "device":
                running: asyncio.Task[object] = asyncio.create_task(run_device(
                    DeviceConfig(DeviceSettings(id="d0", job=JOB, model="logreg"), BrokerSettings(url=url)),
                    dataset=load_dataset("synthetic", "train", seed=0, num_examples=50), shutdown_trigger=stop))
            else:
                config = load_job_config(environ={}, overrides=[
                    f"job.name={JOB}", "model.source=logreg", "evaluation.dataset=none", f"broker.url={url}"])
                running = asyncio.create_task(run_aggregator(config, shutdown_trigger=stop, resume=False))
            async with asyncio.timeout(30):
                await retrying.seen.wait()  # it is in its connect back-off
            stop.set()
            async with asyncio.timeout(5):  # it stopped at once (the back-off waits seconds to minutes)
                outcome = await running
        finally:
            logging.getLogger("unus_edge.transport").removeHandler(retrying)
        if service == "device":
            assert getattr(outcome, "updates_sent", None) == 0
            return "stopped"
        return str(getattr(outcome, "state", ""))

    assert asyncio.run(scenario()) == "stopped"  # the aggregator's JobResult says so too


@pytest.mark.parametrize("kind", BROKERS)
def test_the_aggregator_says_online_again_after_a_lost_connection(kind: str, tmp_path: Path) -> None:
    """Its will left ``aggregator/status`` at ``offline`` after a lost connection, and devices that
    started afterwards never registered (found while writing protocol.md)."""

    async def scenario() -> list[tuple[str, str]]:
        async with running_broker(kind, tmp_path) as broker:
            url = f"mqtt://127.0.0.1:{broker.port}"
            status_topic = topics.aggregator_status(JOB)
            stop = asyncio.Event()
            async with MqttTransport(ConnectOptions(port=broker.port, client_id="watcher")) as watcher:
                await watcher.subscribe(status_topic, qos=1)
                statuses = StatusWatcher(watcher.messages(), Channel.AGGREGATOR_STATUS)
                config = load_job_config(environ={}, overrides=[
                    f"job.name={JOB}", "model.source=logreg", "evaluation.dataset=none", f"broker.url={url}",
                    "job.wait_for_devices=120"])
                serving = asyncio.create_task(run_aggregator(config, shutdown_trigger=stop, resume=False))
                await statuses.until(("online", ""))
                await take_over_and_die(broker.port, status_topic, f"unus-aggregator-{JOB}", "aggregator")
                await statuses.until(("offline", "will"))
                await statuses.until(("online", ""))
                stop.set()
                await serving
            return statuses.seen

    async def bounded() -> list[tuple[str, str]]:
        async with asyncio.timeout(60):
            return await scenario()

    seen = asyncio.run(bounded())
    assert ("offline", "will") in seen and seen[-1] == ("online", "")  # amqtt may deliver the will twice
