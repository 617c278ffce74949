"""One synchronous round, and the checks every update passes. Pure logic, no I/O.

An update is applied at most once: per round, a device's task accepts one update; the message
ids of everything accepted are remembered in a bounded window, so a redelivery (QoS 1) or a
re-publication by the device (after a reconnection or a lost acknowledgement) is answered
with the same verdict and never applied again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from unus_edge.codec import SparseTensor, Tensor
from unus_edge.strategies import Assignment, Failure

__all__ = ["DedupWindow", "SyncRound", "VerdictRows", "check_tensors"]


def check_tensors(
    tensors: Mapping[str, Tensor], template: Mapping[str, np.ndarray[Any, Any]], *, max_norm: float = 0.0
) -> tuple[str, str] | None:
    """Why ``tensors`` cannot be an update of a model shaped like ``template`` (or ``None``).

    Returns ``(reason, detail)`` with reasons ``missing_tensor``, ``unknown_tensor``,
    ``shape_mismatch``, ``dtype_mismatch``, ``not_finite`` and ``norm_too_large``.
    """
    extra = set(tensors) - set(template)
    if extra:
        return "unknown_tensor", f"not in the model: {sorted(extra)[:5]}"
    missing = set(template) - set(tensors)
    if missing:
        return "missing_tensor", f"absent: {sorted(missing)[:5]}"
    squared = 0.0
    for name, tensor in tensors.items():
        expected = template[name]
        if tuple(tensor.shape) != expected.shape:
            return "shape_mismatch", f"{name}: {tuple(tensor.shape)} instead of {expected.shape}"
        if tensor.dtype != expected.dtype:
            return "dtype_mismatch", f"{name}: {tensor.dtype} instead of {expected.dtype}"
        values = tensor.values if isinstance(tensor, SparseTensor) else tensor
        if values.size and not bool(np.isfinite(values).all()):
            return "not_finite", f"{name} holds NaN or infinity"
        if max_norm > 0:
            flat = values.reshape(-1)
            squared += float(np.dot(flat, flat))
    if max_norm > 0 and math.sqrt(squared) > max_norm:
        return "norm_too_large", f"update norm {math.sqrt(squared):.4g} > {max_norm:.4g}"
    return None


class DedupWindow:
    """The verdicts on at least the last ``capacity`` update message ids (at most twice that).

    Two generations of plain dicts: verdicts go into the newer one, and when it holds
    ``capacity`` entries it becomes the older one and the oldest generation is dropped. So a
    checkpoint's copy (:meth:`items`) copies the newer generation only (the older one never
    changes again), a few milliseconds in the event loop where an ``OrderedDict`` of 100,000
    entries took 30-45 ms (bench/bench_commit_stall.py).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._older: dict[str, tuple[bool, str]] = {}
        self._newer: dict[str, tuple[bool, str]] = {}

    def get(self, msg_id: str) -> tuple[bool, str] | None:
        verdict = self._newer.get(msg_id)
        return verdict if verdict is not None else self._older.get(msg_id)

    def remember(self, msg_id: str, accepted: bool, reason: str = "") -> None:
        self._newer[msg_id] = (accepted, reason)
        if len(self._newer) >= self.capacity:
            self._older, self._newer = self._newer, {}

    def items(self) -> VerdictRows:
        """The verdicts now, oldest first, as ``(msg_id, accepted, reason)`` rows built when read."""
        return VerdictRows(self._older, self._newer.copy())


class VerdictRows(Sequence[tuple[str, bool, str]]):
    """A copy of a :class:`DedupWindow`, read as ``(msg_id, accepted, reason)`` rows, oldest first."""

    __slots__ = ("_generations",)

    def __init__(self, *generations: dict[str, tuple[bool, str]]) -> None:
        self._generations = generations

    def __len__(self) -> int:
        return sum(len(generation) for generation in self._generations)

    @overload
    def __getitem__(self, index: int) -> tuple[str, bool, str]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, bool, str]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, bool, str] | list[tuple[str, bool, str]]:
        rows = list(self)
        return rows[index]

    def __iter__(self) -> Iterator[tuple[str, bool, str]]:
        for generation in self._generations:
            for msg_id, (accepted, reason) in generation.items():
                yield msg_id, accepted, reason


@dataclass
class SyncRound:
    """The bookkeeping of one synchronous round (or one retry of it)."""

    server_round: int
    version: int
    attempt: int
    assignments: dict[str, Assignment]
    task_ids: dict[str, str]
    deadline: float
    started_at: float
    accepted: dict[str, str] = field(default_factory=dict)
    """device id -> msg_id of its applied update."""
    failures: dict[str, Failure] = field(default_factory=dict)

    @property
    def pending(self) -> set[str]:
        """The assigned devices without an update or a failure (a scan: for the round's end)."""
        return set(self.assignments) - set(self.accepted) - set(self.failures)

    def is_pending(self, device_id: str) -> bool:
        return device_id in self.assignments and device_id not in self.accepted and device_id not in self.failures

    @property
    def complete(self) -> bool:
        """Every assigned device answered or failed. O(1), asked after every update (issue 21: the
        scan it replaced made a round of n devices cost n^2): ``accepted`` and ``failures`` are
        disjoint subsets of ``assignments`` (``accept`` and ``fail`` keep them so)."""
        return len(self.accepted) + len(self.failures) >= len(self.assignments)

    def task_of(self, device_id: str) -> str | None:
        return self.task_ids.get(device_id)

    def accept(self, device_id: str, msg_id: str) -> None:
        if device_id not in self.assignments:
            raise ValueError(f"device {device_id!r} is not assigned in round {self.server_round}")
        self.accepted[device_id] = msg_id
        self.failures.pop(device_id, None)

    def fail(self, device_id: str, reason: str, detail: str = "") -> None:
        """Count a selected device as failed (offline, rejected...) unless it already answered."""
        if device_id in self.assignments and device_id not in self.accepted:
            self.failures.setdefault(device_id, Failure(device_id, reason, detail))

    def close(self) -> list[Failure]:
        """End the round: every device still pending timed out. Returns all failures."""
        for device_id in sorted(self.pending):
            self.failures[device_id] = Failure(device_id, "timeout", "no update before the round deadline")
        return [self.failures[d] for d in sorted(self.failures)]
