"""The device's protocol rules by direct calls: one aggregator session at a time, model checks
and sparse merges, the SSP start rule (``unus_edge/device/_view.py``, no I/O)."""

from __future__ import annotations

import numpy as np

from unus_edge.codec import SparseTensor
from unus_edge.device._view import AggregatorView
from unus_edge.messages import Ack, Clock, GlobalModel

TEMPLATE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def view() -> AggregatorView:
    return AggregatorView(TEMPLATE, "sha256:f")


def model(version: int, session: str = "A", **tensors: object) -> GlobalModel:
    dense = {"w": np.full((2, 3), version, np.float32), "b": np.full(3, version, np.float32)}
    return GlobalModel(version, version, "sha256:f", session, {**dense, **tensors})  # type: ignore[arg-type]


def clock(version: int, session: str = "A", *, c_min: int = 0, bound: int | None = 0, state: str = "running",
          model_version: int = -1) -> Clock:
    return Clock(version=version, server_round=0, aggregator_session=session, state=state,  # type: ignore[arg-type]
                 c_min=c_min, staleness_bound=bound, model_version=model_version)


def test_messages_of_another_session_are_kept_but_count_only_once_it_is_followed() -> None:
    device = view()
    assert device.on_model(model(4, "B")) == "other_session" and device.model is None
    assert not device.on_clock(clock(2, "B", c_min=3, model_version=4))
    assert device.follow("B")  # an aggregator status or a registration answer names B
    assert device.model_version == 4 and device.c_min == 3 and device.published_version == 4
    assert not device.follow("B")  # no change


def test_a_new_session_forgets_versions_and_the_end_of_the_old_run() -> None:
    device = view()
    device.follow("A")
    device.on_model(model(9))
    device.on_clock(clock(5, state="failed", model_version=9))
    device.on_ack(Ack("d", "m", "t", True, "", 4, 8))
    assert device.job_over and device.ack_version == 8
    device.follow("B")  # the aggregator restarted: it resumes from its checkpoint
    assert not device.job_over  # the failed clock ended A's run only
    assert (device.model_version, device.clock_version, device.ack_version, device.published_version) == (-1, 0, 0, -1)
    assert device.on_model(model(9, "B")) == "applied"  # version 9 again, but of the new session


def test_a_model_is_checked_before_it_is_used() -> None:
    device = view()
    device.follow("A")
    assert device.on_model(model(3)) == "applied"
    assert device.on_model(model(3)) == "not_newer" and device.on_model(model(2)) == "not_newer"
    wrong = GlobalModel(4, 4, "sha256:other", "A", model(4).tensors)
    assert device.on_model(wrong) == "wrong_fingerprint" and "sha256:other" in device.model_problem
    assert device.on_model(model(5, w=np.zeros((3, 2), np.float32))) == "bad_tensors"
    assert device.on_model(model(6, w=np.array([[np.nan] * 3] * 2, np.float32))) == "bad_tensors"
    assert device.model_version == 3  # none of them replaced the view


def test_a_partial_model_is_merged_into_the_view() -> None:
    device = view()
    device.follow("A")
    device.on_model(model(1))
    nothing = SparseTensor((3,), np.array([], np.int32), np.array([], np.float32))  # every tensor, each partial
    partial = GlobalModel(2, 2, "sha256:f", "A", {"w": SparseTensor((2, 3), np.array([0, 5], np.int32),
                                                                      np.array([7, 8], np.float32)), "b": nothing})
    assert device.on_model(partial) == "applied"
    assert device.model is not None
    np.testing.assert_array_equal(device.model["w"], [[7, 1, 1], [1, 1, 8]])
    np.testing.assert_array_equal(device.model["b"], [1, 1, 1])  # no entries in the message: kept
    assert set(device.download) == {"w", "b"}


def test_the_ssp_start_rule_and_the_model_a_computation_needs() -> None:
    device = view()
    device.registered("A", 2)
    device.on_clock(clock(1, c_min=1, bound=1))
    assert device.may_start()  # 2 <= 1 + 1
    device.on_ack(Ack("d", "m", "t", True, "", 3, 6))
    assert not device.may_start()  # 3 > 1 + 1
    device.on_clock(clock(2, c_min=1, bound=None))
    assert device.may_start()  # unbounded: asynchronous
    assert device.ssp_required_version() == 6  # no model_version in the clocks: its own update included
    device.on_clock(clock(3, c_min=2, bound=1, model_version=5))
    assert device.ssp_required_version() == 5  # the retained model the clock names is enough
