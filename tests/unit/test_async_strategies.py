"""SSP averaging, FedAsync and FedBuff against small hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unus_edge.errors import StrategyError
from unus_edge.strategies import AsyncContext, ClientUpdate, FedAsync, FedAvg, FedBuff, SSPAveraging, staleness_function


def vector(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


def update(device_id: str, n: int, staleness: int = 0, *values: float) -> ClientUpdate:
    return ClientUpdate(device_id, n, vector(*values), base_version=0, train_loss=0.1, staleness=staleness)


def test_staleness_functions() -> None:
    assert staleness_function("constant")(7) == 1.0
    assert staleness_function("polynomial", a=0.5)(3) == pytest.approx(0.5)  # (3 + 1) ** -0.5
    assert staleness_function("polynomial")(3) == pytest.approx(0.5)
    assert staleness_function("hinge")(5) == pytest.approx(1 / 11)  # defaults a = 10, b = 4
    hinge = staleness_function("hinge", a=10, b=4)
    assert hinge(4) == 1.0
    assert hinge(5) == pytest.approx(1 / 11)  # 1 / (10 * (5 - 4) + 1)
    assert staleness_function("sqrt")(3) == pytest.approx(0.5)
    with pytest.raises(StrategyError):
        staleness_function("quadratic")


def test_ssp_averaging_weighs_by_n_k_over_n() -> None:
    strategy = SSPAveraging()
    context = AsyncContext(version=0, total_examples=4)
    strategy.start_async(vector(1.0, 1.0), context)
    assert strategy.on_update(update("a", 1, 0, 4.0, 0.0), context)
    np.testing.assert_allclose(strategy.global_params(context)["w"], [2.0, 1.0])  # 1 + (1/4) * 4
    assert strategy.on_update(update("b", 3, 1, 0.0, -4.0), context)
    np.testing.assert_allclose(strategy.global_params(context)["w"], [2.0, -2.0])  # 1 + (3/4) * -4


def test_ssp_averaging_with_all_updates_folded_once_is_fedavg_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(1000).astype(np.float32)}
    updates = [ClientUpdate(f"d{i}", int(rng.integers(10, 600)), {"w": rng.standard_normal(1000).astype(np.float32)},
                            0, 0.1) for i in range(5)]
    fedavg = FedAvg()
    accumulator = fedavg.new_accumulator(1, base)
    for item in updates:
        accumulator.add(item)
    expected = fedavg.aggregate(1, base, accumulator, [])
    ssp = SSPAveraging()
    context = AsyncContext(0, sum(u.num_examples for u in updates))
    ssp.start_async(base, context)
    for item in reversed(updates):
        ssp.on_update(item, context)
    assert expected is not None
    assert np.array_equal(ssp.global_params(context)["w"], expected["w"])


def test_fedasync_mixes_with_a_staleness_weighted_alpha() -> None:
    strategy = FedAsync(alpha=0.5, staleness="polynomial", a=0.5)
    assert strategy.device_config() == {"encoding": "weights"}
    context = AsyncContext(version=0, total_examples=1)
    strategy.start_async(vector(0.0, 2.0), context)
    strategy.on_update(update("a", 1, 0, 4.0, 4.0), context)  # alpha_t = 0.5 * 1
    np.testing.assert_allclose(strategy.global_params(context)["w"], [2.0, 3.0])
    strategy.on_update(update("b", 1, 3, 6.0, 3.0), context)  # alpha_t = 0.5 * (3 + 1) ** -0.5 = 0.25
    np.testing.assert_allclose(strategy.global_params(context)["w"], [0.75 * 2 + 0.25 * 6, 0.75 * 3 + 0.25 * 3])
    assert FedAsync(rho=0.01).device_config() == {"encoding": "weights", "proximal_mu": 0.01}
    with pytest.raises(StrategyError):
        FedAsync(alpha=0)


def test_fedbuff_buffers_k_updates_at_most_one_per_device() -> None:
    strategy = FedBuff(buffer_size=2, server_learning_rate=1.0, staleness="sqrt")
    context = AsyncContext(version=0, total_examples=1)
    strategy.start_async(vector(0.0), context)
    assert not strategy.on_update(update("a", 1, 0, 2.0), context)  # buffered
    assert not strategy.on_update(update("a", 1, 0, 100.0), context)  # a's second: held for the next buffer
    np.testing.assert_allclose(strategy.global_params(context)["w"], [0.0])
    assert strategy.on_update(update("b", 1, 3, 4.0), context)  # flush: (1 * 2 + 0.5 * 4) / 2 = 2
    np.testing.assert_allclose(strategy.global_params(context)["w"], [2.0])
    assert strategy.flushes == 1
    assert strategy.on_update(update("c", 1, 0, 2.0), context)  # a's held update + c: (100 + 2) / 2
    np.testing.assert_allclose(strategy.global_params(context)["w"], [2.0 + 51.0])
    with pytest.raises(StrategyError):
        FedBuff(buffer_size=0)


def test_synchronous_strategies_refuse_ssp_and_vice_versa() -> None:
    context = AsyncContext(0, 1)
    with pytest.raises(StrategyError, match="asynchronous"):
        FedAvg().start_async(vector(0.0), context)
    with pytest.raises(StrategyError, match="ssp"):
        SSPAveraging().aggregate(1, vector(0.0), None, [])
    assert math.isclose(FedAsync().mixing(0), 0.6)
