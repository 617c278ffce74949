"""The staleness experiment: SSP with s in {0, 1, 2, 4, 8, inf}, FedAsync and FedBuff, with stragglers.

Setup (the SSP issue; results in ``docs/staleness-experiment.md``): the 2NN on MNIST, 20
in-process devices, IID (``--scheme shards`` for non-IID), each paced by a device profile
(``--device-profiles``, default ``fast=0.01:1``: a training step of 10 ms whatever the host
runs, ``unus_edge.profiles``), a seeded 20% of them 5 times slower (``--stragglers 0.2:5``:
their profile's step is 5 times longer), E, B and the learning rate the same for every run, the
same seeds and partition. Every run is a real ``unus_edge.simulation.simulate`` (aggregator +
devices over the embedded amqtt, or ``--broker mosquitto``, on 127.0.0.1) that stops after the
same wall-clock budget, ``job.time_budget``. ``--device-profiles host`` restores the old
stragglers (they wait 4 more times their training's CPU time), whose speed the host's load
decides. Every run reports its *overruns*: trainings the host computed more slowly than the
profile asked, where the host and not the profile set the device's speed.

* ``sync``: synchronous FedAvg, C = 1 (``job.mode = "sync"``): the baseline of every ratio;
* ``ssp s=K``: SSP delta averaging (``strategy ssp``) with staleness bound K;
* ``fedasync``, ``fedbuff``: s = inf, the strategies' default options (FedBuff's buffer size
  is ``--buffer-size``).

Reported per run: wall-clock seconds to 90/95/97% test accuracy (the first central evaluation
at or above it; "-" when not reached within the budget) and the speed-up against ``sync``
measured in the same invocation; the accuracy of the model the run holds at the budget; accepted
updates within the budget; mean staleness (versions applied between an update's base and its
application, ``JobResult.mean_staleness``); the evaluation resolution (median seconds and updates
between evaluations; SSP runs evaluate every ``--eval-every`` updates, ``evaluation.every_updates``,
s = 0 once per clock);
the stragglers' share of the updates and their cycle against a fast device's.

How the figures are obtained:

* accuracies and times: ``RoundMetrics`` through the ``on_round`` callback. ``wall_seconds``
  counts from the start of the first round or clock in both modes. An SSP record is stamped when
  the evaluated model was taken; a synchronous one after the round's evaluation, so for ``sync``
  the evaluation's own duration (timed around ``Strategy.evaluate``) is subtracted;
* the budget: ``job.time_budget`` in both modes. The synchronous driver starts no round after
  it, but finishes the round in progress: only rounds that ended within the budget count. The
  SSP driver's last record is the model held when the budget ran out;
* updates and mean staleness: ``JobResult.updates`` (for ``sync`` less the updates of the round
  that ended past the budget) and ``JobResult.mean_staleness``;
* per-device update starts and cycles: the devices' ``ssp start`` records
  (``unus_edge.device.ssp``; the result has no per-device counts).

    python bench/staleness.py [--quick] [--json] [--budget S] [--bounds 0 1 2 4 8 inf]
                              [--buffer-size K] [--eval-every N] [--plot PNG] [--results JSON]
                              [--device-profiles SPEC] [--scheme iid|shards] [--broker amqtt|mosquitto]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _common import (
    add_blas_flag,
    add_common_flags,
    blas_threads,
    broker_process,
    ensure_blas_threads,
    finish,
    load_average,
    machine,
    median,
    pyplot,
    resolve_dataset,
    save_figure,
    say,
    setup_output,
)

THRESHOLDS = (0.90, 0.95, 0.97)
MODEL_BYTES = 199_210 * 4
"""The 2NN's float32 parameters: one model on the wire, less its envelope."""
FULL_BOUNDS = ["0", "1", "2", "4", "8", "inf"]
QUICK_BOUNDS = ["0", "2", "inf"]


