"""Stale Synchronous Parallel (Ho et al., NIPS 2013): one staleness bound from FedAvg to async.

Semantics (``docs/synchronization.md``):

* each participating device i has a clock c_i, the number of its updates accepted so far;
  ``c_min`` is the minimum over the *live* participants (a device declared dead leaves it at
  once, so nobody waits for it; a device that rejoins starts at the current ``c_min``);
* a device may start its next update only when ``c_i <= c_min + s``; it waits for the retained
  clock otherwise. ``s = 0`` is synchronous, ``s = None`` (infinity) never blocks;
* updates are deltas against ``base_version`` and are applied as they arrive through the
  strategy's ``on_update``; the version advances on each apply (or buffer flush);
* the retained clock ``{version, c_min, s, clocks, ...}`` is published whenever they change;
  the model is published when some device becomes allowed to start (with ``s = 0`` once per
  clock, as in FedAvg), so devices always start from the freshest model;
* the job ends when ``c_min`` reaches ``job.rounds``, after ``job.max_updates`` updates, or
  after ``job.time_budget`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from unus_edge import topics
from unus_edge.aggregator._ports import JobView, Outbox
from unus_edge.messages import RoundMetrics, Task, Update, staleness_bucket, task_encoding
from unus_edge.strategies import AsyncContext, AsyncStrategy, ClientUpdate
from unus_edge.topics import Channel

__all__ = ["SSPDriver"]

logger = logging.getLogger("unus_edge.aggregator")

_STANDING_KEPT = 3
"""Standing task ids remembered per device: the current one and the two before it."""


@dataclass(frozen=True)
class _Snapshot:
    """The job's running totals at one moment (a report covers the difference of two)."""

    updates: int
    examples: int
    loss_sum: float
    at: float
    refused: int


