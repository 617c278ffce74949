"""The aggregator's pure logic: registry, presence, rounds, update checks, deduplication."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unus_edge.aggregator import DedupWindow, Registry, SyncRound, check_tensors
from unus_edge.codec import SparseTensor
from unus_edge.messages import Registration
from unus_edge.strategies import Assignment


def registration(device_id: str = "d1", fingerprint: str = "sha256:good", session: str = "s1") -> Registration:
    return Registration(device_id, session, 600, fingerprint, "0.1.0", platform="Linux")


def test_registration_checks_the_fingerprint() -> None:
    registry = Registry("sha256:good", heartbeat_timeout=30)
    refused = registry.register(registration(fingerprint="sha256:other"), now=0)
    assert (refused.accepted, refused.reason) == (False, "fingerprint_mismatch")
    assert "sha256:other" in refused.detail
    assert "d1" not in registry
    assert registry.register(registration(), now=0).accepted
    assert [d.device_id for d in registry.online()] == ["d1"]


def test_presence_from_status_wills_and_heartbeats() -> None:
    registry = Registry("sha256:good", heartbeat_timeout=30)
    registry.register(registration(session="s1"), now=0)
    assert registry.status("d1", False, "s1", now=1)  # its last will
    assert registry.online() == []
    assert registry.heartbeat("d1", "s1", now=2)  # back
    registry.register(registration(session="s2"), now=3)  # the device restarted
    assert not registry.status("d1", False, "s1", now=4)  # the old process's late will is ignored
    assert [d.device_id for d in registry.online()] == ["d1"]
    assert not registry.heartbeat("d1", "s1", now=5)  # heartbeats of the old session do not count
    assert registry.status("unknown", True, "x", now=5) is False


def test_announced_sessions_are_remembered_in_a_bounded_window() -> None:
    registry = Registry("sha256:good", heartbeat_timeout=30, announced_capacity=2)
    registry.announce("d1", "s1")
    registry.announce("d2", "s1")
    assert registry.announced("d1", "s1") and registry.announced("d2", "s1")
    assert not registry.announced("d1", "s2")
    registry.announce("d1", "s1")  # seen again: now the most recent
    registry.announce("d3", "s1")  # evicts the oldest, d2
    assert registry.announced("d1", "s1") and registry.announced("d3", "s1")
    assert not registry.announced("d2", "s1")
    assert "d1" not in registry  # announcing is not registering


def test_the_registered_session_costs_the_announced_window_nothing() -> None:
    registry = Registry("sha256:good", heartbeat_timeout=30, announced_capacity=10)
    registry.announce("d1", "s1")  # its status, before it registers
    registry.register(registration(session="s1"), now=0)
    assert registry.announced_size == 0 and registry.announced("d1", "s1")  # the record answers for it
    registry.announce("d1", "s1")  # its status again: nothing stored
    assert registry.announced_size == 0
    registry.register(registration(session="s2"), now=1)  # the device restarted
    assert registry.announced("d1", "s1") and registry.announced_size == 1  # the old session's will is routine
    assert registry.announced("d1", "s2") and not registry.announced("d1", "s3")


def test_heartbeat_timeout_marks_silent_devices_offline() -> None:
    registry = Registry("sha256:good", heartbeat_timeout=10)
    registry.register(registration("a"), now=0)
    registry.register(registration("b"), now=0)
    registry.heartbeat("b", "s1", now=8)
    assert registry.next_expiry() == 10
    assert registry.expire(now=10.5) == ["a"]
    assert [d.device_id for d in registry.online()] == ["b"]
    assert registry.next_expiry() == 18
    assert registry.expire(now=18.5) == ["b"]
    assert registry.next_expiry() is None


def test_reregistration_keeps_history() -> None:
    registry = Registry("sha256:good", heartbeat_timeout=10)
    registry.register(registration(), now=0)
    record = registry.get("d1")
    assert record is not None
    record.rounds_contributed = 4
    registry.register(registration(session="s2"), now=5)
    assert registry.get("d1").rounds_contributed == 4  # type: ignore[union-attr]


def test_sync_round_bookkeeping() -> None:
    assignments = {d: Assignment(d, 1, 10, 0.1) for d in ("a", "b", "c")}
    current = SyncRound(1, 0, 0, assignments, {d: f"t-{d}" for d in assignments}, deadline=10, started_at=0)
    assert current.pending == {"a", "b", "c"}
    current.accept("a", "m1")
    current.fail("b", "offline")
    current.fail("a", "offline")  # already answered: not a failure
    current.fail("zz", "offline")  # not selected: ignored
    assert not current.complete
    assert current.is_pending("c") and not current.is_pending("a") and not current.is_pending("b")
    assert not current.is_pending("zz")
    with pytest.raises(ValueError, match="not assigned"):
        current.accept("zz", "m2")  # the driver judges updates first: this is a bug, not input
    failures = current.close()
    assert [(f.device_id, f.reason) for f in failures] == [("b", "offline"), ("c", "timeout")]
    assert current.complete
    assert current.task_of("a") == "t-a"


TEMPLATE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"w": np.zeros((2, 3), np.float32)}, "missing_tensor"),
        ({**TEMPLATE, "extra": np.zeros(1, np.float32)}, "unknown_tensor"),
        ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, "shape_mismatch"),
        ({"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)}, "dtype_mismatch"),
        ({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, "not_finite"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.inf, 0], np.float32)}, "not_finite"),
        ({"w": SparseTensor.from_dense(np.full((2, 3), np.nan, np.float32), np.array([4])),
          "b": np.zeros(3, np.float32)}, "not_finite"),
    ],
)
def test_check_tensors_reasons(tensors: dict[str, object], reason: str) -> None:
    problem = check_tensors(tensors, TEMPLATE)  # type: ignore[arg-type]
    assert problem is not None
    assert problem[0] == reason


def test_check_tensors_accepts_good_updates_and_bounds_the_norm() -> None:
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    assert check_tensors(good, TEMPLATE) is None
    assert check_tensors(good, TEMPLATE, max_norm=3.0) is None  # norm is 3
    problem = check_tensors(good, TEMPLATE, max_norm=2.9)
    assert problem is not None
    assert problem[0] == "norm_too_large"


def test_dedup_window_remembers_at_least_its_capacity_and_at_most_twice() -> None:
    window = DedupWindow(capacity=3)
    for index in range(7):
        window.remember(f"m{index}", index % 2 == 0, "" if index % 2 == 0 else "stale_base")
        rows = [row[0] for row in window.items()]
        assert rows == [f"m{i}" for i in range(index + 1)][-len(rows):]  # the latest, oldest first
        assert min(index + 1, 3) <= len(rows) <= 6
    assert window.get("m0") is None  # evicted with its generation
    assert window.get("m3") == (False, "stale_base")
    assert window.get("m6") == (True, "")
    copy = window.items()
    window.remember("m7", True)
    assert "m7" not in [row[0] for row in copy]  # a checkpoint's copy does not change afterwards
    assert list(copy)[-1] == ("m6", True, "") and copy[-1] == ("m6", True, "") and len(copy) == 4


OPERATIONS = st.lists(st.tuples(st.sampled_from(["register", "heartbeat", "offline", "online", "expire", "update"]),
                                st.integers(0, 5), st.floats(0, 4)), max_size=60)


@settings(deadline=None, max_examples=200)
@given(OPERATIONS)
def test_counters_and_the_deadline_heap_agree_with_a_fleet_scan(operations: list[tuple[str, int, float]]) -> None:
    """The O(1) bookkeeping (issue 21) against the obvious scans it replaced."""
    registry = Registry("sha256:good", heartbeat_timeout=3)
    now = 0.0
    changed: set[str] = set()
    for name, index, step in operations:
        now += step
        device_id = f"d{index}"
        before = {r.device_id: r.facts() for r in registry}
        if name == "register":
            registry.register(Registration(device_id, "s1", 10, "sha256:good", "0", platform=f"p{index % 2}"), now)
        elif name == "heartbeat":
            registry.heartbeat(device_id, "s1", now)
        elif name in ("offline", "online"):
            registry.status(device_id, name == "online", "s1", now)
        elif name == "update" and device_id in registry:
            registry.contributed(device_id, 0.5)
        elif name == "expire":
            silent = sorted(r.device_id for r in registry if r.online and now - r.last_seen > 3)
            assert registry.expire(now) == silent
        online = [r for r in registry if r.online]
        assert registry.online_count == len(online)
        deadline = registry.next_expiry()
        if online:  # the heap's top is never later than the first true deadline
            assert deadline is not None and deadline <= min(r.last_seen + 3 for r in online)
        # Whatever changed in the published facts (except last_seen alone) is marked.
        for record in registry:
            old = before.get(record.device_id)
            if old is None or (old.online, old.rounds_contributed) != (record.online, record.rounds_contributed):
                changed.add(record.device_id)
        taken = {r.device_id for r in registry.take_changed()}
        assert changed <= taken
        changed.clear()
    assert sum(registry.platforms().values()) == len(registry)


def test_platforms_keep_the_most_common_and_sum_the_rest() -> None:
    registry = Registry("sha256:good", heartbeat_timeout=3)
    for index in range(30):
        registry.register(Registration(f"d{index}", "s1", 10, "sha256:good", "0", platform=f"p{index % 6}"), 0)
    registry.register(Registration("d0", "s2", 10, "sha256:good", "0", platform="p1"), 1)  # moved: p0 4, p1 6
    assert registry.platforms(limit=2) == {"p1": 6, "p2": 5, "other": 19}
    assert len(registry) == 30 and registry.online_count == 30
