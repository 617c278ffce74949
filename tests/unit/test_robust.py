"""Robust aggregation on hand-computed cases: median, trimmed mean, clipping, ties, non-finite input,
arrival order, sparse updates, checkpoints, and composition with averaging strategies."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unus_edge.aggregator import Checkpoint, load_checkpoint, save_checkpoint
from unus_edge.codec import SparseTensor
from unus_edge.config import load_job_config
from unus_edge.errors import StrategyError
from unus_edge.simulation import SimulationOptions, simulate
from unus_edge.strategies import ClientUpdate, Failure, FedAvg, Params, WeightedMean, load_strategy
from unus_edge.strategies._fedprox import FedProx
from unus_edge.strategies._robust import (
    CoordinateMedian,
    NormClipping,
    Robust,
    RobustFedAvg,
    RobustFedProx,
    TrimmedMean,
    robust_view,
    update_norm,
)

Array = np.ndarray[Any, Any]


def update(device_id: str, values: list[float] | Array, n: int = 10, name: str = "w") -> ClientUpdate:
    return ClientUpdate(device_id, n, {name: np.asarray(values, dtype=np.float32)}, base_version=0, train_loss=1.0)


def column(*values: float) -> list[ClientUpdate]:
    """One single-coordinate update per value."""
    return [update(f"d{i}", [v]) for i, v in enumerate(values)]


def combine(accumulator: Any, updates: list[ClientUpdate]) -> Array:
    for item in updates:
        accumulator.add(item)
    return accumulator.aggregate_delta()["w"]  # type: ignore[no-any-return]


TEMPLATE = {"w": np.zeros(1, np.float32)}


# ------------------------------------------------------------------------------ the median


@pytest.mark.parametrize(("values", "expected"), [
    ((1, 5, 3), 3.0),                  # odd: the middle value
    ((1, 2, 10, 4), 3.0),              # even: midpoint of the two middle values, (2 + 4) / 2
    ((7,), 7.0),                       # one update is its own median
    ((2, 2, 2, 7), 2.0),               # ties below the middle
    ((1, 1, 3, 3), 2.0),               # a tie on each side of the middle: still the midpoint
    ((-1e6, 0.5, 0.25, 1e6, 0.75), 0.5),  # outliers on both sides do not move it
    ((0.1, 0.2), 0.5 * (np.float32(0.1) + np.float64(np.float32(0.2)))),  # midpoint in float64
])
def test_median_by_hand(values: tuple[float, ...], expected: float) -> None:
    assert combine(CoordinateMedian(TEMPLATE), column(*values))[0] == expected


def test_median_is_per_coordinate_and_unweighted() -> None:
    updates = [update("a", [1, 10], n=1), update("b", [2, 30], n=1), update("c", [9, 20], n=1_000_000)]
    median = CoordinateMedian({"w": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(combine(median, updates), [2, 20])  # c's huge n_k buys nothing
    assert (median.count, median.num_examples) == (3, 1_000_002)
    assert median.train_loss == pytest.approx(1.0)


# ------------------------------------------------------------------------------ the trimmed mean


@pytest.mark.parametrize(("values", "fraction", "expected"), [
    ((1, 2, 3, 4, 100), 0.2, 3.0),           # k = 1: drop 1 and 100, mean of 2, 3, 4
    ((1, 1, 1, 5, 5), 0.2, 7 / 3),           # ties: drop one 1 and one 5, mean of 1, 1, 5
    ((4, 4, 4, 4), 0.25, 4.0),               # all tied
    ((1, 2, 3, 10), 0.25, 2.5),              # k = 1 of 4: the two middle values
    ((1, 2, 30), 0.25, 11.0),                # 0.25 * 3 < 1: k = 0, the plain mean
    ((1, 2, 3, 4, 5, 6, 7, 8, 9, 1000), 0.1, 5.5),  # k = 1 of 10
    ((-50, 1, 2, 3, 4, 50), 0.34, 2.5),      # floor(0.34 * 6) = 2: mean of 2 and 3
    ((5, 1, 3), 0.0, 3.0),                   # fraction 0: the unweighted mean
])
def test_trimmed_mean_by_hand(values: tuple[float, ...], fraction: float, expected: float) -> None:
    assert combine(TrimmedMean(TEMPLATE, fraction), column(*values))[0] == pytest.approx(expected, abs=1e-12)


def test_trimmed_count_absorbs_float_error() -> None:
    assert TrimmedMean(TEMPLATE, 0.29).trimmed(100) == 29  # 0.29 * 100 = 28.999999999999996
    assert TrimmedMean(TEMPLATE, 0.1).trimmed(9) == 0
    assert TrimmedMean(TEMPLATE, 0.49).trimmed(3) == 1     # one value always remains


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, math.nan, True])
def test_trimmed_fraction_must_leave_a_value(fraction: float) -> None:
    with pytest.raises(StrategyError, match=r"\[0, 0.5\)"):
        TrimmedMean(TEMPLATE, fraction)


# ------------------------------------------------------------------------------ non-finite input


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("make", [lambda: CoordinateMedian(TEMPLATE), lambda: TrimmedMean(TEMPLATE, 0.2),
                                  lambda: NormClipping(WeightedMean(TEMPLATE), 1e9)])
def test_non_finite_updates_are_ignored_and_listed(make: Any, bad: float) -> None:
    accumulator = make()
    for item in [update("a", [1.0]), update("evil", [bad]), update("b", [3.0])]:
        accumulator.add(item)
    assert accumulator.ignored == [("evil", "not_finite")]
    assert accumulator.count == 2
    view = robust_view(accumulator)
    assert isinstance(view, WeightedMean)
    np.testing.assert_array_equal(view.mean()["w"], [2.0])


def test_a_round_of_only_non_finite_updates_keeps_the_model() -> None:
    params = {"w": np.array([5.0], np.float32)}
    for robust, clip in (("median", 0.0), ("trimmed_mean", 0.0), ("none", 1.0), ("median", 1.0)):
        strategy = RobustFedAvg(robust=robust, clip_norm=clip)
        accumulator = strategy.new_accumulator(1, params)
        accumulator.add(update("evil", [math.nan]))
        assert accumulator.count == 0
        assert strategy.aggregate(1, params, accumulator, []) is None


def test_a_nan_in_one_tensor_rejects_the_whole_update() -> None:
    template = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    median = CoordinateMedian(template)
    median.add(ClientUpdate("evil", 1, {"w": np.array([100, 100], np.float32), "b": np.array([np.nan], np.float32)},
                            0, 0.0))
    median.add(ClientUpdate("good", 1, {"w": np.array([1, 2], np.float32), "b": np.array([3], np.float32)}, 0, 0.0))
    result = median.aggregate_delta()
    np.testing.assert_array_equal(result["w"], [1, 2])
    np.testing.assert_array_equal(result["b"], [3])


# ------------------------------------------------------------------------------ order, chunks, sparse


@pytest.mark.parametrize("make", [lambda t: CoordinateMedian(t), lambda t: TrimmedMean(t, 0.2)])
def test_results_do_not_depend_on_arrival_order_bit_for_bit(make: Any) -> None:
    rng = np.random.default_rng(7)
    size = 1000
    updates = [update(f"d{i}", rng.standard_normal(size)) for i in range(6)]
    updates.append(update("tie", np.asarray(updates[0].delta["w"])))  # exact ties with d0 everywhere
    results = []
    for order in itertools.islice(itertools.permutations(updates), 0, 5040, 500):
        accumulator = make({"w": np.zeros(size, np.float32)})
        results.append(combine(accumulator, list(order)))
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_large_tensors_are_combined_in_chunks_correctly() -> None:
    rng = np.random.default_rng(2)
    size = 400_001  # with 5 updates a 4 MB float64 block holds 104,857 columns: 4 chunks
    rows = rng.standard_normal((5, size)).astype(np.float32)
    median = combine(CoordinateMedian({"w": np.zeros(size, np.float32)}),
                     [update(f"d{i}", r) for i, r in enumerate(rows)])
    np.testing.assert_array_equal(median, np.median(rows.astype(np.float64), axis=0))
    ordered = np.sort(rows.astype(np.float64), axis=0)
    trimmed = combine(TrimmedMean({"w": np.zeros(size, np.float32)}, 0.2),
                      [update(f"d{i}", r) for i, r in enumerate(rows)])
    np.testing.assert_allclose(trimmed, ordered[1:4].mean(axis=0), rtol=0, atol=1e-12)


def test_sparse_and_missing_tensors_count_as_zeros() -> None:
    template = {"w": np.zeros(4, np.float32), "b": np.zeros(1, np.float32)}
    median = CoordinateMedian(template)
    dense = np.array([9, 9, 9, 9], np.float32)
    median.add(ClientUpdate("s", 1, {"w": SparseTensor.from_dense(dense, np.array([0, 1])),
                                     "b": np.array([1], np.float32)}, 0, 0.0))
    median.add(ClientUpdate("d", 1, {"w": np.array([1, 1, 1, 1], np.float32)}, 0, 0.0))  # no "b": zeros
    median.add(ClientUpdate("e", 1, {"w": np.array([2, 2, 2, 2], np.float32), "b": np.array([5], np.float32)}, 0, 0.0))
    result = median.aggregate_delta()
    np.testing.assert_array_equal(result["w"], [2, 2, 1, 1])  # median(9,1,2), median(0,1,2)
    np.testing.assert_array_equal(result["b"], [1])           # median(1, 0, 5)


# ------------------------------------------------------------------------------ clipping


def test_clipping_scales_large_updates_to_the_bound_and_leaves_the_others_alone() -> None:
    inner = WeightedMean({"w": np.zeros(2, np.float32)})
    clipping = NormClipping(inner, 5.0)
    small = update("small", [3.0, 0.0], n=1)  # norm 3: untouched
    large = update("large", [30.0, 40.0], n=1)  # norm 50: scaled by 0.1 to (3, 4)
    clipping.add(small)
    clipping.add(large)
    assert clipping.clipped == [("large", 50.0)]
    np.testing.assert_allclose(inner.mean()["w"], [3.0, 2.0])  # ((3, 0) + (3, 4)) / 2
    assert (clipping.count, clipping.num_examples) == (2, 2)


def test_clipping_measures_the_norm_of_the_whole_update_sparse_included() -> None:
    delta = {"a": np.array([3.0], np.float32), "b": SparseTensor.from_dense(np.array([0, 4, 0], np.float32),
                                                                            np.array([1]))}
    assert update_norm(delta) == 5.0
    inner = WeightedMean({"a": np.zeros(1, np.float32), "b": np.zeros(3, np.float32)})
    clipping = NormClipping(inner, 1.0)
    clipping.add(ClientUpdate("x", 1, delta, 0, 0.0))
    np.testing.assert_allclose(inner.mean()["a"], [0.6])
    np.testing.assert_allclose(inner.mean()["b"], [0.0, 0.8, 0.0])


def test_clipping_norm_is_computed_in_float64() -> None:
    huge = update("x", [3e30, 4e30])  # squares overflow float32, not float64
    assert update_norm(huge.delta) == pytest.approx(5e30)


@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan])
def test_clip_bound_must_be_positive_and_finite(bound: float) -> None:
    with pytest.raises(StrategyError, match="clip_norm"):
        NormClipping(WeightedMean(TEMPLATE), bound)


def test_clipping_composes_with_the_median() -> None:
    strategy = RobustFedAvg(robust="median", clip_norm=1.0)
    params = {"w": np.zeros(1, np.float32)}
    accumulator = strategy.new_accumulator(1, params)
    assert isinstance(accumulator, NormClipping)
    assert isinstance(accumulator.inner, CoordinateMedian)
    for item in column(0.5, -20.0, 0.75):  # -20 is clipped to -1 before the median
        accumulator.add(item)
    assert accumulator.inner.rows["w"][1][0] == -1.0
    result = strategy.aggregate(1, params, accumulator, [])
    assert result is not None
    np.testing.assert_array_equal(result["w"], [0.5])


# ------------------------------------------------------------------------------ strategies


def random_updates(seed: int, count: int = 5, size: int = 50) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [update(f"d{i}", rng.standard_normal(size), n=int(rng.integers(1, 500))) for i in range(count)]


def run_round(strategy: Any, params: Params, updates: list[ClientUpdate]) -> Params:
    accumulator = strategy.new_accumulator(1, params)
    for item in updates:
        accumulator.add(item)
    result = strategy.aggregate(1, params, accumulator, [Failure("late", "timeout")])
    assert result is not None
    return result  # type: ignore[no-any-return]


def test_robust_fedavg_with_defaults_is_fedavg_bit_for_bit() -> None:
    params = {"w": np.linspace(-1, 1, 50, dtype=np.float32)}
    updates = random_updates(1)
    plain = run_round(FedAvg(server_learning_rate=0.5), params, updates)
    assert np.array_equal(run_round(RobustFedAvg(server_learning_rate=0.5), params, updates)["w"], plain["w"])
    # a bound nobody reaches changes nothing either
    assert np.array_equal(run_round(RobustFedAvg(clip_norm=1e6, server_learning_rate=0.5), params, updates)["w"],
                          plain["w"])


def test_the_server_learning_rate_applies_to_the_robust_aggregate() -> None:
    params = {"w": np.array([1.0], np.float32)}
    result = run_round(RobustFedAvg(robust="median", server_learning_rate=0.5), params, column(1, 4, 100))
    np.testing.assert_array_equal(result["w"], [3.0])  # 1 + 0.5 * median(1, 4, 100)
    trimmed = run_round(RobustFedProx(mu=0.1, robust="trimmed_mean", trim_fraction=0.2), params,
                        column(-100, 1, 2, 3, 100))
    np.testing.assert_array_equal(trimmed["w"], [3.0])  # 1 + mean(1, 2, 3)


def test_robust_fedprox_keeps_fedproxs_tasks() -> None:
    from unus_edge.strategies import DeviceInfo, RoundContext

    strategy = RobustFedProx(mu=0.2, robust="median")
    assert isinstance(strategy.strategy, FedProx)  # it holds a FedProx
    chosen = strategy.configure_round(RoundContext(1, 1.0, 1, 10, 0.1, np.random.default_rng(0)),
                                      [DeviceInfo("a", 1), DeviceInfo("b", 1)])
    assert all(dict(a.config) == {"client": "fedprox", "proximal_mu": 0.2} for a in chosen)


class MeanDeltaTwice(FedAvg):
    """An averaging strategy that only uses ``accumulator.mean()`` (as a server optimiser does)."""

    def aggregate(self, server_round: int, global_params: Params, accumulator: Any,
                  failures: Any) -> Params | None:
        mean = accumulator.mean()
        return {name: value + 2 * mean[name] for name, value in global_params.items()}


class RobustMeanDeltaTwice(Robust):
    def __init__(self, robust: str = "median", trim_fraction: float = 0.1, clip_norm: float = 0.0) -> None:
        super().__init__(MeanDeltaTwice(), robust, trim_fraction, clip_norm)


def test_the_wrapper_composes_with_any_strategy_that_reads_a_mean() -> None:
    params = {"w": np.array([0.0], np.float32)}
    np.testing.assert_array_equal(run_round(RobustMeanDeltaTwice(), params, column(1, 2, 60))["w"], [4.0])
    np.testing.assert_array_equal(run_round(RobustMeanDeltaTwice(robust="none"), params,
                                            column(1, 2, 60))["w"], [42.0])  # 2 * n-weighted mean (equal n)


def test_with_its_defaults_the_wrapper_changes_nothing() -> None:
    params = {"w": np.linspace(0, 1, 50, dtype=np.float32)}
    updates = random_updates(3)
    assert np.array_equal(run_round(Robust(FedAvg()), params, updates)["w"], run_round(FedAvg(), params, updates)["w"])


def test_the_wrapper_hands_everything_but_the_accumulator_to_the_strategy_it_holds() -> None:
    from unus_edge.strategies import DeviceInfo, RoundContext

    inner = FedProx(mu=0.5)
    wrapped = Robust(inner, robust="median")
    context = RoundContext(1, 1.0, 1, 10, 0.1, np.random.default_rng(0))
    devices = [DeviceInfo("a", 10), DeviceInfo("b", 10)]
    assert wrapped.configure_round(context, devices) == inner.configure_round(
        RoundContext(1, 1.0, 1, 10, 0.1, np.random.default_rng(0)), devices)  # the device half's settings too
    assert wrapped.device_config() == inner.device_config() and wrapped.state_dict() == inner.state_dict()
    assert isinstance(wrapped.new_accumulator(1, {"w": np.zeros(2, np.float32)}), CoordinateMedian)


def test_an_asynchronous_strategy_cannot_be_wrapped() -> None:
    with pytest.raises(StrategyError, match="needs rounds"):
        Robust(load_strategy("fedasync"))


@pytest.mark.parametrize(("options", "message"), [
    ({"robust": "krum"}, "robust must be one of none, median, trimmed_mean"),
    ({"trim_fraction": 0.5}, r"trim_fraction must lie in \[0, 0.5\)"),
    ({"clip_norm": -1}, "clip_norm must be >= 0"),
    ({"clip_norm": "big"}, "clip_norm must be a finite number"),
    ({"clip": 1.0}, "accepts: clip_norm, robust, server_learning_rate, trim_fraction"),
])
def test_bad_options_say_what_is_wrong(options: dict[str, object], message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        load_strategy("unus_edge.strategies._robust:RobustFedAvg", options)


def test_options_from_the_job_config() -> None:
    config = load_job_config(environ={}, overrides=[
        "strategy.name=unus_edge.strategies._robust:RobustFedProx", "strategy.robust=trimmed_mean",
        "strategy.trim_fraction=0.2", "strategy.clip_norm=5", "strategy.mu=0.01"])
    strategy = load_strategy(config.strategy.name, config.strategy.options)
    assert isinstance(strategy, RobustFedProx)
    assert isinstance(strategy.strategy, FedProx)
    assert (strategy.robust, strategy.trim_fraction, strategy.clip_norm, strategy.strategy.mu) == (
        "trimmed_mean", 0.2, 5.0, 0.01)
    assert not strategy.asynchronous  # job.mode = "ssp" refuses it at start-up


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(("robust", "clip"), [("median", 0.0), ("trimmed_mean", 0.0), ("none", 2.0),
                                              ("median", 2.0)])
def test_a_round_in_progress_survives_a_checkpoint(robust: str, clip: float, tmp_path: Path) -> None:
    strategy = RobustFedAvg(robust=robust, trim_fraction=0.2, clip_norm=clip)
    params = {"w": np.zeros(50, np.float32)}
    updates = [*random_updates(5, count=6), update("evil", np.full(50, np.nan))]
    whole = strategy.new_accumulator(1, params)
    for item in updates:
        whole.add(item)
    first = strategy.new_accumulator(1, params)
    for item in updates[:3]:
        first.add(item)
    tensors, scalars = first.state_dict()  # type: ignore[attr-defined]
    # through the aggregator's real checkpoint file, as RoundDriver.state/restore use it
    save_checkpoint(tmp_path, Checkpoint(job="j", fingerprint="f", server_round=0, version=0, params=params,
                                         rng_state={}, driver={"accumulator": scalars},
                                         tensors={f"accumulator/{n}": v for n, v in tensors.items()}))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    resumed = strategy.new_accumulator(1, params)
    resumed.load_state_dict({n[len("accumulator/"):]: v for n, v in loaded.tensors.items()},  # type: ignore[attr-defined]
                            loaded.driver["accumulator"])
    for item in updates[3:]:
        resumed.add(item)
    expected, got = strategy.aggregate(1, params, whole, []), strategy.aggregate(1, params, resumed, [])
    assert expected is not None and got is not None
    assert np.array_equal(expected["w"], got["w"])
    assert resumed.ignored == whole.ignored == [("evil", "not_finite")]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ a whole federation


def test_a_robust_strategy_runs_over_the_embedded_broker() -> None:
    config = load_job_config(environ={}, overrides=[
        "job.name=robust", "job.rounds=2", "job.seed=1", "job.round_deadline=120", "model.source=mnist_2nn",
        "train.batch_size=10", "train.learning_rate=0.05", "evaluation.dataset=synthetic",
        "evaluation.num_examples=200", "strategy.name=unus_edge.strategies._robust:RobustFedAvg",
        "strategy.robust=median", "strategy.clip_norm=10"])

    async def run() -> Any:
        async with asyncio.timeout(240):
            return await simulate(SimulationOptions(config=config, num_devices=3, dataset="synthetic",
                                                    train_examples=600))

    report = asyncio.run(run())
    assert report.result.state == "finished"
    assert [m.num_updates for m in report.result.history] == [3, 3]
    assert report.result.history[-1].eval_accuracy is not None
    assert report.result.history[-1].train_loss is not None  # the metrics still come through
