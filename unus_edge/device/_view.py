"""What a device knows of its job's aggregator, and the protocol's device rules, without I/O.

The daemon (:class:`~unus_edge.device.Device`) receives; this object decides. It is fed the
aggregator's messages (its status, registration answers, acknowledgements, clocks, models) and
answers with what changed; the daemon logs, wakes its waiters and publishes. No events, no
transport, no tasks: the rules of docs/protocol.md that a device follows (one aggregator
session at a time, sections 4.9 and 5; the SSP start rule; model checks and sparse merges) are
tested by direct calls (``tests/unit/test_device_view.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from unus_edge.codec import Tensor
from unus_edge.messages import Ack, Clock, GlobalModel
from unus_edge.strategies import Params

__all__ = ["AggregatorView", "ModelVerdict"]

ModelVerdict = Literal["applied", "other_session", "wrong_fingerprint", "not_newer", "bad_tensors"]


@dataclass
class AggregatorView:
    """The followed aggregator session and what it said: model, clock, this device's clock c_i.

    ``template`` is the device's own copy of the job's initial weights: the names, shapes and
    dtypes every model message must match, and the starting view that partial (sparse) models
    are merged into.
    """

    template: Mapping[str, np.ndarray[Any, Any]]
    fingerprint: str
    session: str = ""
    """The aggregator session followed (empty until an ``aggregator/status`` or an accepted
    registration names one)."""
    model: Params | None = None
    """The device's view of the global model (merged from dense and sparse model messages)."""
    model_version: int = -1
    download: dict[str, Tensor] = field(default_factory=dict)
    """What the last applied model message carried (a device strategy may use only that part)."""
    clock: int = 0
    """This device's SSP clock c_i, as the last registration answer or acknowledgement said."""
    c_min: int = 0
    bound: int | None = 0
    """The staleness bound s (``None``: unbounded)."""
    clock_version: int = 0
    ack_version: int = 0
    published_version: int = -1
    """The retained model's version as the last clock names it (-1: an aggregator that does not say)."""
    job_over: bool = False
    """A clock of the followed session said ``finished`` or ``failed``."""
    latest_model: GlobalModel | None = None
    latest_clock: Clock | None = None
    model_problem: str = ""
    """Why the last model message was not applied (for the daemon's log)."""

    def follow(self, session: str) -> bool:
        """Follow ``session``; whether that is a change. Versions of another session (a retained
        leftover of an earlier job, or of the aggregator before a restart) are forgotten, and the
        end of an earlier run with them; the latest model and clock are examined again."""
        if session == self.session:
            return False
        self.session = session
        self.model_version = -1
        self.clock_version = 0
        self.ack_version = 0
        self.published_version = -1
        self.job_over = False
        if self.latest_model is not None:
            self.on_model(self.latest_model)
        if self.latest_clock is not None:
            self.on_clock(self.latest_clock)
        return True

    def on_clock(self, clock: Clock) -> bool:
        """Keep the latest clock; apply it if it is of the followed session (whether it was)."""
        self.latest_clock = clock
        if clock.aggregator_session != self.session:
            return False
        self.c_min = clock.c_min
        self.bound = clock.staleness_bound
        self.clock_version = max(self.clock_version, clock.version)
        self.published_version = max(self.published_version, clock.model_version)
        if clock.state in ("finished", "failed"):
            self.job_over = True
        return True

    def on_model(self, model: GlobalModel) -> ModelVerdict:
        """Keep the latest model message; merge it into the view if it is usable."""
        self.latest_model = model
        self.model_problem = ""
        if model.aggregator_session != self.session:
            return "other_session"
        if model.fingerprint != self.fingerprint:
            self.model_problem = (f"the job's model {model.fingerprint} is not the one this device runs "
                                  f"({self.fingerprint})")
            return "wrong_fingerprint"
        if model.version <= self.model_version:
            return "not_newer"
        from unus_edge.aggregator import check_tensors  # the aggregator's own check; imported late

        problem = check_tensors(model.tensors, self.template)
        if problem is not None:
            self.model_problem = f"global model version {model.version}: {problem[0]} ({problem[1]})"
            return "bad_tensors"
        view: Mapping[str, np.ndarray[Any, Any]] = self.model if self.model is not None else self.template
        merged: Params = {}
        for name, tensor in model.tensors.items():
            if isinstance(tensor, np.ndarray):
                merged[name] = tensor
            else:  # a partial model (Distributed Selective SGD): only the most-updated entries
                merged[name] = np.array(view[name])
                merged[name].reshape(-1)[tensor.indices] = tensor.values
        self.model = {name: merged.get(name, view[name]) for name in self.template}
        self.download = dict(model.tensors)
        self.model_version = model.version
        return "applied"

    def on_ack(self, ack: Ack) -> None:
        self.clock = ack.clock
        self.ack_version = max(self.ack_version, ack.version)

    def registered(self, session: str, clock: int) -> None:
        """An accepted registration: it names the session to follow and this device's clock."""
        self.follow(session)
        self.clock = clock

    def may_start(self) -> bool:
        """The SSP rule: a computation starts only when ``c_i <= c_min + s`` (or s is unbounded)."""
        return self.bound is None or self.clock <= self.c_min + self.bound

    def ssp_required_version(self) -> int:
        """The oldest model an SSP computation may start from: any model within the staleness bound.

        The aggregator publishes the model whenever a device becomes allowed to start, before the
        clock that says so, and each clock names the retained model's version: a model of at least
        that version holds every update of the clocks below ``c_min``, which is what the bound asks
        (``c_i <= c_min + s``). It need not hold the device's own last update. An aggregator that
        does not name it (-1) gets the older, stricter wait: the device's own update included.
        """
        if self.published_version >= 0:
            return self.published_version
        return max(self.ack_version, self.clock_version)
