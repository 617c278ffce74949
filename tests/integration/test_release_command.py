"""``unus-edge release`` through a real broker: a stopped job's model reaches a waiting device (issue 16).

The job ran (in memory) without releasing and left its checkpoint. A device daemon with a
release folder is connected to a real amqtt broker, waiting for work; the ``unus-edge release``
command, a separate process, publishes the checkpoint's model retained, and the device stores
it and predicts with it exactly as the checkpoint's weights do.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from pathlib import Path

import numpy as np

from tests.brokers import REPO, AmqttBroker, python_env
from tests.unit.test_release_on_demand import stopped_job
from tests.unit.test_service_memory import JOB, shards
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings
from unus_edge.device import Device, load_release, predict
from unus_edge.nn import Graph
from unus_edge.onnx_io import Evaluator, fingerprint
from unus_edge.transport import MqttTransport
from unus_edge.zoo import resolve_model


class Stored(logging.Handler):
    """Sets ``event`` when the device logs that it stored a release."""

    def __init__(self, event: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.event, self.loop = event, loop

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("release ") and " stored in " in record.getMessage():
            self.loop.call_soon_threadsafe(self.event.set)


def test_the_release_command_hands_a_stopped_jobs_model_to_a_waiting_device(tmp_path: Path) -> None:
    _, params, version = stopped_job(tmp_path)
    data = shards(1)[0]

    async def scenario() -> tuple[int, bytes]:
        broker = AmqttBroker()
        await broker.start()
        stored = asyncio.Event()
        handler = Stored(stored, asyncio.get_running_loop())
        device_logger = logging.getLogger("unus_edge.device")
        level = device_logger.level
        device_logger.setLevel(logging.INFO)  # the stored-release line is an INFO record
        device_logger.addHandler(handler)
        try:
            settings = DeviceSettings(id="pi-0", job=JOB, data="-", model="logreg", heartbeat_interval=1.0,
                                      release_dir=str(tmp_path / "release"))
            config = DeviceConfig(device=settings, broker=BrokerSettings(url=broker.url))
            session = secrets.token_hex(8)
            model = resolve_model("logreg")
            stop = asyncio.Event()
            device = Device(config, MqttTransport(Device.connect_options(config, session)), graph=Graph(model),
                            fingerprint=fingerprint(model), dataset=data, session=session, shutdown_trigger=stop)

            async def daemon() -> None:
                async with device.transport:
                    await device.run()

            running = asyncio.create_task(daemon())
            toml = tmp_path / "job.toml"
            toml.write_text(f'[job]\nname = "{JOB}"\n[model]\nsource = "logreg"\n'
                            f'[checkpoint]\ndir = "{tmp_path / "ckpt"}"\n[broker]\nurl = "{broker.url}"\n')
            command = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "unus_edge.cli", "release", "--config", str(toml), cwd=REPO, env=python_env(),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            async with asyncio.timeout(60):
                output, _ = await command.communicate()
                await stored.wait()
            stop.set()
            await running
            return command.returncode or 0, output
        finally:
            device_logger.removeHandler(handler)
            device_logger.setLevel(level)
            await broker.stop()

    code, output = asyncio.run(scenario())
    assert code == 0, output.decode()
    assert f"model version {version} (round 2)".encode() in output
    release = load_release(tmp_path / "release")
    assert release.version == version and release.meta["aggregator_session"].startswith("release-")
    classes, _ = predict(release, data.x[:50])
    expected = Evaluator(resolve_model("logreg")).predict(params, data.x[:50]).argmax(axis=1)
    assert np.array_equal(classes, expected)
