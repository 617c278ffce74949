"""The trained model back on the device: released, stored atomically, used to predict (issue 16)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import REPO, python_env
from tests.unit.test_service_memory import JOB, config, make_aggregator, run, shards
from unus_edge import topics
from unus_edge.cli import main
from unus_edge.config import DeviceConfig, DeviceSettings
from unus_edge.device import Device, load_release, predict, store_release
from unus_edge.errors import DataError, ModelError
from unus_edge.messages import Release, decode_message
from unus_edge.nn import Graph
from unus_edge.onnx_io import Evaluator, fingerprint, read_parameters
from unus_edge.topics import Channel
from unus_edge.transport import MemoryBroker, MemoryTransport
from unus_edge.zoo import resolve_model


def release(version: int, model_name: str = "logreg", scale: float = 1.0) -> Release:
    model = resolve_model(model_name)
    params = {name: (value + scale * version).astype(value.dtype) for name, value in read_parameters(model).items()}
    return Release(JOB, version, version, fingerprint(model), "agg", params, 0.5)


def test_a_release_is_stored_with_the_previous_one_and_read_back(tmp_path: Path) -> None:
    model = resolve_model("logreg")
    store_release(tmp_path, release(1), model)
    store_release(tmp_path, release(2), model)
    current = load_release(tmp_path)
    assert current.version == 2 and current.meta["job"] == JOB
    for name, value in read_parameters(current.model).items():
        np.testing.assert_array_equal(value, release(2).tensors[name])
    assert json.loads((tmp_path / "release.previous.json").read_text())["version"] == 1


def test_a_release_of_another_model_or_with_wrong_tensors_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="wrong_fingerprint"):
        store_release(tmp_path, release(1, "mnist_2nn"), resolve_model("logreg"))
    broken = release(1)
    name = next(iter(broken.tensors))
    bad = Release(broken.job, 1, 1, broken.fingerprint, "agg", {**broken.tensors, name: np.zeros(3, np.float32)})
    with pytest.raises(ModelError, match="shape_mismatch"):
        store_release(tmp_path, bad, resolve_model("logreg"))
    assert not (tmp_path / "model.onnx").exists()


def test_a_write_that_dies_half_way_leaves_the_last_good_release(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = resolve_model("logreg")
    store_release(tmp_path, release(1), model)
    real_replace = os.replace

    def dies_at_the_model(source: object, target: object) -> None:
        if str(target).endswith("model.onnx"):
            raise OSError("killed")  # the new model is written under its temporary name, never renamed
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", dies_at_the_model)
    with pytest.raises(OSError, match="killed"):
        store_release(tmp_path, release(2), model)
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_release(tmp_path).version == 1
    (tmp_path / "model.onnx").write_bytes(b"torn")  # even a torn current file: the previous one is used
    assert load_release(tmp_path).version == 1
    with pytest.raises(DataError, match="no_release"):
        load_release(tmp_path / "empty")


WRITER = """
import sys
from pathlib import Path
from tests.unit.test_release import release
from unus_edge.device import store_release
from unus_edge.zoo import resolve_model
model = resolve_model("mnist_2nn")
version = 1
while True:
    store_release(Path(sys.argv[1]), release(version, "mnist_2nn", 0.001), model)
    print(version, flush=True)
    version += 1
"""


def test_a_device_killed_while_it_writes_releases_leaves_a_readable_one(tmp_path: Path) -> None:
    """SIGKILL in the middle of a stream of 2NN releases (800 KB each): always one complete."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env=python_env(), cwd=REPO)
    assert process.stdout is not None
    written = [int(process.stdout.readline()) for _ in range(3)]  # three stored, the fourth under way
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    stored = load_release(tmp_path)
    assert stored.version >= written[-1] - 1
    expected = release(stored.version, "mnist_2nn", 0.001).tensors
    for name, value in read_parameters(stored.model).items():
        np.testing.assert_array_equal(value, expected[name])  # not torn: exactly one release's weights


def test_a_finished_job_releases_its_model_and_the_device_predicts_with_it(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = shards(2)

    async def scenario() -> tuple[dict[str, np.ndarray], MemoryBroker]:
        broker = MemoryBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=2))
        model = resolve_model("logreg")
        devices = []
        for index, shard in enumerate(data):
            settings = DeviceSettings(id=f"d{index}", job=JOB, data="-", model="logreg", heartbeat_interval=0.2,
                                      release_dir=str(tmp_path / f"release-{index}"))
            device_config = DeviceConfig(device=settings)
            transport = MemoryTransport(broker, Device.connect_options(device_config, f"s{index}"))
            devices.append(Device(device_config, transport, graph=Graph(model), fingerprint=fingerprint(model),
                                  dataset=shard, session=f"s{index}", exit_when_finished=True))

        async def one(device: Device) -> None:
            async with device.transport:
                await device.run()

        running = [asyncio.create_task(one(d)) for d in devices]
        async with aggregator.transport:
            result = await aggregator.run()
        await asyncio.gather(*running)
        return result.params, broker

    params, broker = run(scenario)
    _, retained = decode_message(broker.retained[topics.release(JOB)].payload, Channel.RELEASE)
    assert isinstance(retained, Release) and retained.version == 2
    stored = load_release(tmp_path / "release-0")
    assert stored.version == 2
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=data[0].x[:20])
    (tmp_path / "device.toml").write_text(f'[device]\nid = "d0"\njob = "{JOB}"\ndata = "-"\nmodel = "logreg"\n'
                                          f'release_dir = "{tmp_path / "release-0"}"\n')
    assert main(["predict", "--config", str(tmp_path / "device.toml"), "--input", str(inputs)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Evaluator(resolve_model("logreg")).predict(params, data[0].x[:20]).argmax(axis=1)
    assert [line["class"] for line in lines] == expected.tolist()  # the job's final model, on the device
    assert all(line["model_version"] == 2 and 0 < line["probability"] <= 1 for line in lines)
    classes, _ = predict(stored, data[0].x[:20])
    assert classes.tolist() == expected.tolist()


def test_release_every_releases_while_the_job_runs() -> None:
    async def scenario() -> list[int]:
        broker = MemoryBroker()
        releases: list[int] = []
        original = broker.route

        def route(topic: str, payload: bytes, qos: int, retain: bool) -> None:
            if topic == topics.release(JOB):
                _, message = decode_message(payload, Channel.RELEASE)
                assert isinstance(message, Release)
                releases.append(message.server_round)
            original(topic, payload, qos, retain)

        broker.route = route  # type: ignore[method-assign]
        aggregator = make_aggregator(broker, config(job__min_devices=1, job__rounds=4, job__release_every=2))
        from tests.unit.test_service_memory import make_device, run_device

        device = make_device(broker, "d0", shards(1)[0])
        running = asyncio.create_task(run_device(device))
        async with aggregator.transport:
            await aggregator.run()
        await running
        return releases

    assert run(scenario) == [2, 4, 4]  # rounds 2 and 4 while it runs, then the final one
