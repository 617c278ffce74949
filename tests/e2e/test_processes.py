"""End to end with real processes: mosquitto, an aggregator, three devices, the CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.brokers import PYTHON, MosquittoBroker, free_port, python_env, require_mosquitto

CLI = [PYTHON, "-m", "unus_edge.cli"]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=python_env(),
                          check=False)


class MetricsSubscriber:
    """A plain paho client, as any operator tool would be: it only parses JSON."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: list[tuple[str, dict[str, object]]] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, json.loads(m.payload)))
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.mosquitto
@pytest.mark.slow
def test_aggregator_and_three_device_processes_over_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    broker = MosquittoBroker(tmp_path)

    async def scenario() -> None:
        await broker.start()
        try:
            await run_federation(tmp_path, broker.port)
        finally:
            await broker.stop()

    asyncio.run(scenario())


async def run_federation(tmp_path: Path, port: int) -> None:
    split = await asyncio.to_thread(cli, "data", "split", "--dataset", "synthetic", "--devices", "3",
                                    "--train-examples", "1500", "--out", str(tmp_path / "parts"))
    assert split.returncode == 0, split.stderr
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
name = "e2e"
rounds = 3
min_devices = 3
round_deadline = 120

[model]
source = "mnist_2nn"

[train]
epochs = 1
batch_size = 20
learning_rate = 0.05

[evaluation]
dataset = "synthetic"
num_examples = 500

[checkpoint]
dir = "{tmp_path / 'checkpoint'}"

