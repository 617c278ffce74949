"""Federated evaluation: the devices evaluate the global model on their held-out examples (issue 16).

The gateway of a real fleet has no test set. With ``evaluation.mode = "federated"`` (or
``"both"``), after every ``evaluation.federated_every``-th round (SSP: evaluation point) the
aggregator asks a seeded ``evaluation.federated_fraction`` of the online devices to evaluate the
model it just published (:class:`~unus_edge.messages.EvaluateTask` on their ``tasks`` topic).
Each answers with loss, accuracy and ``num_examples``
(:class:`~unus_edge.messages.EvaluationResult` on its ``update`` topic). After
``evaluation.federated_timeout`` seconds, or as soon as every device asked has answered, the
answers are combined (examples-weighted means, and the spread across devices) and published,
retained, on ``metrics/evaluation`` (:class:`~unus_edge.messages.FederatedMetrics`). A device
that fails or never answers is counted, not waited for: the rounds do not wait for the
evaluation at all.

Decisions take state and narrow callables (``post``, ``publish``, ``spawn``, which says whether it
could start the collector), never the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unus_edge import topics
from unus_edge.aggregator._registry import Registry
from unus_edge.config import EvaluationSettings
from unus_edge.messages import EvaluateTask, EvaluationResult, FederatedMetrics, Message
from unus_edge.topics import Channel

__all__ = ["FederatedEvaluation"]

logger = logging.getLogger("unus_edge.aggregator")


@dataclass
class _Request:
    server_round: int
    version: int
    asked: dict[str, str]
    """task id -> device id"""
    started: float
    answers: dict[str, EvaluationResult] = field(default_factory=dict)
    """device id -> its answer"""
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    """Every device asked has answered."""
    published: asyncio.Event = field(default_factory=asyncio.Event)


class FederatedEvaluation:
    """Asks devices to evaluate, collects their answers, publishes the combination."""

    def __init__(self, job: str, settings: EvaluationSettings, registry: Registry, seed: int, *,
                 post: Callable[[str, Message], None],
                 publish: Callable[[str, Channel, Message], Awaitable[int]],
                 spawn: Callable[[Coroutine[Any, Any, object], str], bool]) -> None:
        self.job = job
        self.settings = settings
        self.registry = registry
        self.seed = seed
        self._post = post
        self._publish = publish
        self._spawn = spawn
        self._open: dict[str, _Request] = {}
        """task id -> its request, while the request collects answers."""
        self.history: list[FederatedMetrics] = []
        self._collecting: list[_Request] = []

    @property
    def enabled(self) -> bool:
        return self.settings.mode in ("federated", "both")

    def request(self, server_round: int, version: int) -> None:
        """Ask the devices to evaluate ``version`` if this round is one to evaluate."""
        if not self.enabled or server_round % self.settings.federated_every:
            return
        online = sorted(info.device_id for info in self.registry.online())
        if not online:
            logger.warning("federated evaluation of round %d skipped: no device is online", server_round)
            return
        count = max(1, math.ceil(self.settings.federated_fraction * len(online)))
        rng = np.random.default_rng([self.seed, server_round, 0xE7A1])  # its own: the training selection is unchanged
        chosen = sorted(online[int(i)] for i in rng.choice(len(online), size=count, replace=False))
        request = _Request(server_round, version, {}, time.perf_counter())
        for device_id in chosen:
            task_id = f"e{server_round}.{secrets.token_hex(8)}.{device_id}"
            request.asked[task_id] = device_id
            self._open[task_id] = request
            self._post(device_id, EvaluateTask(device_id, task_id, server_round, version,
                                               self.settings.federated_timeout))
        self._collecting.append(request)
        if not self._spawn(self._collect(request), "aggregator-federated-evaluation"):  # not running
            self._collecting.remove(request)
            for task_id in request.asked:
                self._open.pop(task_id, None)

    async def drain(self, grace: float | None = None) -> None:
        """Wait for the evaluations under way (each bounded by its timeout): the job's last one
        must be published before the job ends and its devices leave. With ``grace``, answers are
        waited for at most that long more (SSP: the devices may already be leaving)."""
        while self._collecting:
            request = self._collecting[0]
            if grace is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await request.complete.wait()
                request.complete.set()  # close it with the answers it has
            await request.published.wait()

    def on_result(self, result: EvaluationResult) -> str | None:
        """Take a device's answer; the reason it is refused, or None."""
        request = self._open.get(result.task_id)
        if request is None or request.asked.get(result.task_id) != result.device_id:
            return "unassigned"  # late (after the timeout), or not an evaluation this device was asked for
        if result.device_id in request.answers:
            return "duplicate"
        request.answers[result.device_id] = result
        if len(request.answers) == len(request.asked):
            request.complete.set()
        return None

    async def _collect(self, request: _Request) -> None:
        try:
            async with asyncio.timeout(self.settings.federated_timeout):
                await request.complete.wait()
        except TimeoutError:
            pass  # the missing answers are failures
        finally:
            for task_id in request.asked:
                self._open.pop(task_id, None)
        metrics = combine(request, time.perf_counter() - request.started)
        self.history.append(metrics)
        try:
            await self._publish(topics.metrics(self.job, "evaluation"), Channel.METRICS, metrics)
        finally:
            request.published.set()
            self._collecting.remove(request)
        score = (f"mse {metrics.mse:.6g}" if metrics.mse is not None else
                 f"accuracy {metrics.accuracy:.4f}" if metrics.accuracy is not None else "accuracy -")
        logger.info("federated evaluation of round %d (model v%d): %s over %d examples, %d/%d devices "
                    "answered, %d failed", request.server_round, request.version, score, metrics.num_examples,
                    metrics.num_answered, metrics.num_selected, metrics.num_failures)


def combine(request: _Request, duration: float) -> FederatedMetrics:
    """The answers of one request as metrics: weighted means, the spread, and the failures."""
    usable = [r for r in request.answers.values() if not r.error and r.num_examples > 0 and r.loss is not None]
    examples = sum(r.num_examples for r in usable)
    failures = len(request.asked) - len(usable)
    if not usable:
        return FederatedMetrics(request.server_round, request.version, len(request.asked), len(request.answers),
                                failures, 0, duration_seconds=duration)
    weights = np.array([r.num_examples for r in usable], np.float64)
    losses = np.array([float(r.loss or 0.0) for r in usable])
    scored = [r for r in usable if r.accuracy is not None]
    accuracies = np.array([float(r.accuracy or 0.0) for r in scored])
    fitted = [r for r in usable if r.mse is not None]
    errors = np.array([float(r.mse or 0.0) for r in fitted])
    return FederatedMetrics(
        request.server_round, request.version, len(request.asked), len(request.answers), failures, examples,
        loss=float(np.average(losses, weights=weights)),
        accuracy=float(np.average(accuracies, weights=[r.num_examples for r in scored])) if scored else None,
        accuracy_std=float(accuracies.std()) if scored else None,
        accuracy_min=float(accuracies.min()) if scored else None,
        accuracy_max=float(accuracies.max()) if scored else None,
        loss_std=float(losses.std()),
        mse=float(np.average(errors, weights=[r.num_examples for r in fitted])) if fitted else None,
        mse_std=float(errors.std()) if fitted else None,
        num_on_training_data=sum(r.split == "train" for r in usable), duration_seconds=duration)
