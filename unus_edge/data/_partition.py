"""Splitting a dataset's examples among devices: IID, label shards, Dirichlet.

Every scheme takes the label array (``labels[i]`` is the class of example ``i``) and returns
``num_parts`` int64 index arrays that are pairwise disjoint, together use every example exactly
once, and are each sorted ascending (the order within a part carries no information: devices
shuffle every epoch, and ascending indices gather faster). Randomness comes only from
``np.random.default_rng(seed)``, so a seed fixes the result (for a given NumPy version: NumPy
does not promise identical random streams across its releases).

Schemes (``docs/data.md`` states the exact guarantees):

* ``iid``: one permutation of all indices, cut into ``num_parts`` consecutive pieces whose sizes
  differ by at most one.
* ``shards`` (McMahan et al. 2017, "pathological non-IID"): stable sort by label, cut the sorted
  order into ``num_parts * shards_per_part`` contiguous shards whose sizes differ by at most one
  (``np.array_split``: 60 000 MNIST examples, 100 parts, 2 shards each -> 200 shards of 300), and
  give each part ``shards_per_part`` shards drawn at random without replacement.
* ``dirichlet`` (Hsu et al. 2019): for each class independently, draw proportions
  ``p ~ Dir(alpha * 1)`` over the parts, shuffle the class's examples and cut them at
  ``floor(cumsum(p) * class_size)``. A draw is accepted when every part has at least
  ``min_examples`` examples; otherwise the whole draw is repeated, at most ``max_attempts`` times,
  then :class:`DataError` (``dirichlet_unsatisfied``) says which knob to turn.

Errors: :class:`DataError` with reasons ``bad_labels``, ``bad_num_parts``, ``too_many_parts``,
``bad_seed``, ``bad_alpha``, ``bad_shards_per_part``, ``too_many_shards``, ``bad_min_examples``,
``bad_max_attempts``, ``dirichlet_unsatisfied``, ``unknown_scheme``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, TypeAlias

import numpy as np
from numpy.typing import NDArray

from unus_edge.data._dataset import data_error

__all__ = [
    "DEFAULT_DIRICHLET_MAX_ATTEMPTS",
    "DEFAULT_DIRICHLET_MIN_EXAMPLES",
    "SCHEMES",
    "Scheme",
    "default_min_examples",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]

logger = logging.getLogger(__name__)

Scheme: TypeAlias = Literal["iid", "shards", "dirichlet"]
SCHEMES: tuple[str, ...] = ("iid", "shards", "dirichlet")

#: Every part gets at least this many examples under ``dirichlet`` (capped at n // num_parts).
DEFAULT_DIRICHLET_MIN_EXAMPLES = 10
#: How many complete Dirichlet draws are tried before giving up.
DEFAULT_DIRICHLET_MAX_ATTEMPTS = 1000

Parts: TypeAlias = list[NDArray[np.int64]]


def default_min_examples(num_examples: int, num_parts: int) -> int:
    """The Dirichlet ``min_examples`` used when none is given: ``min(10, n // num_parts)``."""
    return min(DEFAULT_DIRICHLET_MIN_EXAMPLES, num_examples // max(1, num_parts))


def _is_integer(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_labels(labels: NDArray[Any]) -> NDArray[Any]:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise data_error("bad_labels", f"labels must be a 1-D integer array, got {array.dtype} of shape {array.shape}")
    return array


def _check_common(labels: NDArray[Any], num_parts: int, seed: int) -> NDArray[Any]:
    array = _check_labels(labels)
    if not _is_integer(num_parts) or num_parts < 1:
        raise data_error("bad_num_parts", f"num_parts must be an integer >= 1, got {num_parts!r}")
    if num_parts > array.shape[0]:
        raise data_error("too_many_parts", f"{num_parts} parts for {array.shape[0]} examples: every part needs one")
    if not _is_integer(seed) or seed < 0:
        raise data_error("bad_seed", f"seed must be an integer >= 0, got {seed!r}")
    return array


def _sorted_parts(pieces: list[NDArray[Any]]) -> Parts:
    return [np.sort(piece).astype(np.int64, copy=False) for piece in pieces]


def partition_iid(labels: NDArray[Any], num_parts: int, *, seed: int) -> Parts:
    """Shuffle all indices and cut them into ``num_parts`` parts of near-equal size.

    Part sizes are ``n // num_parts`` or ``n // num_parts + 1`` (the first ``n % num_parts``
    parts are the larger ones). ``labels`` is used only for its length.
    """
    array = _check_common(labels, num_parts, seed)
    order = np.random.default_rng(seed).permutation(array.shape[0])
    return _sorted_parts(np.array_split(order, num_parts))


def partition_shards(labels: NDArray[Any], num_parts: int, *, seed: int, shards_per_part: int = 2) -> Parts:
    """McMahan et al.'s pathological non-IID split, generalised to any ``n`` and ``num_parts``.

    Stable sort by label, cut into ``num_parts * shards_per_part`` contiguous shards of size
    ``floor`` or ``ceil`` of ``n / num_shards``, give each part ``shards_per_part`` random shards.
    A part therefore holds at most ``shards_per_part + b`` distinct labels, where ``b`` counts the
    label boundaries (positions where the sorted label changes) inside its shards.
    """
    array = _check_common(labels, num_parts, seed)
    if not _is_integer(shards_per_part) or shards_per_part < 1:
        raise data_error("bad_shards_per_part", f"shards_per_part must be an integer >= 1, got {shards_per_part!r}")
    num_shards = num_parts * int(shards_per_part)
    if num_shards > array.shape[0]:
        raise data_error(
            "too_many_shards",
            f"{num_parts} parts x {shards_per_part} shards = {num_shards} shards for {array.shape[0]} "
            "examples: every shard needs one",
        )
    by_label = np.argsort(array, kind="stable")
    shards = np.array_split(by_label, num_shards)
    shard_order = np.random.default_rng(seed).permutation(num_shards).reshape(num_parts, shards_per_part)
    return _sorted_parts([np.concatenate([shards[shard] for shard in row]) for row in shard_order])


def partition_dirichlet(
    labels: NDArray[Any],
    num_parts: int,
    *,
    seed: int,
    alpha: float = 0.5,
    min_examples: int | None = None,
    max_attempts: int = DEFAULT_DIRICHLET_MAX_ATTEMPTS,
) -> Parts:
    """Hsu et al.'s Dirichlet split: per class, proportions over parts ~ ``Dir(alpha)``.

    Smaller ``alpha`` means more skew (``alpha -> 0``: each class goes to one part;
    ``alpha -> inf``: IID). A draw is accepted when every part has at least ``min_examples``
    examples (default ``min(10, n // num_parts)``; ``0`` accepts the first draw, empty parts
    included); up to ``max_attempts`` draws are tried, then :class:`DataError`.
    """
    array = _check_common(labels, num_parts, seed)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating | np.integer):
        raise data_error("bad_alpha", f"alpha must be a positive number, got {alpha!r}")
    if not (math.isfinite(float(alpha)) and alpha > 0):
        raise data_error("bad_alpha", f"alpha must be finite and > 0, got {alpha!r}")
    num_examples = array.shape[0]
    if min_examples is None:
        min_examples = default_min_examples(num_examples, num_parts)
    elif not _is_integer(min_examples) or min_examples < 0:
        raise data_error("bad_min_examples", f"min_examples must be an integer >= 0, got {min_examples!r}")
    elif min_examples * num_parts > num_examples:
        raise data_error(
            "bad_min_examples",
            f"{num_parts} parts x min_examples={min_examples} needs more than the {num_examples} examples",
        )
    if not _is_integer(max_attempts) or max_attempts < 1:
        raise data_error("bad_max_attempts", f"max_attempts must be an integer >= 1, got {max_attempts!r}")

    rng = np.random.default_rng(seed)
    by_label = np.argsort(array, kind="stable")
    boundaries = np.flatnonzero(np.diff(array[by_label])) + 1
    classes = np.split(by_label, boundaries)  # indices of each present class, ascending
    concentration = np.full(num_parts, float(alpha))
    best_smallest = -1
    for attempt in range(1, int(max_attempts) + 1):
        pieces: list[list[NDArray[Any]]] = [[] for _ in range(num_parts)]
        for members in classes:
            proportions = rng.dirichlet(concentration)
            shuffled = rng.permutation(members)
            cuts = np.floor(np.cumsum(proportions)[:-1] * members.shape[0]).astype(np.int64)
            np.clip(cuts, 0, members.shape[0], out=cuts)
            for part, piece in zip(pieces, np.split(shuffled, cuts), strict=True):
                part.append(piece)
        sizes = [sum(piece.shape[0] for piece in part) for part in pieces]
        smallest = min(sizes)
        best_smallest = max(best_smallest, smallest)
        if smallest >= min_examples:
            logger.debug("dirichlet(alpha=%s): accepted draw %d, smallest part %d", alpha, attempt, smallest)
            return _sorted_parts([np.concatenate(part) for part in pieces])
    raise data_error(
        "dirichlet_unsatisfied",
        f"no draw out of {max_attempts} gave every one of {num_parts} parts at least {min_examples} "
        f"examples (alpha={alpha}, best smallest part: {best_smallest}); raise alpha, use fewer parts, "
        "or lower min_examples",
    )


def partition(
    labels: NDArray[Any],
    num_parts: int,
    scheme: Scheme,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_part: int = 2,
    min_examples: int | None = None,
) -> Parts:
    """Split example indices into ``num_parts`` parts with ``scheme``.

    ``alpha`` and ``min_examples`` apply to ``"dirichlet"`` only, ``shards_per_part`` to
    ``"shards"`` only. See :func:`partition_iid`, :func:`partition_shards` and
    :func:`partition_dirichlet`.
    """
    if scheme == "iid":
        return partition_iid(labels, num_parts, seed=seed)
    if scheme == "shards":
        return partition_shards(labels, num_parts, seed=seed, shards_per_part=shards_per_part)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_parts, seed=seed, alpha=alpha, min_examples=min_examples)
    raise data_error("unknown_scheme", f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
