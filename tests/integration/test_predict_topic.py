"""``unus-edge predict --mqtt`` against a running device daemon through real brokers (issue 16).

The daemon (``device.serve_predictions``) holds a stored release; the command, a separate
process with the device's configuration, sends the inputs on ``predict/request`` and prints the
daemon's answers, which must be the release's own predictions. Through Mosquitto with the
provisioned ACL too: another device's identity cannot read them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import REPO, python_env, running_broker
from tests.unit.test_predict_topic import serving_event
from tests.unit.test_release import release
from tests.unit.test_service_memory import JOB, shards
from unus_edge.config import load_device_config
from unus_edge.data import save_partition
from unus_edge.device import Device, load_release, predict, run_device, store_release
from unus_edge.zoo import resolve_model


@pytest.mark.parametrize("kind", ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def test_predict_over_mqtt_asks_the_running_daemon(tmp_path: Path, kind: str) -> None:
    store_release(tmp_path / "release", release(5), resolve_model("logreg"))
    data = shards(1)[0]
    save_partition(tmp_path / "data.npz", data)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=data.x[:12])

    async def scenario() -> tuple[int, bytes]:
        async with running_broker(kind, tmp_path) as broker:
            toml = tmp_path / "device.toml"
            toml.write_text(f'[device]\nid = "pi-0"\njob = "{JOB}"\ndata = "{tmp_path / "data.npz"}"\n'
                            f'model = "logreg"\nrelease_dir = "{tmp_path / "release"}"\nserve_predictions = true\n'
                            f'[broker]\nurl = "{broker.url}"\n')
            config = load_device_config(toml, environ={})
            serving, stop = asyncio.Event(), asyncio.Event()
            original = Device.run

            async def run_and_signal(device: Device) -> None:  # run_device builds the Device itself
                serving_event(device, serving)
                await original(device)

            Device.run = run_and_signal  # type: ignore[method-assign]
            try:
                daemon = asyncio.create_task(run_device(config, shutdown_trigger=stop))
                async with asyncio.timeout(60):
                    await serving.wait()
                    command = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "unus_edge.cli", "predict", "--config", str(toml), "--input",
                        str(inputs), "--mqtt", "--timeout", "30", cwd=REPO, env=python_env(),
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                    output, errors = await command.communicate()
                stop.set()
                await daemon
            finally:
                Device.run = original  # type: ignore[method-assign]
            assert command.returncode == 0, errors.decode()
            return command.returncode, output

    _, output = asyncio.run(scenario())
    lines = [json.loads(line) for line in output.decode().splitlines()]
    classes, probabilities = predict(load_release(tmp_path / "release"), data.x[:12])
    assert [line["class"] for line in lines] == classes.tolist()
    assert all(line["model_version"] == 5 for line in lines) and len(lines) == 12
    np.testing.assert_allclose([line["probability"] for line in lines],
                               probabilities[np.arange(12), classes], atol=1e-5)
