"""Distributed Selective SGD end to end: aggregator and devices over the embedded amqtt broker.

* theta_u = theta_d = 1 in round-robin order is sequential SGD (a reference written from that
  definition, with no strategy code);
* with sparse downloads and uploads the run equals, bit for bit, an in-process loop that calls
  the same strategy and device code with no messaging (the loop of ``bench/dssgd_experiment.py``);
* the asynchronous order runs on the SSP engine with s = inf.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import unus_edge.strategies._dssgd  # noqa: F401  (registers the "dssgd" device half for the in-process devices)
from unus_edge.codec import SparseTensor, Tensor
from unus_edge.config import JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device._training import train_task
from unus_edge.messages import Task
from unus_edge.nn import Graph, TrainConfig, train
from unus_edge.onnx_io import read_parameters
from unus_edge.seeds import device_seed
from unus_edge.simulation import SimulationOptions, simulate
from unus_edge.strategies import ClientStrategy, ClientUpdate, DeviceInfo, Params, RoundContext, client_strategy
from unus_edge.strategies._dssgd import DSSGD, DSSGDAsync
from unus_edge.zoo import resolve_model

SEED = 5
EXAMPLES = 400
LEARNING_RATE = 0.05
BATCH = 10


def job_config(rounds: int, mode: str = "sync", **options: object) -> JobConfig:
    strategy = "DSSGDAsync" if mode == "ssp" else "DSSGD"
    overrides = [
        "job.name=dssgd", f"job.rounds={rounds}", f"job.seed={SEED}", "job.round_deadline=120", f"job.mode={mode}",
        f"strategy.name=unus_edge.strategies._dssgd:{strategy}", "train.epochs=1", f"train.batch_size={BATCH}",
        f"train.learning_rate={LEARNING_RATE}", "model.source=mnist_2nn", "evaluation.dataset=synthetic",
        "evaluation.num_examples=200", "job.wait_for_devices=60", "broker.url=mqtt://127.0.0.1:1",
    ]
    if mode == "ssp":
        overrides.append("job.staleness_bound=inf")
    overrides += [f"strategy.{key}={value}" for key, value in options.items()]
    return load_job_config(environ={}, overrides=overrides)


def shards(count: int) -> list[Dataset]:
    """The devices' data exactly as ``simulate`` cuts it."""
    data = load_dataset("synthetic", "train", seed=SEED, num_examples=EXAMPLES)
    return [Dataset(data.x[i], data.y[i], data.num_classes) for i in partition(data.y, count, "iid", seed=SEED)]


async def run(config: JobConfig, devices: int) -> tuple[Params, list[int], int]:
    options = SimulationOptions(config=config, num_devices=devices, dataset="synthetic", train_examples=EXAMPLES)
    async with asyncio.timeout(300):
        report = await simulate(options)
    result = report.result
    assert result.state == "finished", result.reason
    assert result.rejected == {}
    return result.params, [m.num_updates for m in result.history], result.bytes_up


def merge(view: Params, payload: dict[str, Tensor]) -> None:
    """What a device does with a model message (``Device._apply_model``)."""
    for name, tensor in payload.items():
        if isinstance(tensor, SparseTensor):
            view[name].reshape(-1)[tensor.indices] = tensor.values
        else:
            view[name] = np.array(tensor)


def in_process(strategy: DSSGD, devices: int, rounds: int) -> Params:
    """The same strategy and device code, no broker: configure, train, upload, aggregate, publish."""
    model = resolve_model("mnist_2nn")
    graph = Graph(model)
    data = shards(devices)
    ids = [f"device-{index:03d}" for index in range(devices)]
    params = read_parameters(model)
    view = {name: value.copy() for name, value in params.items()}
    download = dict(strategy.model_payload(params))
    merge(view, download)
    clients: dict[str, ClientStrategy] = {}
    rng = np.random.default_rng(SEED)
    for server_round in range(1, rounds + 1):
        context = RoundContext(server_round, 1.0, 1, BATCH, LEARNING_RATE, rng)
        accumulator = strategy.new_accumulator(server_round, params)
        for assignment in strategy.configure_round(context, [DeviceInfo(i, 0) for i in ids]):
            index = ids.index(assignment.device_id)
            config = {**assignment.config, "seed": device_seed(SEED, server_round, assignment.device_id),
                      "momentum": 0.0, "weight_decay": 0.0}
            task = Task(assignment.device_id, "t", server_round, server_round - 1, assignment.epochs,
                        assignment.batch_size, assignment.learning_rate, config=config)
            client = clients[assignment.device_id] = client_strategy(config, clients.get(assignment.device_id))
            start = client.starting_point(view, download)
            result = train_task(graph, start, data[index], task, threading.Event(), client)
            accumulator.add(ClientUpdate(assignment.device_id, len(data[index]), result.delta, server_round - 1,
                                         result.train_loss))
        new = strategy.aggregate(server_round, params, accumulator, [])
        assert new is not None
        params = new
        download = dict(strategy.model_payload(params))
        merge(view, download)
    return params