@dataclass
class Run:
    name: str
    mode: str  # "sync" or "ssp"
    strategy: str
    bound: str = "0"
    options: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    run: Run
    points: list[dict[str, float]]
    """One per central evaluation: wall (s), model_wall (s), updates (cumulative), version, accuracy,
    within_budget."""
    state: str
    updates: int
    """Accepted within the budget."""
    updates_total: int
    """``JobResult.updates``: ``sync`` also counts the round that ended past the budget."""
    mean_staleness: float
    starts: dict[str, int]
    cycle_seconds: dict[str, float]
    rejected: dict[str, int]
    broker_errors: int
    bytes_up: int
    bytes_down: int
    seconds: float
    load_before: float
    load_after: float
    overruns: int = 0
    """Trainings the host computed more slowly than the device's profile (its speed was the host's)."""
    trainings: int = 0


class StartTap(logging.Handler):
    """Keeps the devices' ``ssp start`` records: when, and which device."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.starts: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("ssp start") and record.args:
            self.starts.append((time.perf_counter(), str(record.args[0])))  # type: ignore[index]


class ErrorCount(logging.Handler):
    """Counts the broker's errors (amqtt gives up deliveries to clients too starved to acknowledge)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.example = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if not self.example:
            self.example = record.getMessage()[:200]


