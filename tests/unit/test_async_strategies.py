"""SSP averaging, FedAsync and FedBuff against small hand-computed examples."""

from __future__ import annotations

import json
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


def test_an_evaluation_mid_clock_does_not_change_the_rounding() -> None:
    """Reading the model to evaluate it folds nothing: the clock's end result is FedAvg's, bit for bit."""
    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal(5000).astype(np.float32)}
    updates = [ClientUpdate(f"d{i}", int(rng.integers(10, 600)), {"w": rng.standard_normal(5000).astype(np.float32)},
                            0, 0.1) for i in range(4)]
    context = AsyncContext(0, sum(u.num_examples for u in updates))
    plain, evaluated = SSPAveraging(), SSPAveraging()
    for strategy in (plain, evaluated):
        strategy.start_async(base, context)
    for index, item in enumerate(updates):
        plain.on_update(item, context)
        evaluated.on_update(item, context)
        if index in (0, 2):
            peek = evaluated.evaluation_params(context)  # what an evaluation mid-clock sees
            assert not np.array_equal(peek["w"], base["w"])  # the updates so far, folded for the reading
    assert np.array_equal(plain.global_params(context)["w"], evaluated.global_params(context)["w"])
    assert np.array_equal(evaluated.evaluation_params(context)["w"], evaluated.global_params(context)["w"])


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
    # a's held update, one flush staler when it enters this buffer (s(1) = 1 / sqrt(2)), + c:
    assert strategy.on_update(update("c", 1, 0, 2.0), context)
    np.testing.assert_allclose(strategy.global_params(context)["w"], [2.0 + (100 / math.sqrt(2) + 2) / 2], rtol=1e-6)
    with pytest.raises(StrategyError):
        FedBuff(buffer_size=0)


def fedbuff_sequence(strategy: FedBuff) -> list[float]:
    """K = 2: a=1, a=10, a=100 (a's second and third are held), b=1000, then c=2, d=4 to flush the held ones."""
    context = AsyncContext(version=0, total_examples=1)
    strategy.start_async(vector(0.0), context)
    models = []
    for device_id, value in [("a", 1.0), ("a", 10.0), ("a", 100.0), ("b", 1000.0), ("c", 2.0), ("d", 4.0)]:
        if strategy.on_update(update(device_id, 1, 0, value), context):
            models.append(float(strategy.global_params(context)["w"][0]))
    return models


def test_fedbuff_applies_every_held_update_once_in_arrival_order() -> None:
    strategy = FedBuff(buffer_size=2, staleness="constant")
    models = fedbuff_sequence(strategy)
    # [a=1, b=1000]; then a=10 (held) with c=2; then a=100 (held) with d=4. None is lost.
    assert models == pytest.approx([500.5, 500.5 + 6.0, 500.5 + 6.0 + 52.0])
    assert strategy.flushes == 3
    assert strategy.held == 0


def test_fedbuff_applies_the_partial_buffer_and_the_held_updates_when_the_job_ends() -> None:
    strategy = FedBuff(buffer_size=3, staleness="constant")
    context = AsyncContext(version=0, total_examples=1)
    strategy.start_async(vector(0.0), context)
    for device_id, value in [("a", 3.0), ("a", 30.0), ("a", 300.0), ("b", 6.0)]:
        assert not strategy.on_update(update(device_id, 1, 0, value), context)  # [a=3, b=6], a=30 and a=300 held
    assert strategy.finish_async(context) == 3  # [a, b], then [a=30], then [a=300]
    np.testing.assert_allclose(strategy.global_params(context)["w"], [(3 + 6 + 30 + 300) / 3])  # eta_g / K each
    assert strategy.held == 0 and strategy.finish_async(context) == 0  # nothing left: nothing changes
    assert SSPAveraging().finish_async(context) == 0  # holds nothing back


def test_fedbuff_weighs_a_held_update_by_its_staleness_when_it_enters_a_buffer() -> None:
    models = fedbuff_sequence(FedBuff(buffer_size=2, staleness="sqrt"))
    # a=10 arrived at staleness 0 and enters the buffer after 1 flush: s(1) = 1 / sqrt(2); a=100 after 2: 1 / sqrt(3).
    first = 500.5
    second = first + (10 / math.sqrt(2) + 2) / 2
    assert models == pytest.approx([first, second, second + (100 / math.sqrt(3) + 4) / 2])