class SSPDriver:
    """SSP clocks, given the job's state (:class:`JobView`) and what it may send (:class:`Outbox`)."""

    def __init__(self, view: JobView, outbox: Outbox, strategy: AsyncStrategy) -> None:
        self.view = view
        self.outbox = outbox
        self.strategy = strategy
        self.bound = view.config.job.bound
        self.max_staleness = view.config.job.staleness_limit
        self.participants: set[str] = set()
        self.examples: dict[str, int] = {}
        self.c_min = 0
        self.updates = 0
        self.started = False
        self.done = asyncio.Event()
        self.context = AsyncContext(view.version, 1, self.bound)
        self._evaluated_at = 0
        self._evaluating = False
        self._tasks: dict[str, Task] = {}
        self.standing: dict[str, list[str]] = {}
        """Each device's last standing task ids (at most ``_STANDING_KEPT``), checkpointed."""
        self.staleness_counts: dict[str, int] = {}
        """Applied updates by staleness bucket (``messages.staleness_bucket``)."""
        self.published_c_min = 0
        """``c_min`` when the retained model was taken: every update of the clocks below it is in it."""
        self._requested_version = -1
        """The newest version a model publication was started for."""

    # ------------------------------------------------------------------ membership

    def _clock(self, device_id: str) -> int:
        record = self.view.registry.get(device_id)
        return record.clock if record else 0

    def _live(self) -> list[str]:
        """The online participants, sorted (called several times per update: no scan of the registry)."""
        registry = self.view.registry
        return sorted(d for d in self.participants if (record := registry.get(d)) is not None and record.online)

    def allowed(self, device_id: str) -> bool:
        return self.bound is None or self._clock(device_id) <= self.c_min + self.bound

    def _recompute(self) -> bool:
        """Recompute c_min over the live participants; returns whether it rose."""
        live = self._live()
        if not live:
            return False
        value = min(self._clock(device_id) for device_id in live)
        risen = value > self.c_min
        self.c_min = max(self.c_min, value)
        return risen

    def device_joined(self, device_id: str) -> None:
        if not self.started:
            return
        record = self.view.registry.get(device_id)
        if record is None:
            return
        if record.clock < self.c_min:
            logger.info("device %s rejoins at c_min = %d (its clock was %d)", device_id, self.c_min, record.clock)
            record.clock = self.c_min
        self.participants.add(device_id)
        self.examples[device_id] = record.num_examples
        self.context.total_examples = sum(self.examples.values())
        self._send_task(device_id)
        self.outbox.spawn(self._publish(model=True), "aggregator-ssp-publish")

    def device_offline(self, device_id: str, reason: str) -> None:
        if device_id in self.participants and self.started:
            logger.info("device %s left the SSP computation (%s)", device_id, reason)
            if self._recompute():
                self.outbox.spawn(self._publish(model=True), "aggregator-ssp-publish")
                self._check_done()

    def _send_task(self, device_id: str) -> None:
        view = self.view
        train = view.config.train
        config = {"job_seed": view.config.job.seed, "momentum": train.momentum,
                  "weight_decay": train.weight_decay, **self.strategy.device_config()}
        if train.loss != "softmax_cross_entropy":  # absent: cross-entropy (older devices)
            config["loss"] = train.loss
        # A fresh, unguessable id per standing task: only an update naming one this driver
        # handed out (kept over restarts in the checkpoint) counts.
        task = Task(device_id, f"ssp.{secrets.token_hex(8)}.{device_id}", 0, view.version, train.epochs,
                    train.batch_size, train.learning_rate, mode="ssp", config=config)
        self._tasks[device_id] = task
        recent = self.standing.setdefault(device_id, [])
        recent.append(task.task_id)
        del recent[:-_STANDING_KEPT]
        self.outbox.spawn(self.outbox.send_to_device(device_id, task), "aggregator-ssp-task")

    # ------------------------------------------------------------------ updates

    def judge(self, update: Update) -> tuple[str, str] | None:
        if not self.started or self.done.is_set():
            return "not_running", "the SSP computation is not running"
        # One of the device's recent standing tasks, of this or an earlier aggregator session (a
        # device's unacknowledged update survives a rejoin or a restart; its clock decides
        # whether it still counts).
        standing = update.task_id in self.standing.get(update.device_id, ())
        if update.device_id not in self.participants or not standing:
            return "unassigned", f"task {update.task_id!r} is not this device's standing task"
        clock = self._clock(update.device_id)
        if update.clock < clock:
            return "already_applied", f"clock {update.clock} was already applied (the device is at {clock})"
        if update.clock > clock:
            return "bad_clock", f"clock {update.clock} is ahead of the device's {clock}"
        if update.base_version > self.view.version:
            return "bad_base", f"base version {update.base_version} is newer than the model ({self.view.version})"
        staleness = self.view.version - update.base_version
        if self.max_staleness is not None and staleness > self.max_staleness:
            return "too_stale", f"staleness {staleness} > job.max_staleness {self.max_staleness}"
        wanted = task_encoding(self.strategy.device_config())  # what this device's standing task asks
        if update.encoding != wanted:
            return "bad_encoding", f"{self.strategy.name} takes {wanted}"
        return None

    def apply(self, msg_id: str, update: Update) -> tuple[int, int]:
        view = self.view
        staleness = view.version - update.base_version
        self.context.version = view.version
        changed = self.strategy.on_update(
            ClientUpdate(update.device_id, update.num_examples, update.tensors, update.base_version,
                         update.train_loss, staleness, update.metrics), self.context)
        if changed:
            view.version += 1
            self.context.version = view.version
        self.updates += 1
        self._train_loss_sum += update.train_loss * update.num_examples
        self._examples_sum += update.num_examples
        self._staleness_sum += staleness
        bucket = staleness_bucket(staleness)
        self.staleness_counts[bucket] = self.staleness_counts.get(bucket, 0) + 1
        risen = self._recompute()
        clock = self._clock(update.device_id)
        # Finished shows in the same clock message that lets the devices go, so none starts a
        # clock the job will not take.
        self._check_done()
        # Publish the model only when someone may start from it: the device that just
        # reported (if it is within the bound), or everybody waiting when c_min rose.
        # (A version applied earlier but not published yet counts too: FedBuff may raise c_min
        # with an update it only buffers, and the clock must not announce that c_min before a
        # model holding the updates below it is retained; see clock_state.)
        publish_model = ((risen or self.allowed(update.device_id)) and view.version > self._requested_version
                         and not self.done.is_set())
        self.outbox.spawn(self._publish(model=publish_model), "aggregator-ssp-publish")
        every = self.view.config.evaluation.every_updates or max(1, len(self._live()))
        if self.updates - self._evaluated_at >= every and not self.done.is_set():
            self._evaluate()
        if self.updates - self._federated_at >= every and not self.done.is_set():
            self._federated_at = self.updates
            self._federated_points += 1
            self.outbox.round_done(self._federated_points)  # on the devices, if configured
        return clock, view.version

    _federated_at = 0
    _federated_points = 0
    """Evaluation points reached (the federated evaluations' numbers, ``evaluation.federated_every``)."""
    _train_loss_sum = 0.0
    _examples_sum = 0
    _staleness_sum = 0
    _recorded_version = -1
    _recorded = _Snapshot(0, 0, 0.0, 0.0, 0)
    """The job's totals at the previous report: each report covers the updates since."""

    def _snapshot(self, at: float) -> _Snapshot:
        return _Snapshot(self.updates, self._examples_sum, self._train_loss_sum, at,
                         self.view.counters.refused)

    @property
    def mean_staleness(self) -> float:
        return self._staleness_sum / self.updates if self.updates else 0.0

    def _check_done(self) -> None:
        job = self.view.config.job
        if self.c_min >= job.rounds or (job.max_updates and self.updates >= job.max_updates):
            self.done.set()
            self.view.state = "finished"

    # ------------------------------------------------------------------ publishing, evaluation

    async def _publish(self, *, model: bool) -> None:
        view = self.view
        if model:
            taken_c_min = self.c_min
            self._requested_version = max(self._requested_version, view.version)
            view.params = self.strategy.global_params(self.context)
            await self.outbox.publish_model()
            self.published_c_min = max(self.published_c_min, taken_c_min)
        await self.outbox.publish_state()

    def _evaluate(self) -> None:
        if self._evaluating or self.view.evaluate_fn is None:
            return
        self._evaluating = True
        self._evaluated_at = self.updates
        self.outbox.spawn(self._evaluation(), "aggregator-ssp-evaluation")

    async def _evaluation(self) -> None:
        view = self.view
        try:
            params = self.strategy.evaluation_params(self.context)  # never folds: reading changes nothing
            version, taken = view.version, self._snapshot(view.wall_seconds())
            assert view.evaluate_fn is not None
            metrics = await asyncio.to_thread(view.evaluate_fn, params)
            self._record(version, taken, metrics)  # stamped with when the model was taken
        finally:
            self._evaluating = False

    def _record(self, version: int, taken: _Snapshot, evaluation: dict[str, float]) -> None:
        """A report on the updates since the previous one (per-period fields) and the job's totals."""
        view = self.view
        if version == self._recorded_version:
            return
        self._recorded_version = version
        live = max(1, len(self.participants))  # devices may already have left at the end
        previous, self._recorded = self._recorded, taken
        examples = taken.examples - previous.examples
        metrics = RoundMetrics(
            server_round=taken.updates // live, version=version, num_selected=live,
            num_updates=taken.updates - previous.updates, num_failures=0, num_examples=examples,
            duration_seconds=taken.at - previous.at,
            train_loss=(taken.loss_sum - previous.loss_sum) / examples if examples else None,
            eval_loss=evaluation.get("loss"), eval_accuracy=evaluation.get("accuracy"), eval_mse=evaluation.get("mse"),
            bytes_up=view.counters.bytes_up, bytes_down=view.counters.bytes_down,
            rejected=dict(view.counters.rejected), wall_seconds=taken.at,
            num_rejected=taken.refused - previous.refused,
        )
        view.history.append(metrics)
        view.server_round = self.c_min
        self.outbox.spawn(self.outbox.publish(topics.metrics(view.job, "round"), Channel.METRICS, metrics),
                      "aggregator-ssp-metrics")
        logger.info("ssp: %d updates, version %d, c_min %d, mean staleness %.2f%s", taken.updates, version, self.c_min,
                    self.mean_staleness,
                    f", accuracy {metrics.eval_accuracy:.4f}" if metrics.eval_accuracy is not None else "")
        if view.on_round is not None:
            view.on_round(metrics)

    # ------------------------------------------------------------------ lifetime

    async def run(self) -> None:
        from unus_edge.aggregator._driver import wait_for_devices

        view = self.view
        resumed = self._resume()
        if not resumed:
            await wait_for_devices(view)
        view.start_training_clock()
        view.state = "running"
        self.started = True
        online = [info.device_id for info in view.registry.online()]
        if not resumed:
            for device_id in online:
                record = view.registry.get(device_id)
                assert record is not None
                self.participants.add(device_id)
                self.examples[device_id] = record.num_examples
            self.context = AsyncContext(view.version, sum(self.examples.values()), self.bound)
            self.strategy.start_async(view.params, self.context)
        self._recompute()
        self._check_done()
        await self.outbox.publish_state()
        for device_id in online:  # after a restart, devices that re-register get theirs in device_joined
            self._send_task(device_id)
        logger.info("ssp: %d devices, s = %s, until c_min = %d", len(online),
                    "inf" if self.bound is None else self.bound, view.config.job.rounds)
        budget = view.config.job.time_budget or None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                await self.done.wait()
        self.done.set()
        changes = self.strategy.finish_async(self.context)  # e.g. FedBuff's partial buffer: nothing left out
        if changes:
            view.version += changes
            self.context.version = view.version
        view.params = self.strategy.global_params(self.context)
        if view.evaluate_fn is not None:
            taken = self._snapshot(view.wall_seconds())
            evaluation = await asyncio.to_thread(view.evaluate_fn, view.params)
            self._record(view.version, taken, evaluation)
        await self.outbox.evaluations_done(grace=3.0)  # the devices are leaving: what came in time
        view.server_round = self.c_min
        logger.info("ssp finished: %d updates, c_min %d, version %d, mean staleness %.2f", self.updates, self.c_min,
                    view.version, self.mean_staleness)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if not self.started:
            return {"mode": "ssp"}, {}
        tensors, scalars = self.strategy.state_dict()
        state = {
            "mode": "ssp", "started": True, "c_min": self.c_min, "participants": sorted(self.participants),
            "examples": self.examples, "updates": self.updates, "train_loss_sum": self._train_loss_sum,
            "examples_sum": self._examples_sum, "staleness_sum": self._staleness_sum, "strategy": scalars,
            "staleness_counts": dict(self.staleness_counts),
            "standing": {device_id: list(ids) for device_id, ids in self.standing.items()},
        }
        return state, {f"strategy/{name}": value for name, value in tensors.items()}

    def restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        if state.get("mode") == "ssp" and state.get("started"):
            self._restored = (state, tensors)

    _restored: tuple[dict[str, Any], dict[str, Any]] | None = None

    def _resume(self) -> bool:
        if self._restored is None:
            return False
        state, tensors = self._restored
        self._restored = None
        view = self.view
        self.c_min = int(state["c_min"])
        self.participants = set(state["participants"])
        self.examples = {k: int(v) for k, v in state["examples"].items()}
        self.updates = int(state["updates"])
        self._train_loss_sum = float(state["train_loss_sum"])
        self._examples_sum = int(state["examples_sum"])
        self._staleness_sum = int(state["staleness_sum"])
        self.staleness_counts = {str(k): int(v) for k, v in state.get("staleness_counts", {}).items()}
        self.standing = {str(k): [str(i) for i in ids] for k, ids in state.get("standing", {}).items()}
        self._evaluated_at = self.updates
        self._recorded = self._snapshot(view.wall_seconds())
        self.context = AsyncContext(view.version, max(1, sum(self.examples.values())), self.bound)
        self.strategy.start_async(view.params, self.context)
        self.strategy.load_state_dict({n[len("strategy/"):]: v for n, v in tensors.items()}, state["strategy"])
        logger.info("resuming SSP at c_min %d after %d updates (version %d)", self.c_min, self.updates,
                    view.version)
        return True

    def totals(self) -> tuple[int, float]:
        """Updates applied over the job, and their mean staleness."""
        return self.updates, self.mean_staleness

    def staleness_histogram(self) -> dict[str, int]:
        return dict(self.staleness_counts)

    def round_in_progress(self) -> int:
        return 0

    def clock_state(self) -> tuple[int, int | None, dict[str, int]]:
        """The clock to announce. Its ``c_min`` never runs ahead of the retained model: devices
        start from that model (protocol.md, "Model delivery"), so until the model holding the
        updates that raised ``c_min`` is published, the clock names the ``c_min`` of the model
        that is (concurrent publications may finish in any order)."""
        current = self.view.version == self.view.published_version
        c_min = self.c_min if current else min(self.c_min, self.published_c_min)
        return c_min, self.bound, {device_id: self._clock(device_id) for device_id in self._live()}
