"""FedProx: the server half (tasks carry the device half and mu), the device half (the proximal term
changes the local objective exactly as mu/2 * ||w - w_global||^2 says), and mu = 0 IS FedAvg, from
one task to a whole federation over the embedded broker."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import REPO
from unus_edge.config import load_job_config
from unus_edge.data import load_dataset
from unus_edge.device._training import train_task
from unus_edge.errors import StrategyError
from unus_edge.messages import Task
from unus_edge.nn import Graph, TrainConfig, train
from unus_edge.onnx_io import read_parameters
from unus_edge.simulation import SimulationOptions, simulate
from unus_edge.strategies import (
    ClientStrategy,
    ClientUpdate,
    DeviceInfo,
    FedAvg,
    ProximalHook,
    RoundContext,
    client_strategy,
    load_strategy,
    strategy_class,
)
from unus_edge.strategies._fedprox import FedProx
from unus_edge.zoo import resolve_model

FEDPROX = "unus_edge.strategies._fedprox:FedProx"


def context(server_round: int = 1, fraction: float = 0.5, seed: int = 0) -> RoundContext:
    return RoundContext(server_round, fraction, 2, 10, 0.1, np.random.default_rng(seed))


DEVICES = [DeviceInfo(f"d{i:02d}", 100 + i) for i in range(10)]


# ------------------------------------------------------------------------------ the server half


def test_tasks_carry_the_device_half_and_mu_with_fedavgs_selection() -> None:
    fedavg, fedprox = FedAvg(), FedProx(mu=0.1)
    rng_avg, rng_prox = np.random.default_rng(4), np.random.default_rng(4)
    for server_round in range(1, 6):  # same RNG consumption: the same devices, round after round
        plain = fedavg.configure_round(RoundContext(server_round, 0.3, 2, 10, 0.1, rng_avg), DEVICES)
        prox = fedprox.configure_round(RoundContext(server_round, 0.3, 2, 10, 0.1, rng_prox), DEVICES)
        assert [(a.device_id, a.epochs, a.batch_size, a.learning_rate) for a in prox] == \
               [(a.device_id, a.epochs, a.batch_size, a.learning_rate) for a in plain]
        assert all(dict(a.config) == {"client": "fedprox", "proximal_mu": 0.1} for a in prox)


def test_aggregation_is_fedavgs() -> None:
    params = {"w": np.array([1.0, -1.0, 0.5], np.float32)}
    rng = np.random.default_rng(0)
    updates = [ClientUpdate(f"d{i}", int(rng.integers(1, 100)), {"w": rng.standard_normal(3).astype(np.float32)},
                            0, 0.1) for i in range(4)]
    results = []
    for strategy in (FedAvg(server_learning_rate=0.7), FedProx(mu=0.5, server_learning_rate=0.7)):
        accumulator = strategy.new_accumulator(1, params)
        for item in updates:
            accumulator.add(item)
        results.append(strategy.aggregate(1, params, accumulator, []))
    assert results[0] is not None and results[1] is not None
    assert np.array_equal(results[0]["w"], results[1]["w"])


@pytest.mark.parametrize("mu", [-0.1, math.nan, math.inf, True, "0.1"])
def test_a_bad_mu_is_refused(mu: object) -> None:
    with pytest.raises(StrategyError, match="mu must be"):
        FedProx(mu=mu)  # type: ignore[arg-type]


def test_loaded_by_module_path_with_options_from_the_job() -> None:
    config = load_job_config(environ={}, overrides=[f"strategy.name={FEDPROX}", "strategy.mu=0.01"])
    strategy = load_strategy(config.strategy.name, config.strategy.options)
    assert isinstance(strategy, FedProx)
    assert (strategy.mu, strategy.name) == (0.01, "fedprox")
    integer = load_strategy(FEDPROX, {"mu": 1})  # "--set strategy.mu=1" arrives as an int
    assert isinstance(integer, FedProx)
    assert integer.mu == 1.0
    assert isinstance(integer.mu, float)
    with pytest.raises(StrategyError, match="accepts: mu, server_learning_rate"):
        load_strategy(FEDPROX, {"proximal_mu": 0.1})


# ------------------------------------------------------------------------------ the device half


def test_the_device_half_adds_the_proximal_term_only_when_mu_is_positive() -> None:
    start = {"w": np.zeros(2, np.float32)}
    with_mu = client_strategy({"client": "fedprox", "proximal_mu": 0.25})
    assert type(with_mu) is ClientStrategy
    hooks = with_mu.hooks(start)
    assert len(hooks) == 1
    assert isinstance(hooks[0], ProximalHook)
    assert hooks[0].mu == 0.25
    assert client_strategy({"client": "fedprox", "proximal_mu": 0.0}).hooks(start) == []


@pytest.fixture(scope="module")
def logreg() -> tuple[Graph, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    model = resolve_model("logreg", seed=1)
    data = load_dataset("synthetic", "train", seed=2, num_examples=64)
    return Graph(model), read_parameters(model), data.x, data.y


def test_the_proximal_term_is_mu_times_w_minus_w_global(
        logreg: tuple[Graph, dict[str, np.ndarray], np.ndarray, np.ndarray]) -> None:
    """Two full-batch steps by hand: w1 = w0 - lr g(w0) (the term is 0 at w0), then
    w2 = w1 - lr (g(w1) + mu (w1 - w0)). So FedProx's w2 is plain SGD's w2 minus lr mu (w1 - w0)."""
    graph, w0, x, y = logreg
    lr, mu = 0.1, 0.5
    full = len(x)
    w1 = train(graph, w0, x, y, TrainConfig(1, full, lr, seed=0)).params
    plain = train(graph, w0, x, y, TrainConfig(2, full, lr, seed=0)).params
    proximal = train(graph, w0, x, y, TrainConfig(2, full, lr, seed=0), hooks=[ProximalHook(mu)]).params
    for name in w0:
        expected = plain[name].astype(np.float64) - lr * mu * (w1[name].astype(np.float64) - w0[name])
        np.testing.assert_allclose(proximal[name], expected, rtol=0, atol=1e-6)
    moved = max(float(np.max(np.abs(proximal[n] - plain[n]))) for n in w0)
    assert moved > 1e-4  # the term did something measurable


def task(config: dict[str, object]) -> Task:
    return Task("d0", "t1", 1, 0, 2, 8, 0.1, config={"seed": 11, **config})  # type: ignore[dict-item]


def test_a_task_with_mu_0_trains_exactly_like_fedavg(
        logreg: tuple[Graph, dict[str, np.ndarray], np.ndarray, np.ndarray]) -> None:
    graph, w0, x, y = logreg
    from unus_edge.data import Dataset

    data = Dataset(x, y, int(y.max()) + 1)
    stop = threading.Event()
    fedavg = train_task(graph, w0, data, task({}), stop)
    zero = train_task(graph, w0, data, task({"client": "fedprox", "proximal_mu": 0.0}), stop)
    positive = train_task(graph, w0, data, task({"client": "fedprox", "proximal_mu": 1.0}), stop)
    for name in w0:
        assert np.array_equal(fedavg.delta[name], zero.delta[name])  # type: ignore[arg-type]
    norm = {label: math.sqrt(sum(float(np.sum(np.square(result.delta[n]))) for n in w0))  # type: ignore[arg-type]
            for label, result in (("fedavg", fedavg), ("prox", positive))}
    assert norm["prox"] < norm["fedavg"]  # the proximal term holds the device closer to w_global


# ------------------------------------------------------------------------------ whole federations


def federation(strategy: str, **options: object) -> SimulationOptions:
    overrides = ["job.name=fedprox", "job.rounds=2", "job.seed=5", "job.fraction=1.0", "job.round_deadline=120",
                 "train.epochs=2", "train.batch_size=10", "train.learning_rate=0.05", "model.source=mnist_2nn",
                 "evaluation.dataset=synthetic", "evaluation.num_examples=200", f"strategy.name={strategy}"]
    overrides += [f"strategy.{key}={value}" for key, value in options.items()]
    return SimulationOptions(config=load_job_config(environ={}, overrides=overrides), num_devices=3,
                             dataset="synthetic", train_examples=600, scheme="dirichlet", alpha=1.0)


def test_fedprox_with_mu_0_is_fedavg_over_the_embedded_broker() -> None:
    async def runs() -> list[dict[str, np.ndarray]]:
        found = []
        async with asyncio.timeout(240):
            for strategy, options in (("fedavg", {}), (FEDPROX, {"mu": 0}), (FEDPROX, {"mu": 0.5})):
                report = await simulate(federation(strategy, **options))
                assert report.result.state == "finished"
                assert [m.num_updates for m in report.result.history] == [3, 3]
                found.append(report.result.params)
        return found

    fedavg, zero, positive = asyncio.run(runs())
    assert all(np.array_equal(fedavg[name], zero[name]) for name in fedavg)  # bit for bit
    assert max(float(np.max(np.abs(fedavg[n] - positive[n]))) for n in fedavg) > 1e-5


# ------------------------------------------------------------------------------ the experiment's subclass


def test_the_experiments_slow_devices_are_a_seeded_fixed_half() -> None:
    cls = strategy_class(f"{Path(REPO, 'bench', 'fedprox_experiment.py')}:HeterogeneousFedProx")
    strategy = cls(mu=0.0, slow_fraction=0.5, slow_epochs=1, seed=3)  # type: ignore[call-arg]
    assert isinstance(strategy, FedProx)
    devices = [DeviceInfo(f"device-{i:03d}", 100) for i in range(10)]
    slow_by_round = []
    for server_round in range(1, 4):
        chosen = strategy.configure_round(context(server_round, fraction=1.0, seed=server_round), devices)
        assert {a.config["proximal_mu"] for a in chosen} == {0.0}
        slow_by_round.append({a.device_id for a in chosen if a.epochs == 1})
        assert {a.epochs for a in chosen} == {1, 2}
    assert len(slow_by_round[0]) == 5
    assert slow_by_round[0] == slow_by_round[1] == slow_by_round[2]  # a property of the device
    other = cls(mu=0.0, slow_fraction=0.5, slow_epochs=1, seed=4)  # type: ignore[call-arg]
    assert {a.device_id for a in other.configure_round(context(1, 1.0), devices) if a.epochs == 1} != slow_by_round[0]