class SyncEvaluationTimer:
    """How long each synchronous round's evaluation took (``Strategy.evaluate``, restored on exit).

    A synchronous ``RoundMetrics.wall_seconds`` is stamped after the evaluation, an SSP one when
    the evaluated model was taken; subtracting the evaluation puts both at the model's moment.
    """

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._original: Any = None

    def __enter__(self) -> SyncEvaluationTimer:
        from unus_edge.strategies import Strategy

        timer, original = self, Strategy.evaluate
        self._original = original

        def evaluate(strategy: Any, server_round: int, params: Any, central: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(strategy, server_round, params, central)
            finally:
                timer.seconds[server_round] = time.perf_counter() - started

        Strategy.evaluate = evaluate  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from unus_edge.strategies import Strategy

        Strategy.evaluate = self._original  # type: ignore[method-assign]


def job_overrides(args: argparse.Namespace, run: Run, dataset: str, data_dir: str) -> list[str]:
    # s = 0 is evaluated once per clock, as sync is per round: its devices only ever see the model
    # of a whole clock, and an evaluation mid-clock folds the pending float64 sum into the float32
    # model early, which would end the bit-for-bit equality with FedAvg that same_models checks.
    every = args.devices if run.mode == "ssp" and run.bound == "0" else args.eval_every
    overrides = [
        "job.name=staleness", f"job.seed={args.seed}", "job.fraction=1.0", "job.rounds=1000000",
        "job.round_deadline=600", "job.wait_for_devices=600", f"job.time_budget={args.budget}",
        "model.source=mnist_2nn", "model.seed=0", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        f"train.learning_rate={args.lr}", f"evaluation.dataset={dataset}", "evaluation.num_examples=0",
        f"evaluation.every_updates={every}", f"job.mode={run.mode}", f"strategy.name={run.strategy}",
        *run.options,
    ]
    if run.mode == "ssp":
        overrides.append(f"job.staleness_bound={run.bound}")
    if data_dir:
        overrides.append(f"evaluation.data_dir={data_dir}")
    return overrides


def execute(args: argparse.Namespace, run: Run, dataset: str, data_dir: str, slowdowns: dict[int, float],
            profiles: list[Any] | None) -> Outcome:
    from unus_edge.config import load_job_config
    from unus_edge.simulation import SimulationOptions, simulate

    config = load_job_config(environ={}, overrides=job_overrides(args, run, dataset, data_dir))
    if args.broker_url:
        config = replace(config, broker=replace(config.broker, url=args.broker_url))
    options = SimulationOptions(config=config, num_devices=args.devices, dataset=dataset,  # type: ignore[arg-type]
                                data_dir=data_dir, scheme=args.scheme, train_examples=args.train_examples,
                                slowdowns=slowdowns, profiles=profiles, embedded_broker=not args.broker_url)

    async def main() -> Any:
        async with asyncio.timeout(args.budget + 600):
            return await simulate(options)

    starts_log, tap = logging.getLogger("unus_edge.device.ssp"), StartTap()
    starts_log.addHandler(tap)
    starts_log.setLevel(logging.INFO)
    broker_log, broker_errors = logging.getLogger("amqtt"), ErrorCount()
    broker_log.addHandler(broker_errors)
    broker_log.propagate = False  # counted and reported, not a traceback each
    load_before = load_average()
    started = time.perf_counter()
    try:
        with SyncEvaluationTimer() as evaluations:
            report = asyncio.run(main())
    finally:
        starts_log.removeHandler(tap)
        starts_log.setLevel(logging.ERROR)
        broker_log.removeHandler(broker_errors)
        broker_log.propagate = True
    if broker_errors.count:
        say(f"NOTE: {run.name}: the embedded broker logged {broker_errors.count} errors, "
            f"e.g. {broker_errors.example!r}")
    seconds = time.perf_counter() - started
    result = report.result

    # "wall": when the record was stamped; "model_wall": when the evaluated model was taken.
    history = result.history
    points: list[dict[str, Any]] = []
    updates = past_budget = 0
    for index, metrics in enumerate(history):
        updates += metrics.num_updates  # SSP records out of order still sum to their own count
        if run.mode == "ssp":
            model_wall = metrics.wall_seconds
            if index == len(history) - 1 and model_wall > args.budget:
                model_wall = args.budget  # the final record: the model held when the budget ran out
        else:
            model_wall = metrics.wall_seconds - evaluations.seconds.get(metrics.server_round, 0.0)
        within = model_wall <= args.budget + 1e-9
        if not within:
            past_budget += metrics.num_updates
        if metrics.eval_accuracy is None:
            continue
        points.append({"wall": metrics.wall_seconds, "model_wall": model_wall, "updates": updates,
                       "version": metrics.version, "accuracy": metrics.eval_accuracy, "within_budget": within})
    points.sort(key=lambda p: p["model_wall"])

    starts: dict[str, int] = {}
    times: dict[str, list[float]] = {}
    for when, device in tap.starts:
        starts[device] = starts.get(device, 0) + 1
        times.setdefault(device, []).append(when)
    cycles = {device: median(b - a for a, b in itertools.pairwise(moments))
              for device, moments in times.items() if len(moments) > 2}
    overruns, trainings = report.pace_overruns
    return Outcome(run, points, result.state, result.updates - past_budget, result.updates, result.mean_staleness,
                   starts, cycles, dict(result.rejected), broker_errors.count, result.bytes_up, result.bytes_down,
                   seconds, load_before, load_average(), overruns, trainings)


# ----------------------------------------------------------------------------- figures


def first_time(outcome: Outcome, threshold: float) -> float | None:
    for point in outcome.points:
        if point["within_budget"] and point["accuracy"] >= threshold:
            return float(point["model_wall"])
    return None


def budget_accuracy(outcome: Outcome) -> float | None:
    kept = [p for p in outcome.points if p["within_budget"]]
    return kept[-1]["accuracy"] if kept else None


def resolution(outcome: Outcome) -> tuple[float | None, float | None]:
    kept = [p for p in outcome.points if p["within_budget"]]
    if len(kept) < 2:
        return None, None
    return (median(b["model_wall"] - a["model_wall"] for a, b in itertools.pairwise(kept)),
            median(b["updates"] - a["updates"] for a, b in itertools.pairwise(kept)))


def straggler_share(outcome: Outcome, stragglers: set[str]) -> float | None:
    total = sum(outcome.starts.values())
    return sum(n for d, n in outcome.starts.items() if d in stragglers) / total if total else None


def cycles(outcome: Outcome, stragglers: set[str]) -> tuple[float | None, float | None]:
    """Median seconds between two update starts of a straggler, and of a fast device."""
    slow = [s for d, s in outcome.cycle_seconds.items() if d in stragglers]
    fast = [s for d, s in outcome.cycle_seconds.items() if d not in stragglers]
    return (median(slow) if slow else None), (median(fast) if fast else None)


def summarise(outcomes: list[Outcome], stragglers: set[str], budget: float) -> list[dict[str, Any]]:
    baseline = outcomes[0]
    rows = []
    for outcome in outcomes:
        row: dict[str, Any] = {"run": outcome.run.name, "strategy": outcome.run.strategy, "mode": outcome.run.mode,
                               "bound": outcome.run.bound if outcome.run.mode == "ssp" else "sync"}
        for threshold in THRESHOLDS:
            key = f"{round(threshold * 100)}"
            mine, base = first_time(outcome, threshold), first_time(baseline, threshold)
            row[f"seconds_to_{key}"] = mine
            row[f"speedup_{key}_vs_sync"] = base / mine if mine and base else None
        every_seconds, every_updates = resolution(outcome)
        slow_cycle, fast_cycle = cycles(outcome, stragglers)
        row.update({
            "accuracy_at_budget": budget_accuracy(outcome), "updates": outcome.updates,
            "updates_total": outcome.updates_total,
            "mean_staleness": outcome.mean_staleness, "eval_every_seconds": every_seconds,
            "eval_every_updates": every_updates, "straggler_share": straggler_share(outcome, stragglers),
            "straggler_cycle_seconds": slow_cycle, "fast_cycle_seconds": fast_cycle,
            "cycle_ratio_straggler_over_fast": slow_cycle / fast_cycle if slow_cycle and fast_cycle else None,
            "updates_per_second": outcome.updates / budget,
            "state": outcome.state,
            "rejected": outcome.rejected, "broker_errors": outcome.broker_errors,
            "bytes_up": outcome.bytes_up, "bytes_down": outcome.bytes_down,
            "bytes_down_per_update_over_model": (outcome.bytes_down / outcome.updates_total / MODEL_BYTES
                                                 if outcome.updates_total else None),
            "pace_overruns": outcome.overruns, "pace_trainings": outcome.trainings,
            "run_seconds": outcome.seconds, "load_before": outcome.load_before, "load_after": outcome.load_after,
            "points": outcome.points,
        })
        rows.append(row)
    return rows


def same_models(sync: Outcome, zero: Outcome, devices: int) -> tuple[int, float | None]:
    """sync vs s = 0 after the same whole clocks: evaluations compared, largest accuracy difference.

    Only evaluations after a whole number of clocks (updates a multiple of the fleet) can match;
    the model s = 0 holds at the budget is usually part of a clock.
    """
    by_updates = {p["updates"]: p["accuracy"] for p in sync.points}
    pairs = [(by_updates[p["updates"]], p["accuracy"]) for p in zero.points
             if p["updates"] % devices == 0 and p["updates"] in by_updates]
    return len(pairs), max((abs(x - y) for x, y in pairs), default=None)


def show(value: float | None, fmt: str, width: int = 0) -> str:
    text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
    return text.rjust(width)


def print_table(rows: list[dict[str, Any]], budget: float) -> None:
    say(f"\n{'run':14} {'t90 s':>7} {'t95 s':>7} {'x sync':>7} {'t97 s':>7} {'x sync':>7} "
        f"{'acc@' + format(budget, '.0f') + 's':>9} {'updates':>8} {'staleness':>10} {'eval every':>13} "
        f"{'strag.':>7} {'cycle':>6} {'down/upd':>8} {'overruns':>9}")
    for row in rows:
        every = f"{show(row['eval_every_seconds'], '.1f')} s/{show(row['eval_every_updates'], '.0f')} u"
        say(f"{row['run']:14} {show(row['seconds_to_90'], '.1f', 7)} {show(row['seconds_to_95'], '.1f', 7)} "
            f"{show(row['speedup_95_vs_sync'], '.2f', 7)} {show(row['seconds_to_97'], '.1f', 7)} "
            f"{show(row['speedup_97_vs_sync'], '.2f', 7)} {show(row['accuracy_at_budget'], '.4f', 9)} "
            f"{row['updates']:8d} {show(row['mean_staleness'], '.2f', 10)} {every:>13} "
            f"{show(row['straggler_share'], '.1%', 7)} "
            f"{show(row['cycle_ratio_straggler_over_fast'], '.1f', 6)} "
            f"{show(row['bytes_down_per_update_over_model'], '.2f', 8)} "
            f"{row['pace_overruns']:4d}/{row['pace_trainings']:<4d}")
    say("t90/t95/t97: wall seconds from the start to when the first model evaluated at or above 90/95/97% was taken "
        "('-': not within the budget); x sync: sync's time / this run's time (> 1: faster than sync).")
    say("staleness: mean versions applied between an update's base and its application (JobResult.mean_staleness); "
        "eval every: median seconds/updates between evaluations; strag.: the stragglers' share of the updates "
        "started; cycle: median seconds between a straggler's update starts / a fast device's; down/upd: bytes "
        "down (what the devices report receiving, plus tasks and acks) per accepted update, in models "
        "(goal <= 1.1); overruns: trainings the host computed more slowly than their profile / all trainings.")


def plot(outcomes: list[Outcome], path: Path, budget: float, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    bounded = [o for o in outcomes if o.run.strategy == "ssp"]
    colours = plt.get_cmap("viridis")
    for outcome in outcomes:
        kept = [p for p in outcome.points if p["within_budget"]]
        if outcome.run.mode == "sync":
            style = {"color": "black", "linestyle": "--", "linewidth": 2.2, "marker": "s", "markersize": 3}
        elif outcome.run.strategy == "ssp":
            index = bounded.index(outcome)
            style = {"color": colours(index / max(1, len(bounded) - 1) * 0.9), "linewidth": 1.4, "marker": ".",
                     "markersize": 3}
        else:
            style = {"color": "tab:red" if outcome.run.strategy == "fedasync" else "tab:orange", "linewidth": 1.4,
                     "linestyle": "-.", "marker": "x", "markersize": 3}
        left.plot([p["model_wall"] for p in kept], [p["accuracy"] for p in kept], label=outcome.run.name, **style)
        right.plot([p["updates"] for p in kept], [p["accuracy"] for p in kept], label=outcome.run.name, **style)
    for axis, xlabel in ((left, "wall-clock seconds"), (right, "accepted updates")):
        for threshold in THRESHOLDS[1:]:
            axis.axhline(threshold, color="grey", linewidth=0.7, linestyle=":")
        axis.set(xlabel=xlabel, ylabel="test accuracy", ylim=(0.90, 0.985))
        axis.grid(alpha=0.3)
    left.axvline(budget, color="grey", linewidth=0.8)
    left.set_title("accuracy vs wall-clock time")
    right.set_title("accuracy vs accepted updates")
    left.legend(fontsize=8, loc="lower right")
    return save_figure(plt, figure, path, title)


# ----------------------------------------------------------------------------- main


def build_runs(args: argparse.Namespace) -> list[Run]:
    runs = [Run("sync", "sync", "fedavg")]
    runs += [Run(f"ssp s={bound}", "ssp", "ssp", bound) for bound in args.bounds]
    if not args.no_async:
        runs.append(Run("fedasync", "ssp", "fedasync", "inf"))
        runs.append(Run(f"fedbuff K={args.buffer_size}", "ssp", "fedbuff", "inf",
                        [f"strategy.buffer_size={args.buffer_size}"]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    add_blas_flag(parser)
    parser.add_argument("--budget", type=float, help="wall-clock seconds per run (default 160, quick 20)")
    parser.add_argument("--bounds", nargs="+", help=f"SSP bounds (default {' '.join(FULL_BOUNDS)}; "
                                                    f"quick {' '.join(QUICK_BOUNDS)})")
    parser.add_argument("--buffer-size", type=int, default=10, help="FedBuff's K (default 10)")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="SSP runs: evaluate every N accepted updates (evaluation.every_updates; default 10)")
    parser.add_argument("--no-async", action="store_true", help="skip FedAsync and FedBuff")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--stragglers", default="0.2:5", help="FRACTION:FACTOR (default 0.2:5)")
    parser.add_argument("--device-profiles", default="fast=0.01:1",
                        help="device speeds (unus_edge.profiles; default fast=0.01:1, 10 ms a 2NN step, the pi-4 "
                             "profile without its link; 'host': no profiles, the stragglers wait extra CPU time)")
    parser.add_argument("--scheme", choices=["iid", "shards"], default="iid", help="partition (default iid)")
    parser.add_argument("--broker", choices=["amqtt", "mosquitto"], default="amqtt",
                        help="the embedded amqtt (default) or a Mosquitto process started here")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=0, help="first N training examples (0: all)")
    parser.add_argument("--plot", type=Path, help="write the accuracy plot here (PNG)")
    parser.add_argument("--results", type=Path, help="write every run's figures and curve here (JSON)")
    args = parser.parse_args()
    ensure_blas_threads(args.blas_threads)
    setup_output(args)
    logging.basicConfig(level=logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    args.budget = args.budget or (20.0 if args.quick else 160.0)
    args.bounds = args.bounds or (QUICK_BOUNDS if args.quick else FULL_BOUNDS)
    dataset, data_dir = resolve_dataset(args)
    args.dataset_used = dataset

    from unus_edge.profiles import assign_profiles, parse_profiles
    from unus_edge.simulation import stragglers

    slowdowns = stragglers(args.stragglers, args.devices, args.seed)
    profiles = (None if args.device_profiles == "host"
                else assign_profiles(parse_profiles(args.device_profiles), args.devices, args.seed))
    slow_ids = {f"device-{index:03d}" for index in slowdowns}
    runs = build_runs(args)
    settings = (f"2NN, {dataset} {args.scheme}, {args.devices} in-process devices, profiles {args.device_profiles}, "
                f"stragglers {args.stragglers} "
                f"({_listed(sorted(slow_ids))}), E={args.epochs} B={args.batch_size} lr={args.lr}, seed {args.seed}, "
                f"budget {args.budget:.0f} s per run, FedBuff K={args.buffer_size}")
    say(f"{settings}\n{os.cpu_count()} CPUs, BLAS threads {blas_threads()}, load average {load_average():.2f}; "
        f"{len(runs)} runs: {', '.join(r.name for r in runs)}")
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    broker = broker_process("mosquitto") if args.broker == "mosquitto" else contextlib.nullcontext(None)
    with broker as port:
        args.broker_url = f"mqtt://127.0.0.1:{port}" if port else ""
        outcomes.extend(run_one(args, run, dataset, data_dir, slowdowns, profiles) for run in runs)
    total = time.perf_counter() - started
    finish_experiment(args, runs, outcomes, slow_ids, settings, total)


def _listed(names: list[str], most: int = 6) -> str:
    """Names for a plot title: all of them, or the first few and how many more."""
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:most])} and {len(names) - most} more"


