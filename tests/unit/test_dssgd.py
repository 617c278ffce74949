"""Distributed Selective SGD: selection, clipping and counting on hand-computed cases; payload
sizes against theta_u; theta_u = theta_d = 1 in round-robin order is sequential SGD."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from unus_edge.codec import SparseTensor
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device._training import train_task
from unus_edge.errors import StrategyError
from unus_edge.messages import Task, Update, encode_message
from unus_edge.nn import Graph, TrainConfig, train
from unus_edge.onnx_io import read_parameters
from unus_edge.seeds import device_seed
from unus_edge.strategies import (
    AsyncContext,
    ClientUpdate,
    DeviceInfo,
    RoundContext,
    client_strategy,
    load_strategy,
)
from unus_edge.strategies._dssgd import DSSGD, DeltaSum, DSSGDAsync, DSSGDClient, UploadSettings, select_upload
from unus_edge.topics import Channel
from unus_edge.zoo import resolve_model

SPEC = "unus_edge.strategies._dssgd:DSSGD"


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def dense(tensor: object) -> np.ndarray:
    return tensor.to_dense() if isinstance(tensor, SparseTensor) else np.asarray(tensor)


def context(server_round: int, seed: int = 0) -> RoundContext:
    return RoundContext(server_round, 1.0, 1, 10, 0.1, np.random.default_rng(seed))


# ------------------------------------------------------------------------------------ upload selection


def test_largest_entries_are_selected_over_the_whole_model_and_clipped() -> None:
    delta = {"a": f32(0.5, -3.0, 0.0, 1.0), "b": np.array([[2.0, -0.1], [0.0, 4.0]], np.float32)}
    # 8 entries, theta_u = 0.375 -> 3: |4| (b[1,1]), |-3| (a[1]), |2| (b[0,0]); clipped to [-2.5, 2.5].
    upload = select_upload(delta, UploadSettings(theta_u=0.375, gamma=2.5), np.random.default_rng(0))
    assert isinstance(upload["a"], SparseTensor)  # one entry: 8 bytes < 16 dense
    assert upload["a"].indices.tolist() == [1] and upload["a"].values.tolist() == [-2.5]
    assert upload["a"].indices.dtype == np.int32 and upload["a"].values.dtype == np.float32
    # two of four entries: 16 bytes sparse is not smaller than 16 dense, so it goes dense
    assert isinstance(upload["b"], np.ndarray)
    np.testing.assert_array_equal(upload["b"], [[2.0, 0.0], [0.0, 2.5]])


def test_largest_never_uploads_exact_zeros_and_keeps_at_least_one_entry() -> None:
    delta = {"w": f32(0.0, 0.2, 0.0, -0.1, 0.0, 0.0, 0.0, 0.0)}
    upload = select_upload(delta, UploadSettings(theta_u=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(dense(upload["w"]), delta["w"])
    assert isinstance(upload["w"], SparseTensor) and upload["w"].nnz == 2
    tiny = select_upload(delta, UploadSettings(theta_u=0.01), np.random.default_rng(0))  # floor(0.08) -> 1
    assert isinstance(tiny["w"], SparseTensor) and tiny["w"].indices.tolist() == [1]


def test_random_selection_takes_entries_above_tau_only() -> None:
    delta = {"w": f32(0.05, -0.3, 0.2, 0.1, -0.01, 0.5, 0.0, -0.25, 0.15, 0.02)}
    above = {1, 2, 5, 7, 8}  # |delta| > 0.12
    everything = select_upload(delta, UploadSettings(theta_u=1.0, selection="random", tau=0.12),
                               np.random.default_rng(0))
    assert set(np.flatnonzero(dense(everything["w"]))) == above
    for seed in range(20):
        upload = select_upload(delta, UploadSettings(theta_u=0.2, selection="random", tau=0.12, gamma=0.2),
                               np.random.default_rng(seed))
        values = dense(upload["w"])
        chosen = set(np.flatnonzero(values))
        assert len(chosen) == 2 and chosen <= above
        np.testing.assert_array_equal(values[sorted(chosen)], np.clip(delta["w"][sorted(chosen)], -0.2, 0.2))
    same = [dense(select_upload(delta, UploadSettings(theta_u=0.2, selection="random", tau=0.12),
                                np.random.default_rng(3))["w"]) for _ in range(2)]
    np.testing.assert_array_equal(*same)  # reproducible from the task's seed


def test_differential_privacy_needs_random_selection_and_a_finite_gamma() -> None:
    with pytest.raises(StrategyError, match="selection = 'random'"):
        UploadSettings.parse({"epsilon": 1.0, "gamma": 0.01})
    with pytest.raises(StrategyError, match="finite gamma"):
        UploadSettings.parse({"epsilon": 1.0, "selection": "random"})
    for bad in ({"theta_u": 0}, {"theta_u": 1.5}, {"selection": "top"}, {"tau": -1}, {"gamma": 0},
                {"epsilon": -1}, {"theta_u": "a lot"}):
        with pytest.raises(StrategyError):
            UploadSettings.parse(bad)
    assert UploadSettings.parse({"gamma": "inf"}).gamma == math.inf
    for bad_options in ({"theta_d": 1.5}, {"theta_d": 0}, {"order": "async"}):
        with pytest.raises(StrategyError):
            load_strategy(SPEC, bad_options)


def test_sparse_vector_technique_selects_at_most_c_bounded_entries_with_fresh_noise() -> None:
    delta = {"w": np.linspace(-1, 1, 1000, dtype=np.float32)}
    settings = UploadSettings(theta_u=0.01, selection="random", tau=0.5, gamma=0.8, epsilon=1e9)
    # A huge budget: negligible noise, so the SVT picks 10 entries with |clip(delta)| >= tau.
    upload = select_upload(delta, settings, np.random.default_rng(0))
    values = dense(upload["w"])
    chosen = np.flatnonzero(values)
    assert len(chosen) == 10 and bool(np.all(np.abs(delta["w"][chosen]) >= 0.5 - 1e-3))
    np.testing.assert_allclose(values[chosen], np.clip(delta["w"][chosen], -0.8, 0.8), atol=1e-3)
    # A small budget: noisy, but never more than c entries and never outside [-gamma, gamma].
    noisy = dense(select_upload(delta, UploadSettings(0.01, "random", 0.5, 0.8, 1.0), np.random.default_rng(1))["w"])
    assert np.count_nonzero(noisy) <= 10 and np.max(np.abs(noisy)) <= np.float32(0.8)
    # The device draws the noise from OS entropy, not from the task's (server-known) seed.
    client = DSSGDClient({"client": "dssgd", "theta_u": 0.01, "selection": "random", "tau": 0.0, "gamma": 0.8,
                          "epsilon": 1.0})
    start = {"w": np.zeros(1000, np.float32)}
    uploads = [dense(client.upload(start, delta, np.random.default_rng(7))["w"]) for _ in range(2)]
    assert not np.array_equal(*uploads)


# ------------------------------------------------------------------------------------ server side


def test_the_server_adds_deltas_and_counts_the_changed_parameters() -> None:
    strategy = load_strategy(SPEC, {"theta_d": 1, "theta_u": 0.5})
    assert isinstance(strategy, DSSGD)
    global_params = {"w": f32(1.0, 1.0, 1.0, 1.0), "b": f32(0.0, 0.0)}
    accumulator = strategy.new_accumulator(1, global_params)
    assert isinstance(accumulator, DeltaSum)
    sparse = SparseTensor((4,), np.array([0, 2, 3], np.int32), f32(0.5, 0.0, -2.0))  # a stored zero: not a change
    accumulator.add(ClientUpdate("a", 10, {"w": sparse, "b": f32(0.0, 3.0)}, 0, 0.4))
    accumulator.add(ClientUpdate("b", 30, {"w": f32(0.25, 0.0, 0.0, 1.0), "b": f32(0.0, 0.0)}, 0, 0.8))
    new = strategy.aggregate(1, global_params, accumulator, [])
    assert new is not None
    np.testing.assert_array_equal(new["w"], [1.75, 1.0, 1.0, 0.0])  # 1 + 0.5 + 0.25, 1, 1, 1 - 2 + 1: no averaging
    np.testing.assert_array_equal(new["b"], [0.0, 3.0])
    assert new["w"].dtype == np.float32
    np.testing.assert_array_equal(strategy.counts["w"], [2, 0, 0, 2])
    np.testing.assert_array_equal(strategy.counts["b"], [0, 1])
    assert accumulator.train_loss == pytest.approx((0.4 * 10 + 0.8 * 30) / 40)
    assert strategy.aggregate(2, new, strategy.new_accumulator(2, new), []) is None  # nobody answered


def test_the_accumulator_and_the_counters_survive_a_checkpoint() -> None:
    template = {"w": np.zeros(3, np.float32)}
    accumulator = DeltaSum(template)
    accumulator.add(ClientUpdate("a", 5, {"w": f32(1.0, 0.0, 2.0)}, 0, 0.1))
    restored = DeltaSum(template)
    restored.load_state_dict(*accumulator.state_dict())
    np.testing.assert_array_equal(restored.sums["w"], [1.0, 0.0, 2.0])
    np.testing.assert_array_equal(restored.touched["w"], [1, 0, 1])
    assert (restored.count, restored.num_examples) == (1, 5)
    strategy = DSSGD(theta_d=0.5)
    strategy.aggregate(1, template, accumulator, [])
    again = DSSGD(theta_d=0.5)
    again.load_state_dict(*strategy.state_dict())
    np.testing.assert_array_equal(again.counts["w"], [1, 0, 1])


def test_the_download_is_the_most_updated_fraction() -> None:
    strategy = DSSGD(theta_d=0.5)
    params = {"a": f32(10.0, 11.0, 12.0, 13.0), "b": np.array([[20.0, 21.0], [22.0, 23.0]], np.float32)}
    first = strategy.model_payload(params)  # nothing updated yet: nothing to download
    assert all(isinstance(t, SparseTensor) and t.nnz == 0 for t in first.values())
    strategy.counts = {"a": np.array([3, 0, 1, 5]), "b": np.array([[0, 7], [2, 0]])}
    payload = strategy.model_payload(params)  # 8 entries, theta_d = 0.5 -> the 4 most updated
    assert list(payload) == ["a", "b"]
    assert isinstance(payload["a"], SparseTensor) and isinstance(payload["b"], SparseTensor)
    assert payload["a"].indices.tolist() == [0, 3] and payload["a"].values.tolist() == [10.0, 13.0]
    assert payload["b"].indices.tolist() == [1, 2] and payload["b"].values.tolist() == [21.0, 22.0]
    strategy.counts = {"a": np.array([0, 0, 0, 1]), "b": np.array([[0, 0], [0, 0]])}
    only = strategy.model_payload(params)  # fewer updated entries than theta_d allows: only those
    assert only["a"].indices.tolist() == [3] and only["b"].nnz == 0  # type: ignore[union-attr]
    assert DSSGD(theta_d=1).model_payload(params) is params  # theta_d = 1: the whole model, dense


def test_ties_between_equal_counts_depend_on_the_counts_only() -> None:
    params = {"a": np.arange(100, dtype=np.float32), "b": np.arange(100, dtype=np.float32)}

    def picked(counts: int) -> list[list[int]]:
        strategy = DSSGD(theta_d=0.1)
        strategy.counts = {"a": np.full(100, counts), "b": np.full(100, counts)}
        return [t.indices.tolist() for t in strategy.model_payload(params).values()]  # type: ignore[union-attr]

    first = picked(1)
    assert sum(len(p) for p in first) == 20
    assert all(0 < len(p) < 20 for p in first)  # a permutation, not "the first tensor wins"
    assert picked(1) == first  # the same counts, the same download (reproducible, nothing to checkpoint)
    assert picked(2) != first  # after another update the tie goes another way


def test_one_participant_per_round_in_round_robin_or_seeded_random_order() -> None:
    devices = [DeviceInfo(f"d{i}", 600) for i in (2, 0, 1)]
    strategy = DSSGD(theta_u=0.01, gamma=0.5)
    chosen = [strategy.configure_round(context(r), devices) for r in range(1, 6)]
    assert [[a.device_id for a in round_] for round_ in chosen] == [["d0"], ["d1"], ["d2"], ["d0"], ["d1"]]
    assignment = chosen[0][0]
    assert (assignment.epochs, assignment.batch_size, assignment.learning_rate) == (1, 10, 0.1)
    assert dict(assignment.config) == {"client": "dssgd", "theta_u": 0.01, "selection": "largest", "tau": 0.0,
                                       "epsilon": 0.0, "gamma": 0.5}
    assert "gamma" not in DSSGD().configure_round(context(1), devices)[0].config  # inf: no clipping
    random_order = DSSGD(order="random")
    picks = [random_order.configure_round(context(r, seed=5), devices)[0].device_id for r in range(1, 4)]
    again = [random_order.configure_round(context(r, seed=5), devices)[0].device_id for r in range(1, 4)]
    assert picks == again and random_order.configure_round(context(1), []) == []


def test_asynchronous_updates_are_added_as_they_arrive() -> None:
    strategy = load_strategy("unus_edge.strategies._dssgd:DSSGDAsync", {"theta_d": 0.5, "theta_u": 0.25})
    assert isinstance(strategy, DSSGDAsync) and strategy.asynchronous
    assert strategy.device_config()["client"] == "dssgd"
    async_context = AsyncContext(0, 100, None)
    strategy.start_async({"w": f32(1.0, 2.0, 3.0, 4.0)}, async_context)
    sparse = SparseTensor((4,), np.array([1], np.int32), f32(0.5))
    assert strategy.on_update(ClientUpdate("a", 10, {"w": sparse}, 0, 0.1), async_context)
    assert strategy.on_update(ClientUpdate("b", 10, {"w": f32(0.0, 1.0, 0.0, -1.0)}, 0, 0.1, staleness=5),
                              async_context)
    np.testing.assert_array_equal(strategy.global_params(async_context)["w"], [1.0, 3.5, 3.0, 3.0])
    np.testing.assert_array_equal(strategy.counts["w"], [0, 2, 0, 1])
    payload = strategy.model_payload(strategy.global_params(async_context))["w"]
    assert isinstance(payload, SparseTensor) and payload.indices.tolist() == [1, 3]
    restored = DSSGDAsync(theta_d=0.5)
    restored.start_async({"w": np.zeros(4, np.float32)}, async_context)
    restored.load_state_dict(*strategy.state_dict())
    np.testing.assert_array_equal(restored.global_params(async_context)["w"], [1.0, 3.5, 3.0, 3.0])
    np.testing.assert_array_equal(restored.counts["w"], [0, 2, 0, 1])
    assert not hasattr(strategy, "aggregate")  # an AsyncStrategy has no rounds


# ------------------------------------------------------------------------------------ device side


def test_the_participant_overwrites_only_what_it_downloaded_and_keeps_its_local_model() -> None:
    client = client_strategy({"client": "dssgd", "theta_u": 0.5})
    assert isinstance(client, DSSGDClient)
    view = {"w": f32(1.0, 2.0, 3.0, 4.0)}
    first = client.starting_point(view, {"w": SparseTensor((4,), np.array([], np.int32), f32())})
    np.testing.assert_array_equal(first["w"], [1.0, 2.0, 3.0, 4.0])  # first exchange: the global view
    trained = {"w": f32(1.5, 2.0, 0.0, 4.25)}
    upload = client.upload(first, trained, np.random.default_rng(0))["w"]
    np.testing.assert_array_equal(dense(upload), [0.5, 0.0, -3.0, 0.0])  # the 2 largest of (0.5, 0, -3, 0.25)
    again = client_strategy({"client": "dssgd", "theta_u": 0.5}, client)
    assert again is client  # one instance per daemon: the local model survives between tasks
    download = {"w": SparseTensor((4,), np.array([0, 3], np.int32), f32(9.0, 8.0))}
    start = client.starting_point({"w": f32(9.0, 7.0, 7.0, 8.0)}, download)
    np.testing.assert_array_equal(start["w"], [9.0, 2.0, 0.0, 8.0])  # local entries 1, 2 kept
    whole = client.starting_point(view, {"w": f32(5.0, 6.0, 7.0, 8.0)})  # a dense download: everything
    np.testing.assert_array_equal(whole["w"], [5.0, 6.0, 7.0, 8.0])


def test_upload_bytes_shrink_with_theta_u() -> None:
    params = read_parameters(resolve_model("mnist_2nn"))
    rng = np.random.default_rng(0)
    delta = {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in params.items()}
    total = sum(value.size for value in params.values())
    sizes = {}
    for theta_u in (1.0, 0.1, 0.01, 0.001):
        tensors = select_upload(delta, UploadSettings(theta_u=theta_u), rng)
        assert sum(int(np.count_nonzero(dense(t))) for t in tensors.values()) == int(theta_u * total)
        update = Update("d", "s", "t", 1, 0, 600, 0.1, tensors)
        sizes[theta_u] = len(encode_message(update, "job", Channel.UPDATE))
    assert sizes[1.0] == pytest.approx(4 * total, rel=0.01)  # dense float32
    for theta_u in (0.1, 0.01, 0.001):  # int32 index + float32 value per entry, plus the envelope
        assert sizes[theta_u] == pytest.approx(8 * theta_u * total, rel=0.05, abs=1000)
    assert sizes[0.001] < sizes[0.01] < sizes[0.1] < sizes[1.0]


# ------------------------------------------------------------------------------------ reduction


def test_theta_u_and_theta_d_one_in_round_robin_order_is_sequential_sgd() -> None:
    """One participant per round, one epoch, everything downloaded and uploaded, no clipping:
    the global model after k rounds is SGD over the participants' data one after another."""
    model = resolve_model("mnist_2nn")
    graph = Graph(model)
    data = load_dataset("synthetic", "train", seed=3, num_examples=240)
    shards = [Dataset(data.x[i], data.y[i], data.num_classes) for i in partition(data.y, 4, "iid", seed=3)]
    ids = [f"device-{i:03d}" for i in range(4)]
    strategy = DSSGD(theta_d=1, theta_u=1)
    clients: dict[str, DSSGDClient] = {}
    params = read_parameters(model)
    reference = {name: value.copy() for name, value in params.items()}
    download = strategy.model_payload(params)
    for server_round in range(1, 7):
        (assignment,) = strategy.configure_round(context(server_round), [DeviceInfo(i, 60) for i in reversed(ids)])
        index = ids.index(assignment.device_id)
        assert index == (server_round - 1) % 4
        seed = device_seed(3, server_round, assignment.device_id)
        task = Task(assignment.device_id, "t", server_round, server_round - 1, 1, 10, 0.05,
                    config={**assignment.config, "seed": seed})
        client = clients.setdefault(assignment.device_id, DSSGDClient(task.config))
        start = client.starting_point(params, download)
        result = train_task(graph, start, shards[index], task, threading.Event(), client)
        accumulator = strategy.new_accumulator(server_round, params)
        accumulator.add(ClientUpdate(assignment.device_id, 60, result.delta, server_round - 1, result.train_loss))
        new = strategy.aggregate(server_round, params, accumulator, [])
        assert new is not None
        params = new
        download = strategy.model_payload(params)
        # Sequential SGD: the next participant trains one epoch from the previous one's model.
        reference = train(graph, reference, shards[index].x, shards[index].y,
                          TrainConfig(1, 10, 0.05, seed=seed)).params
    # w + (w' - w) in float32 may differ from w' in the last bit: a few ulps over six hand-offs.
    worst = max(float(np.max(np.abs(params[name] - reference[name]))) for name in params)
    assert worst <= 1e-6, worst
    initial = read_parameters(model)
    assert max(float(np.max(np.abs(params[n] - initial[n]))) for n in params) > 1e-2
