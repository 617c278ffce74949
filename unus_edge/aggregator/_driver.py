"""The synchronous round loop (FedAvg and friends).

Per round:

1. wait until ``job.min_devices`` devices are online;
2. ask the strategy which devices train, and with what (seeded RNG);
3. publish one task per selected device (the retained model of this version is already out);
4. collect updates until every selected device answered or failed, or the deadline passed;
5. below quorum (``job.min_fraction`` of the selected devices), retry with newly selected
   devices, at most ``job.max_retries`` times, then fail the job with a clear error;
6. let the strategy aggregate (with the failures), publish the new model and clock,
   evaluate, publish the metrics, and commit (checkpoint).

The round in progress, with its accumulator, is part of every checkpoint: an aggregator that
restarts mid-round continues that round with the updates it had already acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

from unus_edge import topics
from unus_edge.aggregator._ports import JobView, Outbox
from unus_edge.aggregator._round import SyncRound
from unus_edge.aggregator._sender import send_in_batches
from unus_edge.errors import JobError, StrategyError
from unus_edge.messages import RoundMetrics, Task, Update
from unus_edge.seeds import device_seed
from unus_edge.strategies import (
    Accumulator,
    Assignment,
    ClientUpdate,
    Failure,
    Params,
    RoundContext,
    SavableAccumulator,
    Strategy,
)
from unus_edge.topics import Channel

__all__ = ["RoundDriver", "wait_for_devices"]

logger = logging.getLogger("unus_edge.aggregator")


async def wait_for_devices(view: JobView) -> None:
    """Wait until ``job.min_devices`` devices are online; fail the job after ``job.wait_for_devices``."""
    needed = view.config.job.min_devices
    limit = view.config.job.wait_for_devices
    registry = view.registry
    if registry.online_count < needed:
        logger.info("waiting for %d device(s) to be online (%d now)", needed, registry.online_count)
    try:
        async with asyncio.timeout(limit):
            while registry.online_count < needed:
                view.devices_changed.clear()
                await view.devices_changed.wait()
    except TimeoutError:
        raise JobError(view.job, f"only {registry.online_count} of the {needed} devices needed "
                                    f"(job.min_devices) came online within {limit:.0f} s") from None


class RoundDriver:
    """Synchronous rounds, given the job's state (:class:`JobView`) and what it may send (:class:`Outbox`)."""

    def __init__(self, view: JobView, outbox: Outbox, strategy: Strategy[Any]) -> None:
        self.view = view
        self.outbox = outbox
        self.strategy = strategy
        self.current_round: SyncRound | None = None
        self.accumulator: Accumulator | None = None
        self.round_changed = asyncio.Event()
        """Set when the current round gains an update or a failure."""
        self._tasks: dict[str, Task] = {}
        self._planned = 0
        self._started = 0.0
        self._refused_at_start = 0
        self._slowest = 0.0
        """The longest training time (`train_seconds`) an accepted update of this round reported."""
        """Updates refused over the job when the current round started (num_rejected is per round)."""
        self._resumed = False

    # ------------------------------------------------------------------ updates and presence

    def judge(self, update: Update) -> tuple[str, str] | None:
        """Why this update cannot go into the current round, or ``None`` if it can."""
        current = self.current_round
        if current is None or current.task_of(update.device_id) != update.task_id:
            return "unassigned", f"task {update.task_id!r} is not an open assignment of this device"
        if update.device_id in current.accepted:
            return "already_applied", "this device's update for the round was already applied"
        if update.base_version != current.version:
            return "stale_base", f"trained from version {update.base_version}, the round uses {current.version}"
        wanted = self._tasks[update.device_id].encoding if update.device_id in self._tasks else "delta"
        if update.encoding != wanted:
            return "bad_encoding", f"the task asked for {wanted}"
        return None

    def apply(self, msg_id: str, update: Update) -> tuple[int, int]:
        """Fold an accepted update into the round; returns the device's clock and the version."""
        view = self.view
        current = self.current_round
        assert current is not None and self.accumulator is not None
        self.accumulator.add(ClientUpdate(update.device_id, update.num_examples, update.tensors,
                                             update.base_version, update.train_loss, 0, update.metrics))
        current.accept(update.device_id, msg_id)
        self._slowest = max(self._slowest, update.train_seconds)
        self.round_changed.set()
        record = view.registry.get(update.device_id)
        return (record.clock if record else 0), view.version

    def device_offline(self, device_id: str, reason: str) -> None:
        if self.current_round is not None:
            self.current_round.fail(device_id, "offline", reason)
            self.round_changed.set()

    def device_joined(self, device_id: str) -> None:
        """A device (re)joined mid-round while still assigned: give it its task again."""
        current = self.current_round
        if current is not None and current.is_pending(device_id):
            self.resend_task(device_id)

    def round_in_progress(self) -> int:
        return self.current_round.server_round if self.current_round is not None else 0

    def clock_state(self) -> tuple[int, int | None, dict[str, int]]:
        """Synchronous rounds as seen through the clock: every device is at the round, s = 0."""
        return self.view.server_round, 0, {}

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The strategy's own state, and the round in progress with its accumulator."""
        strategy_tensors, strategy_scalars = self.strategy.state_dict()
        state: dict[str, Any] = {"mode": "sync", "strategy": strategy_scalars}
        tensors: dict[str, Any] = {f"strategy/{n}": v for n, v in strategy_tensors.items()}
        round_state, round_tensors = self._round_state()
        if round_state is not None:
            state["round"] = round_state
            tensors.update(round_tensors)
        return state, tensors

    def _round_state(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        current = self.current_round
        if current is None:
            return None, {}
        round_state: dict[str, Any] = {
            "server_round": current.server_round, "version": current.version, "attempt": current.attempt,
            "planned": self._planned, "task_ids": current.task_ids, "accepted": current.accepted,
            "failures": {d: [f.reason, f.detail] for d, f in current.failures.items()},
            "assignments": {d: [a.epochs, a.batch_size, a.learning_rate, dict(a.config)]
                            for d, a in current.assignments.items()},
        }
        accumulator = self.accumulator
        if not isinstance(accumulator, SavableAccumulator):
            return None, {}  # an accumulator that cannot be saved: the round restarts
        tensors, scalars = accumulator.state_dict()
        round_state["accumulator"] = scalars
        return round_state, {f"accumulator/{n}": v for n, v in tensors.items()}

    def restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Put back the round in progress, at once: updates may arrive before ``run`` starts."""
        view = self.view
        if "strategy" in state:
            self.strategy.load_state_dict({n[len("strategy/"):]: v for n, v in tensors.items()
                                              if n.startswith("strategy/")}, state["strategy"])
        saved = state.get("round")
        if not saved or saved["version"] != view.version:
            return
        assignments = {device: Assignment(device, int(e), int(b), float(lr), c)
                       for device, (e, b, lr, c) in saved["assignments"].items()}
        current = SyncRound(saved["server_round"], saved["version"], saved["attempt"], assignments,
                            dict(saved["task_ids"]), math.inf, 0.0, dict(saved["accepted"]),
                            {d: Failure(d, r, t) for d, (r, t) in saved["failures"].items()})
        accumulator = self.strategy.new_accumulator(current.server_round, view.params)
        if not isinstance(accumulator, SavableAccumulator):  # saved by an earlier version of the strategy
            logger.warning("%s's accumulator cannot be restored: round %d runs again", self.strategy.name,
                           current.server_round)
            return
        accumulator.load_state_dict({n[len("accumulator/"):]: v for n, v in tensors.items()
                                     if n.startswith("accumulator/")}, saved["accumulator"])
        self.accumulator = accumulator
        self.current_round = current
        self._planned = int(saved["planned"])
        for device_id, assignment in assignments.items():
            self._tasks[device_id] = self._task(assignment, current.server_round, current.attempt,
                                                current.task_ids.get(device_id, ""))
        self._resumed = True
        logger.info("resuming round %d: %d of %d updates already applied", current.server_round,
                    len(current.accepted), len(assignments))

    # ------------------------------------------------------------------ rounds

    async def run(self) -> None:
        view = self.view
        if self._resumed and self.current_round is not None:
            self._resumed = False
            current = self.current_round
            current.deadline = asyncio.get_running_loop().time() + view.config.job.round_deadline
            self._begin_round_clock()
            await self._finish_round(current)
        budget = view.config.job.time_budget
        while view.server_round < view.config.job.rounds:
            if budget and view.wall_seconds() >= budget:
                logger.info("job %s: the time budget of %.0f s is spent after round %d", view.job, budget,
                            view.server_round)
                break
            await wait_for_devices(view)
            current = await self._start_round(view.server_round + 1)
            await self._finish_round(current)
        await self.outbox.evaluations_done()  # the last round's federated evaluation, before the devices leave
        logger.info("job %s finished after %d rounds", view.job, view.server_round)

    def totals(self) -> tuple[int, float]:
        """Updates applied over the job, and their mean staleness (always 0 in rounds)."""
        return sum(m.num_updates for m in self.view.history), 0.0

    def staleness_histogram(self) -> dict[str, int]:
        """Applied updates by staleness bucket: in rounds every update is fresh."""
        updates, _ = self.totals()
        return {"0": updates} if updates else {}

    def _context(self, server_round: int) -> RoundContext:
        config = self.view.config
        return RoundContext(server_round, config.job.fraction, config.train.epochs, config.train.batch_size,
                            config.train.learning_rate, self.view.rng)

    def _task(self, assignment: Assignment, server_round: int, attempt: int, task_id: str = "") -> Task:
        view = self.view
        config = dict(assignment.config)
        config.setdefault("seed", device_seed(view.config.job.seed, server_round, assignment.device_id))
        config.setdefault("momentum", view.config.train.momentum)
        config.setdefault("weight_decay", view.config.train.weight_decay)
        if view.config.train.loss != "softmax_cross_entropy":  # absent: cross-entropy (older devices)
            config.setdefault("loss", view.config.train.loss)
        # An unguessable id per assignment: a device cannot relabel an update as another round's.
        task_id = task_id or f"r{server_round}.{attempt}.{secrets.token_hex(8)}.{assignment.device_id}"
        return Task(assignment.device_id, task_id, server_round,
                    view.version, assignment.epochs, assignment.batch_size, assignment.learning_rate,
                    deadline_seconds=view.config.job.round_deadline, config=config)

    async def _assign(self, current: SyncRound, assignments: list[Assignment]) -> None:
        tasks = [self._task(a, current.server_round, current.attempt) for a in assignments]
        for assignment, task in zip(assignments, tasks, strict=True):
            current.assignments[assignment.device_id] = assignment
            current.task_ids[assignment.device_id] = task.task_id
            self._tasks[task.device_id] = task
        await send_in_batches(self.outbox.send_to_device, [(task.device_id, task) for task in tasks])

    def resend_task(self, device_id: str) -> None:
        task = self._tasks.get(device_id)
        if task is not None:
            logger.info("re-sending task %s to %s", task.task_id, device_id)
            self.outbox.spawn(self.outbox.send_to_device(device_id, task), "aggregator-task-resend")

    def _progress(self, current: SyncRound) -> None:
        callback = self.view.on_progress
        if callback is not None:
            from unus_edge.aggregator._results import RoundProgress

            callback(RoundProgress(current.server_round, self.view.config.job.rounds, len(current.assignments),
                                   len(current.accepted), len(current.failures)))

    async def _collect(self, current: SyncRound) -> None:
        loop = asyncio.get_running_loop()
        while not current.complete:
            remaining = current.deadline - loop.time()
            if remaining <= 0:
                break
            self.round_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.round_changed.wait()
            self._progress(current)

    def _begin_round_clock(self) -> None:
        """The round's duration and its own refusals count from here (a new or a resumed round)."""
        self._started = time.perf_counter()
        self._refused_at_start = self.view.counters.refused
        self.view.start_training_clock()

    async def _start_round(self, server_round: int) -> SyncRound:
        view = self.view
        loop = asyncio.get_running_loop()
        self._begin_round_clock()
        self._slowest = 0.0
        view.state = "running"
        assignments = self.strategy.configure_round(self._context(server_round), view.registry.online())
        if not assignments:
            raise StrategyError(f"selected no device for round {server_round}", strategy=self.strategy.name)
        self._planned = len(assignments)
        self.accumulator = self.strategy.new_accumulator(server_round, view.params)
        current = SyncRound(server_round, view.version, 0, {}, {}, loop.time() + view.config.job.round_deadline,
                            loop.time())
        self.current_round = current
        self._tasks.clear()
        await self._assign(current, assignments)
        logger.info("round %d/%d started: %d device(s) selected of %d online (model version %d)", server_round,
                    view.config.job.rounds, len(assignments), view.registry.online_count, view.version)
        await self.outbox.publish_state()  # operators see the round under way, not "waiting, round 0"
        return current

    async def _finish_round(self, current: SyncRound) -> None:
        view = self.view
        job = view.config.job
        loop = asyncio.get_running_loop()
        quorum = math.ceil(job.min_fraction * self._planned)
        if not job.allow_empty_rounds:
            quorum = max(quorum, 1)  # a round of 0/4 updates is not progress (issue 14)
        while True:
            self._progress(current)
            await self._collect(current)
            current.close()
            if len(current.accepted) >= quorum:
                break
            if current.attempt >= job.max_retries:
                self.current_round = None
                raise JobError(view.job, f"round {current.server_round}: {len(current.accepted)} of "
                                            f"{self._planned} selected devices answered, below the quorum of "
                                            f"{quorum} (job.min_fraction, at least one unless "
                                            f"job.allow_empty_rounds); gave up after {job.max_retries} retries")
            current.attempt += 1
            missing = self._planned - len(current.accepted)
            extra = self._retry_devices(current, missing)
            if not extra:  # nobody to ask now: wait for a device to come (back) online, not a busy retry
                view.devices_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(job.round_deadline):
                        await view.devices_changed.wait()
                extra = self._retry_devices(current, missing)
            logger.warning("round %d: %d of %d answered (quorum %d); retry %d with %d new device(s)",
                           current.server_round, len(current.accepted), self._planned, quorum, current.attempt,
                           len(extra))
            current.deadline = loop.time() + job.round_deadline
            await self._assign(current, extra)
        await self._aggregate(current)

    def _retry_devices(self, current: SyncRound, missing: int) -> list[Assignment]:
        """Devices for a retry: online ones not tried in this round, and ones that failed by going
        offline and are back (they get a new task of this attempt)."""
        online = self.view.registry.online()
        candidates = [d for d in online if d.device_id not in current.assignments
                      or (d.device_id in current.failures and current.failures[d.device_id].reason == "offline")]
        extra = self.strategy.configure_round(self._context(current.server_round), candidates)[:missing]
        for assignment in extra:
            current.failures.pop(assignment.device_id, None)
        return extra

    def _warn_of_timeouts(self, current: SyncRound, failures: Sequence[Failure]) -> None:
        """Devices that timed out, with the numbers an operator needs to set the deadline."""
        timed_out = [f.device_id for f in failures if f.reason == "timeout"]
        if not timed_out:
            return
        deadline = self.view.config.job.round_deadline
        answered = (f"the {len(current.accepted)} that answered trained for up to {self._slowest:.0f} s"
                    if current.accepted else "none answered")
        logger.warning("round %d: %d device(s) timed out after job.round_deadline = %g s (%s); if they are "
                       "only slow, raise job.round_deadline", current.server_round, len(timed_out), deadline,
                       answered)

    async def _aggregate(self, current: SyncRound) -> None:
        view = self.view
        failures = current.close()
        self._warn_of_timeouts(current, failures)
        accumulator = self.accumulator
        assert accumulator is not None  # made with the round (or restored with it)
        new_params = self.strategy.aggregate(current.server_round, view.params, accumulator, failures)
        if new_params is not None:
            _check_shapes(new_params, view.params, self.strategy.name)
            view.params = new_params
            view.version += 1
        view.server_round = current.server_round
        self.current_round = None
        await self.outbox.publish_model()
        self.outbox.round_done(current.server_round)  # on the devices, if configured: not waited for
        evaluation: dict[str, float] = {}
        if view.evaluate_fn is not None:
            evaluation = dict(await asyncio.to_thread(self.strategy.evaluate, current.server_round,
                                                      view.params, view.evaluate_fn))
        elapsed = time.perf_counter() - self._started
        metrics = RoundMetrics(
            server_round=current.server_round, version=view.version, num_selected=len(current.assignments),
            num_updates=len(current.accepted), num_failures=len(failures),
            num_examples=accumulator.num_examples, duration_seconds=elapsed,
            train_loss=accumulator.train_loss, eval_loss=evaluation.get("loss"),
            eval_accuracy=evaluation.get("accuracy"), eval_mse=evaluation.get("mse"), bytes_up=view.counters.bytes_up,
            bytes_down=view.counters.bytes_down, rejected=dict(view.counters.rejected),
            wall_seconds=view.wall_seconds(), num_rejected=view.counters.refused - self._refused_at_start,
        )
        view.history.append(metrics)
        await self.outbox.publish(topics.metrics(view.job, "round"), Channel.METRICS, metrics)
        await self.outbox.publish_state()
        await self.outbox.commit()
        logger.info("round %d/%d: %d/%d updates, %s%.2f s", current.server_round, view.config.job.rounds,
                    len(current.accepted), len(current.assignments),
                    f"accuracy {metrics.eval_accuracy:.4f}, " if metrics.eval_accuracy is not None else "", elapsed)
        if view.on_round is not None:
            view.on_round(metrics)


def _check_shapes(new: Params, old: Params, strategy: str) -> None:
    if set(new) != set(old):
        raise StrategyError(f"aggregate returned tensors {sorted(set(new) ^ set(old))[:5]} that differ from the model",
                            strategy=strategy)
    for name, value in new.items():
        if value.shape != old[name].shape or value.dtype != old[name].dtype:
            raise StrategyError(f"aggregate returned {name} as {value.dtype}{value.shape}, the model has "
                                f"{old[name].dtype}{old[name].shape}", strategy=strategy)