def run_one(args: argparse.Namespace, run: Run, dataset: str, data_dir: str, slowdowns: dict[int, float],
            profiles: list[Any] | None) -> Outcome:
    outcome = execute(args, run, dataset, data_dir, slowdowns, profiles)
    final = budget_accuracy(outcome)
    say(f"... {run.name:14} {outcome.state:9} {len(outcome.points):3d} evaluations, {outcome.updates:5d} updates, "
        f"accuracy at the budget {show(final, '.4f')}, t95 {show(first_time(outcome, 0.95), '.1f')} s, "
        f"t97 {show(first_time(outcome, 0.97), '.1f')} s, overruns {outcome.overruns}/{outcome.trainings} "
        f"({outcome.seconds:.0f} s, load {outcome.load_before:.1f} -> {outcome.load_after:.1f})")
    return outcome


def finish_experiment(args: argparse.Namespace, runs: list[Run], outcomes: list[Outcome], slow_ids: set[str],
                      settings: str, total: float) -> None:
    rows = summarise(outcomes, slow_ids, args.budget)
    print_table(rows, args.budget)
    zero = next((o for o in outcomes if o.run.strategy == "ssp" and o.run.bound == "0"), None)
    results: dict[str, Any] = {
        "machine": machine(), "settings": settings, "dataset": args.dataset_used, "devices": args.devices,
        "stragglers": args.stragglers, "straggler_ids": sorted(slow_ids), "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed, "budget_seconds": args.budget,
        "buffer_size": args.buffer_size, "train_examples": args.train_examples, "thresholds": THRESHOLDS,
        "device_profiles": args.device_profiles, "scheme": args.scheme, "broker": args.broker,
        "experiment_seconds": total, "runs": rows,
    }
    if zero is not None:
        compared, difference = same_models(outcomes[0], zero, args.devices)
        results["s0_vs_sync"] = {"evaluations_compared": compared, "max_accuracy_difference": difference}
        say(f"\ns = 0 vs sync after the same whole clocks: {compared} evaluations compared, largest accuracy "
            f"difference {show(difference, '.2e')} (0: the same models, as documented)")
    say(f"experiment wall time {total:.0f} s; load average at the end {load_average():.2f} "
        "(other work on this machine inflates every figure)")
    if args.plot:
        written = plot(outcomes, args.plot, args.budget, settings)
        if written:
            say(f"plot: {written}")
    finish(results, args.results)


if __name__ == "__main__":
    main()
