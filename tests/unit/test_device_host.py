"""The device-host files (``simulate --device-hosts``) round-trip, and bad ones are refused clearly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from unus_edge._device_host import read_layout, read_report, write_host
from unus_edge.config import DeviceConfig, DeviceSettings, load_device_config, load_job_config
from unus_edge.data import Dataset, load_dataset, load_partition
from unus_edge.errors import ConfigError
from unus_edge.simulation import SimulationOptions, simulate


def test_a_host_gets_its_devices_examples_back_in_order(tmp_path: Path) -> None:
    data = load_dataset("synthetic", "train", seed=0, num_examples=90)
    shards = [Dataset(data.x[a:b], data.y[a:b], data.num_classes) for a, b in ((0, 10), (10, 45), (45, 90))]
    config = DeviceConfig(device=DeviceSettings(job="hostjob", model="logreg", heartbeat_interval=2.5))
    path = write_host(tmp_path, 1, 40, shards, config)
    loaded = load_device_config(path)  # a valid device configuration, validated as any other
    assert (loaded.device.id, loaded.device.job, loaded.device.heartbeat_interval) == ("device-040", "hostjob", 2.5)
    examples = load_partition(loaded.device.data)
    first_index, offsets = read_layout(path.with_suffix(".json"), len(examples))
    assert (first_index, offsets) == (40, [0, 10, 45, 90])
    for shard, (a, b) in zip(shards, ((0, 10), (10, 45), (45, 90)), strict=True):
        np.testing.assert_allclose(examples.x[a:b], shard.x, atol=1e-6)
        np.testing.assert_array_equal(examples.y[a:b], shard.y)


@pytest.mark.parametrize("layout", [{"first_index": 0, "offsets": [0, 50]}, {"first_index": 0, "offsets": [5, 90]},
                                    {"first_index": 0, "offsets": [0, 60, 30, 90]}, {"offsets": [0, 90]},
                                    {"first_index": -1, "offsets": [0, 90]}])
def test_a_layout_that_does_not_fit_the_examples_is_refused(tmp_path: Path, layout: dict[str, object]) -> None:
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    with pytest.raises(ConfigError) as caught:
        read_layout(path, 90)
    assert str(path) in str(caught.value)


def test_a_host_without_a_report_counts_all_its_devices_failed(tmp_path: Path) -> None:
    report = read_report(tmp_path / "missing.json", 150)
    assert (report.devices, report.failed, report.registrations) == (150, 150, 0)


@pytest.mark.parametrize(("extra", "message"), [({"processes": True}, "cannot be combined"),
                                                ({"device_hosts": 11}, "between 0 and the 10 devices"),
                                                ({"out_dir": None}, "--out")])
def test_simulate_refuses_device_hosts_it_cannot_run(tmp_path: Path, extra: dict[str, object], message: str) -> None:
    config = load_job_config(environ={}, overrides=["model.source=logreg"])
    options = SimulationOptions(config=config, num_devices=10, dataset="synthetic",
                                **{"device_hosts": 2, "out_dir": tmp_path, **extra})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        asyncio.run(simulate(options))
