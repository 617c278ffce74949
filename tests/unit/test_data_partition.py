"""Partition schemes: invariants over random inputs, the documented label distributions, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unus_edge.data import partition, partition_dirichlet, partition_iid, partition_shards, read_idx
from unus_edge.errors import DataError

Parts = list[np.ndarray]


def check_is_partition(parts: Parts, num_examples: int, num_parts: int) -> None:
    """Disjoint, covering, int64, sorted index arrays: one per part."""
    assert len(parts) == num_parts
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "each part is strictly ascending (so also duplicate-free)"
    everything = np.concatenate(parts)
    assert everything.shape[0] == num_examples, "every example exactly once: count"
    np.testing.assert_array_equal(np.sort(everything), np.arange(num_examples))


def histograms(labels: np.ndarray, parts: Parts, num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[part], minlength=num_classes) for part in parts])


def mnist_like_labels(seed: int = 0) -> np.ndarray:
    """60 000 labels with MNIST's class counts, shuffled."""
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    labels = np.repeat(np.arange(10, dtype=np.int64), counts)
    return np.random.default_rng(seed).permutation(labels)


# -- invariants over random inputs --------------------------------------------------------


@st.composite
def labels_and_parts(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    num_examples = draw(st.integers(min_value=1, max_value=300))
    num_classes = draw(st.integers(min_value=1, max_value=12))
    labels = draw(hnp.arrays(np.int64, num_examples, elements=st.integers(0, num_classes - 1)))
    num_parts = draw(st.integers(min_value=1, max_value=num_examples))
    return labels, num_parts


@settings(max_examples=150, deadline=None)
@given(case=labels_and_parts(), seed=st.integers(0, 2**32))
def test_iid_invariants(case: tuple[np.ndarray, int], seed: int) -> None:
    labels, num_parts = case
    parts = partition_iid(labels, num_parts, seed=seed)
    check_is_partition(parts, labels.shape[0], num_parts)
    sizes = [part.shape[0] for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert [part.tolist() for part in partition(labels, num_parts, "iid", seed=seed)] == [p.tolist() for p in parts]


@settings(max_examples=150, deadline=None)
@given(case=labels_and_parts(), seed=st.integers(0, 2**32), shards_per_part=st.integers(1, 4))
def test_shards_invariants(case: tuple[np.ndarray, int], seed: int, shards_per_part: int) -> None:
    labels, num_parts = case
    num_examples = labels.shape[0]
    if num_parts * shards_per_part > num_examples:
        with pytest.raises(DataError) as caught:
            partition_shards(labels, num_parts, seed=seed, shards_per_part=shards_per_part)
        assert caught.value.reason == "too_many_shards"
        return
    parts = partition_shards(labels, num_parts, seed=seed, shards_per_part=shards_per_part)
    check_is_partition(parts, num_examples, num_parts)
    check_shard_structure(labels, parts, shards_per_part)
    again = partition(labels, num_parts, "shards", seed=seed, shards_per_part=shards_per_part)
    assert [part.tolist() for part in again] == [part.tolist() for part in parts]


@settings(max_examples=150, deadline=None)
@given(
    case=labels_and_parts(),
    seed=st.integers(0, 2**32),
    alpha=st.sampled_from([0.01, 0.1, 0.5, 1.0, 10.0, 1e4]),
)
def test_dirichlet_invariants(case: tuple[np.ndarray, int], seed: int, alpha: float) -> None:
    labels, num_parts = case
    parts = partition_dirichlet(labels, num_parts, seed=seed, alpha=alpha, min_examples=0)
    check_is_partition(parts, labels.shape[0], num_parts)
    again = partition_dirichlet(labels, num_parts, seed=seed, alpha=alpha, min_examples=0)
    assert [part.tolist() for part in again] == [part.tolist() for part in parts]


@settings(max_examples=100, deadline=None)
@given(case=labels_and_parts(), seed=st.integers(0, 2**32), alpha=st.sampled_from([0.3, 3.0, 100.0]))
def test_dirichlet_default_minimum_is_met_or_refused(case: tuple[np.ndarray, int], seed: int, alpha: float) -> None:
    labels, num_parts = case
    minimum = min(10, labels.shape[0] // num_parts)
    try:
        parts = partition_dirichlet(labels, num_parts, seed=seed, alpha=alpha, max_attempts=50)
    except DataError as error:
        refused = error.reason
    else:
        refused = ""
    if refused:
        assert refused == "dirichlet_unsatisfied"
        return
    check_is_partition(parts, labels.shape[0], num_parts)
    assert min(part.shape[0] for part in parts) >= minimum


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_seed_changes_the_partition(scheme: str) -> None:
    labels = mnist_like_labels()[:5000]
    first = partition(labels, 10, scheme, seed=1)  # type: ignore[arg-type]
    second = partition(labels, 10, scheme, seed=2)  # type: ignore[arg-type]
    same = partition(labels, 10, scheme, seed=1)  # type: ignore[arg-type]
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first, same, strict=True))


def test_labels_may_be_any_integer_dtype() -> None:
    labels = np.array([3, 1, 2, 0, 1, 2], dtype=np.uint8)
    for scheme in ("iid", "shards", "dirichlet"):
        check_is_partition(partition(labels, 3, scheme, seed=0, min_examples=0), 6, 3)


# -- IID -------------------------------------------------------------------------------------


def test_iid_parts_follow_the_global_distribution() -> None:
    labels = mnist_like_labels()
    parts = partition_iid(labels, 10, seed=0)
    global_share = np.bincount(labels) / labels.shape[0]
    shares = histograms(labels, parts, 10) / np.array([[part.shape[0]] for part in parts])
    # 6 000 examples per part: the standard error of a class share is ~0.004.
    assert np.max(np.abs(shares - global_share)) < 0.02
    assert sorted({part.shape[0] for part in parts}) == [6000]


def test_iid_sizes_when_not_divisible() -> None:
    parts = partition_iid(np.zeros(23, np.int64), 5, seed=0)
    assert [part.shape[0] for part in parts] == [5, 5, 5, 4, 4]


# -- shards ------------------------------------------------------------------------------------


def check_shard_structure(labels: np.ndarray, parts: Parts, shards_per_part: int) -> None:
    """The exact shard property.

    With ``order`` the stable sort of the labels and the sorted order cut into
    ``S = num_parts * shards_per_part`` contiguous shards whose sizes are ``n // S + 1`` for
    the first ``n % S`` shards and ``n // S`` for the others, every part is the union of exactly
    ``shards_per_part`` whole shards, so its number of distinct labels is at most
    ``shards_per_part + (label changes inside its shards)``.
    """
    num_examples = labels.shape[0]
    num_shards = len(parts) * shards_per_part
    sizes = [
        num_examples // num_shards + (1 if shard < num_examples % num_shards else 0) for shard in range(num_shards)
    ]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    order = np.argsort(labels, kind="stable")
    position = np.empty(num_examples, dtype=np.int64)
    position[order] = np.arange(num_examples)
    shard_of_position = np.repeat(np.arange(num_shards), sizes)
    sorted_labels = labels[order]
    seen_shards: set[int] = set()
    for part in parts:
        shards = set(shard_of_position[position[part]].tolist())
        assert len(shards) == shards_per_part
        covered = sum(sizes[shard] for shard in shards)
        assert covered == part.shape[0], "whole shards only"
        assert not shards & seen_shards
        seen_shards |= shards
        inner_changes = sum(
            int(np.count_nonzero(np.diff(sorted_labels[starts[shard] : starts[shard + 1]]))) for shard in shards
        )
        assert np.unique(labels[part]).shape[0] <= shards_per_part + inner_changes
    assert seen_shards == set(range(num_shards))


def test_shards_mcmahan_setting_on_mnist_labels() -> None:
    labels = mnist_like_labels()
    parts = partition_shards(labels, 100, seed=0, shards_per_part=2)
    check_is_partition(parts, 60_000, 100)
    check_shard_structure(labels, parts, 2)
    assert {part.shape[0] for part in parts} == {600}  # 200 shards of 300
    distinct = np.array([np.unique(labels[part]).shape[0] for part in parts])
    # 300 < every class size, so a shard holds at most 2 labels, a part at most 4; only the
    # (at most 9) shards straddling one of the 9 label boundaries hold 2.
    assert distinct.max() <= 4
    assert np.count_nonzero(distinct > 2) <= 9


def test_shards_aligned_with_classes_give_at_most_shards_per_part_labels() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10, dtype=np.int64), 100))
    for num_parts, shards_per_part in ((50, 1), (25, 2), (25, 4), (10, 5)):
        num_shards = num_parts * shards_per_part
        assert 100 % (1000 // num_shards) == 0  # shard size divides the class size: no shard straddles
        parts = partition_shards(labels, num_parts, seed=4, shards_per_part=shards_per_part)
        distinct = [np.unique(labels[part]).shape[0] for part in parts]
        assert max(distinct) <= shards_per_part


def test_shards_not_divisible_uses_every_example() -> None:
    labels = mnist_like_labels()[:1001]
    parts = partition_shards(labels, 7, seed=3, shards_per_part=3)
    check_is_partition(parts, 1001, 7)
    check_shard_structure(labels, parts, 3)


# -- Dirichlet ------------------------------------------------------------------------------------


def label_skew(labels: np.ndarray, parts: Parts) -> float:
    """Mean total-variation distance between each part's label distribution and the global one."""
    counts = histograms(labels, parts, 10).astype(np.float64)
    sizes = counts.sum(axis=1, keepdims=True)
    shares = counts[sizes[:, 0] > 0] / sizes[sizes[:, 0] > 0]
    global_share = np.bincount(labels, minlength=10) / labels.shape[0]
    return float(np.mean(0.5 * np.abs(shares - global_share).sum(axis=1)))


def test_dirichlet_smaller_alpha_means_more_skew() -> None:
    labels = mnist_like_labels()
    alphas = [0.05, 0.5, 5.0, 500.0]
    skews = [
        np.mean(
            [label_skew(labels, partition_dirichlet(labels, 20, seed=s, alpha=a, min_examples=0)) for s in range(3)]
        )
        for a in alphas
    ]
    assert all(earlier > later for earlier, later in itertools.pairwise(skews)), skews
    assert skews[0] > 0.6  # nearly one class per part
    assert skews[-1] < 0.05  # nearly IID


def test_dirichlet_default_minimum_on_mnist() -> None:
    labels = mnist_like_labels()
    parts = partition_dirichlet(labels, 100, seed=0, alpha=0.5)
    check_is_partition(parts, 60_000, 100)
    assert min(part.shape[0] for part in parts) >= 10


def test_dirichlet_explicit_minimum() -> None:
    labels = mnist_like_labels()[:6000]
    parts = partition_dirichlet(labels, 10, seed=0, alpha=1.0, min_examples=300)
    assert min(part.shape[0] for part in parts) >= 300


def test_dirichlet_gives_up_after_max_attempts() -> None:
    labels = mnist_like_labels()
    with pytest.raises(DataError) as caught:
        partition_dirichlet(labels, 100, seed=0, alpha=0.001, max_attempts=5)
    assert caught.value.reason == "dirichlet_unsatisfied"
    assert "raise alpha" in str(caught.value)


def test_real_mnist_labels(mnist_dir: Path) -> None:
    path = mnist_dir / "train-labels-idx1-ubyte.gz"
    labels = read_idx(path if path.exists() else mnist_dir / "train-labels-idx1-ubyte")
    for scheme in ("iid", "shards", "dirichlet"):
        parts = partition(labels, 100, scheme, seed=0)
        check_is_partition(parts, 60_000, 100)
    check_shard_structure(labels, partition_shards(labels, 100, seed=0), 2)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"num_parts": 0}, "bad_num_parts"),
        ({"num_parts": -3}, "bad_num_parts"),
        ({"num_parts": True}, "bad_num_parts"),
        ({"num_parts": 2.0}, "bad_num_parts"),
        ({"num_parts": 11}, "too_many_parts"),
        ({"seed": -1}, "bad_seed"),
        ({"seed": 1.5}, "bad_seed"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "bad_alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "bad_alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "bad_alpha"),
        ({"scheme": "dirichlet", "alpha": float("inf")}, "bad_alpha"),
        ({"scheme": "dirichlet", "alpha": "1"}, "bad_alpha"),
        ({"scheme": "dirichlet", "min_examples": -1}, "bad_min_examples"),
        ({"scheme": "dirichlet", "num_parts": 3, "min_examples": 4}, "bad_min_examples"),
        ({"scheme": "shards", "shards_per_part": 0}, "bad_shards_per_part"),
        ({"scheme": "shards", "num_parts": 4, "shards_per_part": 3}, "too_many_shards"),
        ({"scheme": "round_robin"}, "unknown_scheme"),
        ({"labels": np.zeros((5, 2), np.int64)}, "bad_labels"),
        ({"labels": np.zeros(10, np.float32)}, "bad_labels"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], reason: str) -> None:
    arguments: dict[str, object] = {
        "labels": np.arange(10, dtype=np.int64) % 3,
        "num_parts": 2,
        "scheme": "iid",
        "seed": 0,
    }
    arguments.update(kwargs)
    labels, num_parts, scheme = arguments.pop("labels"), arguments.pop("num_parts"), arguments.pop("scheme")
    with pytest.raises(DataError) as caught:
        partition(labels, num_parts, scheme, **arguments)  # type: ignore[arg-type]
    assert caught.value.reason == reason


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_empty_labels_are_refused(scheme: str) -> None:
    with pytest.raises(DataError) as caught:
        partition(np.array([], dtype=np.int64), 1, scheme, seed=0)  # type: ignore[arg-type]
    assert caught.value.reason == "too_many_parts"


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(DataError) as caught:
        partition_dirichlet(np.zeros(10, np.int64), 2, seed=0, max_attempts=0)
    assert caught.value.reason == "bad_max_attempts"


def test_one_part_gets_everything() -> None:
    labels = mnist_like_labels()[:100]
    for scheme in ("iid", "shards", "dirichlet"):
        (only,) = partition(labels, 1, scheme, seed=0)
        np.testing.assert_array_equal(only, np.arange(100))
