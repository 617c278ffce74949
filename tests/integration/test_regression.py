"""A regression job end to end through a real broker (issue 16: "or MSE for regression").

Three device daemons read their own CSV files of sensor readings (eight features, one float
target), keep a held-out fifth, and train a small MLP with the mean squared error the job names
(``train.loss = "mse"``). The aggregator evaluates centrally on a test set file and asks every
device to evaluate: both report a mean squared error, no accuracy, and the error falls well below
what predicting the mean would give.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.brokers import running_broker
from unus_edge import topics
from unus_edge.aggregator import JobResult, run_aggregator
from unus_edge.config import load_device_config, load_job_config
from unus_edge.data import REGRESSION, Dataset, save_partition, write_source
from unus_edge.device import run_device
from unus_edge.transport import ConnectOptions, MqttTransport
from unus_edge.zoo import build_mlp

JOB = "regression"


def sensor_readings(count: int, seed: int) -> Dataset:
    """y = a smooth function of eight readings plus noise: what a forecast model fits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 8)).astype(np.float32)
    weights = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    y = x @ weights + 0.5 * np.sin(2.0 * x[:, 0]) + rng.normal(scale=0.1, size=count).astype(np.float32)
    return Dataset(x, y.astype(np.float32), REGRESSION)


@pytest.mark.parametrize("kind", ["amqtt"])
def test_a_regression_job_trains_and_reports_mean_squared_errors(tmp_path: Path, kind: str) -> None:
    model = tmp_path / "regressor.onnx"
    model.write_bytes(build_mlp((16,), inputs=8, outputs=1, regression=True, seed=1))
    test_set = tmp_path / "test.npz"
    test = sensor_readings(400, seed=99)
    save_partition(test_set, test)
    baseline = float(np.var(test.y))  # the error of always predicting the mean
    sources = [write_source(sensor_readings(150, seed=index), tmp_path / f"pi-{index}.csv", "csv")
               for index in range(3)]

    async def scenario() -> tuple[JobResult, dict[str, Any]]:
        async with running_broker(kind, tmp_path) as broker:
            config = load_job_config(environ={}, overrides=[
                f"job.name={JOB}", "job.rounds=4", "job.min_devices=3", "job.round_deadline=60",
                f"model.source={model}", "train.loss=mse", "train.learning_rate=0.05", "train.batch_size=10",
                "evaluation.mode=both", f"evaluation.dataset={test_set}", "evaluation.federated_fraction=1.0",
                "evaluation.federated_timeout=30", f"broker.url={broker.url}"])
            devices = [
                asyncio.create_task(run_device(load_device_config(environ={}, overrides=[
                    f"device.id=pi-{index}", f"device.job={JOB}", f"device.data={source}", "device.task=regression",
                    "device.holdout=0.2", f"device.model={model}", "device.heartbeat_interval=1",
                    f"broker.url={broker.url}"]), exit_when_finished=True))
                for index, source in enumerate(sources)]
            async with asyncio.timeout(180):
                result = await run_aggregator(config, resume=False)
                await asyncio.gather(*devices)
            async with MqttTransport(ConnectOptions(host="127.0.0.1", port=broker.port)) as reader:
                await reader.subscribe(topics.metrics(JOB, "evaluation"))
                async with asyncio.timeout(30):
                    async for message in reader.messages():
                        return result, json.loads(message.payload)["body"]
            raise AssertionError("no retained metrics/evaluation")

    result, retained = asyncio.run(scenario())
    assert result.state == "finished" and result.rounds == 4
    central = [m.eval_mse for m in result.history]
    assert all(value is not None for value in central) and all(m.eval_accuracy is None for m in result.history)
    assert [m.eval_loss for m in result.history] == central
    assert central[-1] < 0.25 * baseline, (central, baseline)  # type: ignore[operator]
    assert central[-1] < central[0]  # type: ignore[operator]
    federated = result.federated
    assert [(m.num_selected, m.num_answered, m.num_failures) for m in federated] == [(3, 3, 0)] * 4
    assert all(m.accuracy is None and m.mse is not None and m.mse_std is not None for m in federated)
    assert all(m.num_examples == 90 for m in federated)  # 3 x 20 % of 150
    assert federated[-1].mse < 0.25 * baseline  # type: ignore[operator]
    assert retained["server_round"] == 4 and retained["mse"] is not None and retained["accuracy"] is None