[broker]
url = "mqtt://127.0.0.1:{port}"
""")
    metrics = MetricsSubscriber(port, "unus/v1/e2e/metrics/#")
    status = MetricsSubscriber(port, "unus/v1/e2e/devices/+/status")
    aggregator = await asyncio.create_subprocess_exec(*CLI, "aggregator", "--config", str(job),
                                                      stdout=asyncio.subprocess.PIPE,
                                                      stderr=asyncio.subprocess.PIPE, env=python_env())
    devices = []
    for index in range(3):
        config = tmp_path / f"device{index}.toml"
        config.write_text(f'[device]\nid = "pi-{index}"\njob = "e2e"\ndata = "{tmp_path}/parts/device_{index:03d}.npz"'
                          f'\nmodel = "mnist_2nn"\nheartbeat_interval = 1.0\n\n[broker]\nurl = "mqtt://127.0.0.1:{port}"\n')
        devices.append(await asyncio.create_subprocess_exec(*CLI, "device", "--config", str(config),
                                                            "--exit-when-finished", stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.PIPE, env=python_env()))
    try:
        async with asyncio.timeout(240):
            out, err = await aggregator.communicate()
            assert aggregator.returncode == 0, err.decode()[-3000:]
            device_logs = [await device.communicate() for device in devices]
        assert all(device.returncode == 0 for device in devices), device_logs[0][1].decode()[-2000:]
    finally:
        for process in (aggregator, *devices):
            if process.returncode is None:
                process.kill()
        metrics.close()
        status.close()
    assert "finished after 3 rounds" in out.decode()
    rounds = [body["body"] for topic, body in metrics.messages if topic.endswith("/round")]
    accuracies = [entry["eval_accuracy"] for entry in rounds]
    assert len(accuracies) == 3
    assert accuracies[-1] > accuracies[0] > 0.1, accuracies
    jobs = [body["body"] for topic, body in metrics.messages if topic.endswith("/job")]
    assert jobs[-1]["state"] == "finished"
    fleet = [body["body"] for topic, body in metrics.messages if topic.endswith("/metrics/devices")][-1]
    assert fleet["registered"] == 3 and sum(fleet["platforms"].values()) == 3, fleet
    facts = {topic.rsplit("/", 1)[1]: body["body"] for topic, body in metrics.messages if "/metrics/devices/" in topic}
    assert set(facts) == {"pi-0", "pi-1", "pi-2"}  # the last facts of each device, on its own topic
    assert all(entry["rounds_contributed"] == 3 for entry in facts.values()), facts
    # Devices announced themselves and left gracefully (retained status, JSON).
    states = {(body["body"]["device_id"], body["body"]["state"]) for _, body in status.messages}
    assert {("pi-0", "offline"), ("pi-1", "online")} <= states
    assert (tmp_path / "checkpoint" / "checkpoint.cbor").exists()
    # The monitor rebuilds the same picture from the retained topics alone.
    shown = await asyncio.to_thread(cli, "monitor", "--broker", f"mqtt://127.0.0.1:{port}", "--job", "e2e",
                                    "--once", "1")
    assert shown.returncode == 0, shown.stderr
    assert "finished" in shown.stdout
    assert "pi-2" in shown.stdout


@pytest.mark.mosquitto
def test_embedded_broker_command_serves_mosquitto_clients() -> None:
    if shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto-clients is not installed")
    port = free_port()
    broker = subprocess.Popen([*CLI, "broker", "--port", str(port)], stderr=subprocess.PIPE, text=True,
                              env=python_env())
    try:
        assert broker.stderr is not None
        for line in broker.stderr:  # synchronise on the broker's own "ready" line
            if "broker ready" in line:
                break
        subscriber = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-t", "unus/v1/demo/#", "-v", "-C", "2",
                                       "-W", "20"], stdout=subprocess.PIPE, text=True)
        publish = ["mosquitto_pub", "-p", str(port), "-q", "1"]
        subprocess.run([*publish, "-r", "-t", "unus/v1/demo/metrics/job", "-m", '{"state":"running"}'], check=True)
        subprocess.run([*publish, "-t", "unus/v1/demo/devices/pi/status", "-m", '{"state":"online"}'], check=True)
        output, _ = subscriber.communicate(timeout=30)
        assert subscriber.returncode == 0
        assert 'unus/v1/demo/metrics/job {"state":"running"}' in output
        late = subprocess.run(["mosquitto_sub", "-p", str(port), "-t", "unus/v1/demo/metrics/job", "-C", "1",
                               "-W", "10"], capture_output=True, text=True, check=True)
        assert late.stdout.strip() == '{"state":"running"}'  # retained for a late subscriber
    finally:
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(timeout=20) == 0


COMMANDS = [[], ["broker"], ["aggregator"], ["device"], ["simulate"], ["demo"], ["monitor"], ["models"],
            ["models", "build"], ["data"], ["data", "split"], ["data", "fetch"], ["provision"], ["chaos"],
            ["conformance"], ["predict"], ["release"], ["export"], ["status"]]


def test_the_help_test_covers_every_command() -> None:
    from unus_edge.cli import build_parser

    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    assert sorted(subparsers.choices) == sorted(command[0] for command in COMMANDS if len(command) == 1)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "main" for c in COMMANDS])
def test_every_command_has_help(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: unus-edge" in result.stdout


def test_a_bad_config_names_the_key(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("[train]\nlerning_rate = 0.1\n")
    result = cli("aggregator", "--config", str(job))
    assert result.returncode == 2
    assert "'train.lerning_rate'" in result.stderr
    assert "unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("aggregator", "--config", str(job.with_name("missing.toml")))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    result = cli("device", "--set", "device.id=pi", "--set", "device.data=x.npz",
                 "--set", "device.heartbeat_interval=-1")
    assert result.returncode == 2
    assert "device.heartbeat_interval" in result.stderr


def test_models_build_writes_the_zoo(tmp_path: Path) -> None:
    result = cli("models", "build", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["logreg.onnx", "mnist_2nn.onnx", "mnist_cnn.onnx"]


@pytest.mark.slow
def test_device_processes_are_paced_by_their_profiles(tmp_path: Path) -> None:
    """``simulate --processes --device-profiles``: each device process runs the paced wrapper
    (``unus_edge._paced_device``), and reports its trainings back to the simulator at exit."""
    out = tmp_path / "run"
    result = cli("simulate", "--processes", "--dataset", "synthetic", "--devices", "2", "--rounds", "2",
                 "--train-examples", "400", "--eval-examples", "200", "--device-profiles", "slow=0.02:0.5,fast=0:0.5",
                 "--job", "paced", "--out", str(out), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "of 4 trainings took the host longer" in result.stdout, result.stdout
    reports = sorted((out / "paces").glob("device_*.json"))
    assert [path.name for path in reports] == ["device_000.json", "device_001.json"]
    counters = [json.loads(path.read_text()) for path in reports]
    assert [c["trainings"] for c in counters] == [2, 2]
    waited = sorted(c["waited_seconds"] for c in counters)
    assert waited[0] == 0.0 and waited[1] > 0  # the zero-step profile never waits; the slow one does