def test_theta_one_round_robin_over_the_broker_is_sequential_sgd() -> None:
    devices, rounds = 4, 6
    params, updates, _ = asyncio.run(run(job_config(rounds, theta_d=1, theta_u=1), devices))
    assert updates == [1] * rounds
    model = resolve_model("mnist_2nn")
    graph = Graph(model)
    data = shards(devices)
    reference = read_parameters(model)
    for server_round in range(1, rounds + 1):  # device (r - 1) mod 4 trains one epoch from the last model
        index = (server_round - 1) % devices
        seed = device_seed(SEED, server_round, f"device-{index:03d}")
        reference = train(graph, reference, data[index].x, data[index].y,
                          TrainConfig(1, BATCH, LEARNING_RATE, seed=seed)).params
    worst = max(float(np.max(np.abs(params[name] - reference[name]))) for name in reference)
    assert worst <= 1e-6, worst  # w + (w' - w) in float32: last-bit differences only
    initial = read_parameters(model)
    assert max(float(np.max(np.abs(params[n] - initial[n]))) for n in initial) > 1e-2


@pytest.mark.parametrize("selection", ["largest", "random"])
def test_sparse_exchanges_over_the_broker_equal_the_in_process_loop(selection: str) -> None:
    devices, rounds = 5, 8
    options = {"theta_d": 0.1, "theta_u": 0.01, "selection": selection, "tau": 0.0005, "gamma": 0.05}
    params, updates, bytes_up = asyncio.run(run(job_config(rounds, **options), devices))
    assert updates == [1] * rounds
    expected = in_process(DSSGD(**options), devices, rounds)  # type: ignore[arg-type]
    for name in expected:
        np.testing.assert_array_equal(params[name], expected[name], err_msg=name)
    initial = read_parameters(resolve_model("mnist_2nn"))
    changed = sum(int(np.count_nonzero(params[n] != initial[n])) for n in initial)
    total = sum(value.size for value in initial.values())
    assert 0 < changed <= rounds * int(0.01 * total)  # each upload moves at most theta_u of the model
    dense_bytes = sum(value.nbytes for value in expected.values())
    assert bytes_up < rounds * dense_bytes * 0.05  # ~1% of the entries at 8 bytes each, plus envelopes


def test_the_asynchronous_order_runs_on_the_ssp_engine() -> None:
    devices, clocks = 3, 3
    config = job_config(clocks, mode="ssp", theta_d=0.1, theta_u=0.1)
    options = SimulationOptions(config=config, num_devices=devices, dataset="synthetic", train_examples=EXAMPLES)

    async def scenario() -> tuple[Params, int]:
        async with asyncio.timeout(300):
            report = await simulate(options)
        assert report.result.state == "finished", report.result.reason
        # Devices ahead of c_min (s = inf) may still be sending when the job ends: those updates are
        # refused "not_running", by design. Nothing else may be refused.
        assert set(report.result.rejected) <= {"not_running"}, report.result.rejected
        return report.result.params, report.result.version

    params, version = asyncio.run(scenario())
    assert version >= devices * clocks  # one version per added update; the job ends when c_min = 3
    initial = read_parameters(resolve_model("mnist_2nn"))
    changed = sum(int(np.count_nonzero(params[n] != initial[n])) for n in initial)
    total = sum(value.size for value in initial.values())
    assert 0 < changed <= int(0.1 * total) * version  # each update changes at most theta_u of the model
    assert DSSGDAsync.asynchronous