def test_fedbuff_and_fedasync_take_a_staleness_callable() -> None:
    seen: list[int] = []

    def weight(staleness: int) -> float:
        seen.append(staleness)
        return 1.0 / (1 + staleness)

    models = fedbuff_sequence(FedBuff(buffer_size=2, staleness=weight))
    assert seen == [0, 0, 1, 0, 2, 0]  # a=1, b=1000, a=10 after one flush, c=2, a=100 after two, d=4
    assert models[-1] == pytest.approx(500.5 + (10 / 2 + 2) / 2 + (100 / 3 + 4) / 2)
    fedasync = FedAsync(alpha=0.5, staleness=lambda staleness: 0.5 ** staleness)
    assert fedasync.mixing(2) == pytest.approx(0.125)
    with pytest.raises(StrategyError, match="staleness"):
        FedBuff(staleness=3)  # type: ignore[arg-type]
    with pytest.raises(StrategyError, match="unknown staleness"):
        FedAsync(staleness="quadratic")


def test_fedbuff_held_updates_survive_a_state_dict_round_trip() -> None:
    context = AsyncContext(version=0, total_examples=1)
    strategy = FedBuff(buffer_size=2, staleness="sqrt")
    strategy.start_async(vector(0.0), context)
    for device_id, value in [("a", 1.0), ("a", 10.0), ("a", 100.0)]:
        assert not strategy.on_update(update(device_id, 1, 0, value), context)
    tensors, scalars = strategy.state_dict()
    json.dumps(scalars)  # the SSP engine checkpoints these as JSON
    tensors = {name: np.array(value) for name, value in tensors.items()}  # as read back from a checkpoint
    restored = FedBuff(buffer_size=2, staleness="sqrt")
    restored.start_async(vector(0.0), context)
    restored.load_state_dict(tensors, json.loads(json.dumps(scalars)))
    assert restored.held == 2
    assert fedbuff_sequence_from_b(restored) == fedbuff_sequence_from_b(strategy)
    assert restored.held == 0


def fedbuff_sequence_from_b(strategy: FedBuff) -> list[float]:
    context = AsyncContext(version=0, total_examples=1)
    models = []
    for device_id, value in [("b", 1000.0), ("c", 2.0), ("d", 4.0)]:
        if strategy.on_update(update(device_id, 1, 0, value), context):
            models.append(float(strategy.global_params(context)["w"][0]))
    return models


def test_fedbuff_loads_a_checkpoint_with_one_held_update_per_device() -> None:
    context = AsyncContext(version=0, total_examples=1)
    strategy = FedBuff(buffer_size=2, staleness="constant")
    strategy.start_async(vector(0.0), context)
    tensors = {"params/w": np.zeros(1, np.float32), "sums/w": np.ones(1), "held/a/w": np.array([10.0], np.float32)}
    strategy.load_state_dict(tensors, {"in_buffer": ["a"], "flushes": 0, "held": {"a": [1, 0, 0.1, 0]}})
    assert strategy.on_update(update("b", 1, 0, 1000.0), context)  # (1 + 1000) / 2; a=10 starts the next buffer
    assert strategy.on_update(update("c", 1, 0, 2.0), context)
    np.testing.assert_allclose(strategy.global_params(context)["w"], [500.5 + 6.0])


def test_synchronous_and_asynchronous_strategies_have_their_own_interfaces() -> None:
    """One ABC each, instead of one ABC whose other half raises (issue 13)."""
    from unus_edge.strategies import AsyncStrategy, Strategy

    assert isinstance(FedAvg(), Strategy) and not isinstance(FedAvg(), AsyncStrategy)
    assert not hasattr(FedAvg(), "start_async") and not hasattr(FedAvg(), "on_update")
    for strategy in (SSPAveraging(), FedAsync(), FedBuff()):
        assert isinstance(strategy, AsyncStrategy) and not isinstance(strategy, Strategy)
        assert not hasattr(strategy, "aggregate") and not hasattr(strategy, "configure_round")
    assert math.isclose(FedAsync().mixing(0), 0.6)


def test_each_mode_refuses_the_other_kind_of_strategy() -> None:
    from unus_edge.aggregator import prepare_job
    from unus_edge.config import load_job_config
    from unus_edge.errors import ConfigError

    cases = (("ssp", "fedavg", "no SSP/asynchronous mode"), ("sync", "fedasync", "asynchronous"))
    for mode, strategy, message in cases:
        config = load_job_config(environ={}, overrides=[f"job.mode={mode}", f"strategy.name={strategy}",
                                                        "model.source=logreg", "evaluation.dataset=none"])
        with pytest.raises(ConfigError, match=message):
            prepare_job(config)
