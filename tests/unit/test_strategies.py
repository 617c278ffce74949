"""Strategies: FedAvg/FedSGD arithmetic, selection, streaming accumulation, loading."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from unus_edge.codec import SparseTensor
from unus_edge.errors import StrategyError
from unus_edge.strategies import (
    FULL_BATCH,
    ClientUpdate,
    DeviceInfo,
    Failure,
    FedAvg,
    FedSGD,
    RoundContext,
    WeightedMean,
    add_scaled,
    load_strategy,
    new_scratch,
    strategy_class,
)


def update(device_id: str, n: int, **delta: np.ndarray) -> ClientUpdate:
    return ClientUpdate(device_id, n, delta, base_version=0, train_loss=0.5)


def context(fraction: float = 1.0, seed: int = 0) -> RoundContext:
    return RoundContext(1, fraction, 2, 10, 0.1, np.random.default_rng(seed))


def test_weighted_mean_by_number_of_examples() -> None:
    template = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    mean = WeightedMean(template)
    mean.add(update("a", 1, w=np.array([1.0, 2.0], np.float32), b=np.array([3.0], np.float32)))
    mean.add(update("b", 3, w=np.array([5.0, 6.0], np.float32), b=np.array([-1.0], np.float32)))
    result = mean.mean()
    np.testing.assert_allclose(result["w"], [(1 + 15) / 4, (2 + 18) / 4])
    np.testing.assert_allclose(result["b"], [(3 - 3) / 4])
    assert result["w"].dtype == np.float32
    assert (mean.count, mean.num_examples, mean.total_weight) == (2, 4, 4.0)
    assert mean.train_loss == pytest.approx(0.5)


def test_sparse_updates_add_only_their_entries() -> None:
    mean = WeightedMean({"w": np.zeros((2, 3), np.float32)})
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)
    mean.add(update("a", 2, w=SparseTensor.from_dense(dense, np.array([1, 5]))))
    mean.add(update("b", 2, w=np.ones((2, 3), np.float32)))
    np.testing.assert_allclose(mean.mean()["w"], [[0.5, 1.0, 0.5], [0.5, 0.5, 3.0]])


def test_aggregate_is_independent_of_arrival_order() -> None:
    rng = np.random.default_rng(3)
    updates = [update(f"d{i}", int(rng.integers(1, 600)), w=rng.standard_normal(10_000).astype(np.float32))
               for i in range(5)]
    results = []
    for order in itertools.islice(itertools.permutations(updates), 12):
        mean = WeightedMean({"w": np.zeros(10_000, np.float32)})
        for item in order:
            mean.add(item)
        results.append(mean.mean()["w"])
    for other in results[1:]:
        assert np.array_equal(results[0], other)  # bit for bit


def test_accumulation_works_across_chunks() -> None:
    largest = {"w": np.broadcast_to(np.float32(0), (1 << 30,))}  # no memory behind it
    size = new_scratch(largest).shape[0] * 2 + 123  # three chunks of the scratch
    delta = np.random.default_rng(1).standard_normal(size).astype(np.float32)
    mean = WeightedMean({"w": np.zeros(size, np.float32)})
    mean.add(update("a", 7, w=delta))
    np.testing.assert_array_equal(mean.mean()["w"], delta)


@pytest.mark.parametrize("scratch_size", [1, 1000, 1 << 16, 1 << 20])
def test_add_scaled_works_with_any_scratch_size(scratch_size: int) -> None:
    """A scratch of any size works (a strategy may make its own): the chunks follow the scratch."""
    values = np.random.default_rng(2).standard_normal(300_001).astype(np.float32)
    target = np.zeros(values.shape, np.float64)
    add_scaled(target, values, 3.0, np.empty(scratch_size, np.float64))
    np.testing.assert_array_equal(target, values.astype(np.float64) * 3.0)


def test_fedavg_applies_the_mean_delta_and_keeps_the_model_when_nobody_answered() -> None:
    params = {"w": np.array([1.0, 1.0], np.float32)}
    strategy = FedAvg()
    empty = strategy.new_accumulator(1, params)
    assert strategy.aggregate(1, params, empty, [Failure("a", "timeout")]) is None
    accumulator = strategy.new_accumulator(1, params)
    accumulator.add(update("a", 1, w=np.array([2.0, 0.0], np.float32)))
    accumulator.add(update("b", 1, w=np.array([0.0, -2.0], np.float32)))
    np.testing.assert_allclose(strategy.aggregate(1, params, accumulator, [])["w"], [2.0, 0.0])  # type: ignore[index]
    slow = FedAvg(server_learning_rate=0.5)
    np.testing.assert_allclose(slow.aggregate(1, params, accumulator, [])["w"], [1.5, 0.5])  # type: ignore[index]
    with pytest.raises(StrategyError):
        FedAvg(server_learning_rate=0)


@pytest.mark.parametrize(("fraction", "devices", "expected"), [(1.0, 10, 10), (0.1, 100, 10), (0.1, 5, 1),
                                                               (0.7, 10, 7), (0.3, 10, 3), (0.25, 10, 2)])
def test_selection_size_is_max_c_times_k_and_one(fraction: float, devices: int, expected: int) -> None:
    available = [DeviceInfo(f"d{i:03d}", 10) for i in range(devices)]
    chosen = FedAvg().configure_round(context(fraction), available)
    assert len(chosen) == expected
    assert len({a.device_id for a in chosen}) == expected
    assert all(a.epochs == 2 and a.batch_size == 10 and a.learning_rate == 0.1 for a in chosen)


def test_selection_is_seeded_and_does_not_depend_on_input_order() -> None:
    available = [DeviceInfo(f"d{i:03d}", 10) for i in range(50)]
    first = [a.device_id for a in FedAvg().configure_round(context(0.2, seed=5), available)]
    again = [a.device_id for a in FedAvg().configure_round(context(0.2, seed=5), list(reversed(available)))]
    other = [a.device_id for a in FedAvg().configure_round(context(0.2, seed=6), available)]
    assert first == again
    assert first != other


def test_fedsgd_takes_one_full_batch_step() -> None:
    chosen = FedSGD().configure_round(context(), [DeviceInfo("a", 5), DeviceInfo("b", 7)])
    assert {(a.epochs, a.batch_size) for a in chosen} == {(1, FULL_BATCH)}


_USER_STRATEGY = '''
from unus_edge.strategies import FedAvg

class Halving(FedAvg):
    name = "halving"

    def __init__(self, factor: float = 0.5) -> None:
        super().__init__(server_learning_rate=factor)
'''


def test_loading_builtins_files_and_modules(tmp_path: Path) -> None:
    assert strategy_class("fedavg") is FedAvg
    assert strategy_class("FedSGD") is FedSGD
    assert strategy_class("unus_edge.strategies:FedAvg") is FedAvg
    path = tmp_path / "mine.py"
    path.write_text(_USER_STRATEGY)
    strategy = load_strategy(f"{path}:Halving", {"factor": 0.25})
    assert strategy.name == "halving"
    assert isinstance(strategy, FedAvg)
    assert strategy.server_learning_rate == 0.25


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("fedmagic", {}, "unknown strategy"),
        ("missing.py:X", {}, "does not exist"),
        ("unus_edge.nope:X", {}, "cannot import"),
        ("unus_edge.strategies:Failure", {}, "not a Strategy"),
        ("fedavg", {"server_lr": 1.0}, "accepts: server_learning_rate"),
    ],
)
def test_loading_errors_say_what_is_wrong(spec: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        load_strategy(spec, options)
