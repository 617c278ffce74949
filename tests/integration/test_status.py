"""``unus-edge status`` against a live job and against a broker with no job, through real brokers (issue 19)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import python_env, running_broker
from unus_edge import topics
from unus_edge.transport import ConnectOptions, MqttTransport

CLI = [sys.executable, "-m", "unus_edge.cli"]


async def status(url: str, job: str, *extra: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(*CLI, "status", "--broker", url, "--job", job, *extra,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                   env=python_env())
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("kind", ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def test_status_of_a_live_job_and_of_a_broker_without_one(tmp_path: Path, kind: str) -> None:
    async def scenario() -> tuple[dict[str, Any], str, tuple[int, str, str], tuple[int, str, str]]:
        async with running_broker(kind, tmp_path) as broker:
            job = await asyncio.create_subprocess_exec(
                *CLI, "simulate", "--broker", broker.url, "--dataset", "synthetic", "--devices", "3",
                "--rounds", "1000", "--train-examples", "300", "--eval-examples", "100", "--job", "live",
                "--out", str(tmp_path / "run"), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                env=python_env())
            try:
                host, port = broker.url.removeprefix("mqtt://").split(":")
                async with MqttTransport(ConnectOptions(host=host, port=int(port))) as watcher:
                    await watcher.subscribe(topics.metrics("live", "round"), qos=1)
                    async with asyncio.timeout(120):  # a round was done: the job is live
                        await anext(aiter(watcher.messages()))
                code, out, err = await status(broker.url, "live", "--json")
                assert code == 0, err
                table = await status(broker.url, "live")
                missing = await status(broker.url, "nothing"), await status(broker.url, "nothing", "--json")
            finally:
                job.send_signal(signal.SIGTERM)
                async with asyncio.timeout(60):
                    await job.communicate()
        return json.loads(out), table[1], missing[0], missing[1]

    document, table, missing, missing_json = asyncio.run(scenario())
    assert document["job"]["state"] == "running" and document["job"]["server_round"] >= 1, document["job"]
    assert document["aggregator"]["state"] == "online"
    assert document["fleet"]["registered"] == 3 and document["fleet"]["online"] == 3
    assert sorted(entry["device_id"] for entry in document["devices"]) == ["device-000", "device-001", "device-002"]
    assert all(entry["online"] for entry in document["devices"])
    assert document["last_round"]["num_updates"] == 3
    assert table.startswith("aggregator of live: online") and "fleet: 3 registered, 3 online" in table, table
    assert table.count("online") >= 5, table  # the aggregator, the fleet line, and each device's row
    code, out, err = missing
    assert code == 1 and out == "" and "no job 'nothing'" in err and "Traceback" not in err
    code, out, err = missing_json
    assert code == 1 and json.loads(out)["job"] is None and json.loads(out)["devices"] == []


def test_the_prometheus_endpoint_of_a_live_job_is_scraped_and_parsed(tmp_path: Path) -> None:
    from urllib.request import urlopen

    parser = pytest.importorskip("prometheus_client.parser")
    from tests.brokers import free_port

    port = free_port()

    async def scenario() -> str:
        async with running_broker("amqtt", tmp_path) as broker:
            job = await asyncio.create_subprocess_exec(
                *CLI, "simulate", "--broker", broker.url, "--dataset", "synthetic", "--devices", "3",
                "--rounds", "1000", "--train-examples", "300", "--eval-examples", "100", "--job", "live",
                "--out", str(tmp_path / "run"), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env=python_env())
            monitor, drain = None, None
            try:
                host, broker_port = broker.url.removeprefix("mqtt://").split(":")
                async with MqttTransport(ConnectOptions(host=host, port=int(broker_port))) as watcher:
                    await watcher.subscribe(topics.metrics("live", "round"), qos=1)
                    async with asyncio.timeout(120):
                        await anext(aiter(watcher.messages()))
                monitor = await asyncio.create_subprocess_exec(
                    *CLI, "-v", "monitor", "--broker", broker.url, "--job", "live", "--prometheus",
                    f"127.0.0.1:{port}", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                    env=python_env())
                assert monitor.stderr is not None
                async with asyncio.timeout(60):  # the monitor says when the job's metrics are in
                    while b"metrics received" not in (line := await monitor.stderr.readline()):
                        assert line, "the monitor exited"
                drain = asyncio.create_task(monitor.stderr.read())  # -v goes on logging: keep the pipe open
                return await asyncio.to_thread(
                    lambda: urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
            finally:
                for process in (monitor, job):
                    if process is not None and process.returncode is None:
                        process.send_signal(signal.SIGTERM)
                        async with asyncio.timeout(60):
                            await process.wait()
                if drain is not None:
                    await drain

    text = asyncio.run(scenario())
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in parser.text_string_to_metric_families(text) for sample in family.samples}
    assert samples[("unus_round", (("job_name", "live"),))] >= 1
    assert samples[("unus_aggregator_up", (("job_name", "live"),))] == 1
    online = {labels: value for (name, labels), value in samples.items() if name == "unus_device_online"}
    assert len(online) == 3 and set(online.values()) == {1.0}, online
    assert samples[("unus_bytes_total", (("direction", "up"), ("job_name", "live")))] > 0
