"""FedAvg over a real broker equals an in-process reference FedAvg loop with no messaging.

Five devices, three rounds, fixed seeds: every update must be applied exactly once, with the
right weight n_k, from the right base model and with the right per-device seed. The reference
below is written from the FedAvg formula, independently of the aggregator's code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import MosquittoBroker
from unus_edge.config import JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.nn import Graph, TrainConfig, train
from unus_edge.onnx_io import read_parameters
from unus_edge.seeds import device_seed
from unus_edge.simulation import SimulationOptions, simulate
from unus_edge.zoo import resolve_model

NUM_DEVICES = 5
ROUNDS = 3
EXAMPLES = 1000
ALPHA = 1.0  # Dirichlet shards: unequal sizes, so a wrong weighting cannot pass


def job_config(broker_url: str = "mqtt://127.0.0.1:1883") -> JobConfig:
    return load_job_config(environ={}, overrides=[
        "job.name=exact", f"job.rounds={ROUNDS}", "job.seed=7", "job.fraction=1.0", "job.round_deadline=120",
        "train.epochs=1", "train.batch_size=10", "train.learning_rate=0.05", "model.source=mnist_2nn",
        "evaluation.dataset=synthetic", "evaluation.num_examples=200", f"broker.url={broker_url}",
    ])


def reference_fedavg(config: JobConfig) -> dict[str, np.ndarray]:
    """Plain FedAvg: w <- sum_k (n_k / n) w_k, with every device selected each round."""
    model = resolve_model(config.model.source, seed=config.model.seed)
    graph = Graph(model)
    data = load_dataset("synthetic", "train", seed=config.job.seed, num_examples=EXAMPLES)
    shards = [Dataset(data.x[i], data.y[i], data.num_classes)
              for i in partition(data.y, NUM_DEVICES, "dirichlet", seed=config.job.seed, alpha=ALPHA)]
    assert len({len(shard) for shard in shards}) > 1, "unequal n_k, so that the weighting is tested"
    params = read_parameters(model)
    for server_round in range(1, ROUNDS + 1):
        total = sum(len(shard) for shard in shards)
        weighted = {name: np.zeros(value.shape, np.float64) for name, value in params.items()}
        for index, shard in enumerate(shards):
            device_id = f"device-{index:03d}"
            settings = TrainConfig(config.train.epochs, config.train.batch_size, config.train.learning_rate,
                                   seed=device_seed(config.job.seed, server_round, device_id))
            local = train(graph, params, shard.x, shard.y, settings).params
            for name in params:
                weighted[name] += len(shard) * (local[name] - params[name]).astype(np.float64)
        params = {name: params[name] + (weighted[name] / total).astype(np.float32) for name in params}
    return params


async def federated(config: JobConfig, *, embedded: bool) -> dict[str, np.ndarray]:
    options = SimulationOptions(config=config, num_devices=NUM_DEVICES, dataset="synthetic",
                                train_examples=EXAMPLES, embedded_broker=embedded, scheme="dirichlet", alpha=ALPHA)
    async with asyncio.timeout(240):
        report = await simulate(options)
    assert report.result.state == "finished"
    assert report.result.rounds == ROUNDS
    assert [m.num_updates for m in report.result.history] == [NUM_DEVICES] * ROUNDS
    assert report.result.rejected == {}
    return report.result.params


def assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    worst = max(float(np.max(np.abs(got[name] - expected[name]))) for name in expected)
    assert worst <= 1e-6, f"max abs difference {worst}"
    # ... and the model really moved: a broken aggregation that returns the initial model fails.
    initial = read_parameters(resolve_model("mnist_2nn"))
    assert max(float(np.max(np.abs(got[n] - initial[n]))) for n in initial) > 1e-2


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return reference_fedavg(job_config())


def test_fedavg_over_amqtt_matches_the_reference(reference: dict[str, np.ndarray]) -> None:
    assert_close(asyncio.run(federated(job_config(), embedded=True)), reference)


@pytest.mark.mosquitto
def test_fedavg_over_mosquitto_matches_the_reference(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    async def scenario() -> dict[str, np.ndarray]:
        broker = MosquittoBroker(tmp_path)
        await broker.start()
        try:
            return await federated(job_config(broker.url), embedded=False)
        finally:
            await broker.stop()

    assert_close(asyncio.run(scenario()), reference)
