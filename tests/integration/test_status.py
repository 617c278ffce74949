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
