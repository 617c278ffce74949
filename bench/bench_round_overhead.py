"""Framework overhead per synchronous round: 2NN, 10 in-process devices, over MQTT.

A real ``unus_edge.simulation.simulate`` run (aggregator + 10 devices as asyncio tasks, each
training in a worker thread) through mosquitto (a separate process) and through the embedded
amqtt (in the simulation's own event loop, the ``unus-edge simulate`` default). Central
evaluation is off, so a round is: select, send tasks, train, upload, aggregate, publish.

Round wall time is ``RoundMetrics.duration_seconds`` (the ``on_round`` callback). Overhead is
measured against three compute floors, per round, median over the rounds after a warm-up round:

* A, slowest device: round time - max ``train_seconds`` of the round's updates (what the
  devices report; collected by wrapping the aggregator's update handler in this process only). The
  devices share 2 cores, so their compute is inflated by contention (and includes the wait for
  a worker thread of asyncio's default executor); this floor absorbs that.
* B, sequential compute: the same 10 local trainings (same shards, same seeds, same
  ``train_task`` the device runs) one after another in this process, no messaging.
  On a multi-core machine the concurrent round can beat it, so B can be negative.
* C, same parallelism: the same 10 trainings in a thread pool of the size of asyncio's default
  executor (``min(32, cpus + 4)`` workers), no messaging: the fairest pure-compute floor.

Goal: overhead < 5% of round time.

BLAS threads: 1 by default (``--blas-threads``), like the device processes ``simulate --processes``
starts. With OpenBLAS's own threads, the concurrent trainings of in-process devices oversubscribe
the cores and local training gets several times slower (try ``--blas-threads default``).

    python bench/bench_round_overhead.py [--quick] [--json] [--rounds N] [--brokers mosquitto amqtt]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from typing import Any

from _common import (
    add_blas_flag,
    add_common_flags,
    blas_threads,
    broker_process,
    emit,
    ensure_blas_threads,
    load_average,
    machine,
    median,
    mosquitto_binary,
    resolve_dataset,
    say,
    setup_output,
    verdict,
)

from unus_edge.aggregator import Aggregator, _inbound, device_seed
from unus_edge.config import JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device import train_task
from unus_edge.messages import RoundMetrics, Task
from unus_edge.nn import Graph
from unus_edge.onnx_io import read_parameters
from unus_edge.simulation import SimulationOptions, simulate
from unus_edge.zoo import resolve_model

NUM_DEVICES = 10
GOAL = 0.05
SEED = 3


def job_config(rounds: int, url: str = "mqtt://127.0.0.1:1883") -> JobConfig:
    return load_job_config(environ={}, overrides=[
        "job.name=overhead", f"job.rounds={rounds}", f"job.seed={SEED}", "job.fraction=1.0",
        "job.round_deadline=600", "model.source=mnist_2nn", "train.epochs=1", "train.batch_size=10",
        "train.learning_rate=0.05", "evaluation.dataset=none", f"broker.url={url}",
    ])


class TrainSecondsTap:
    """Wraps the aggregator's update handler (this process only) to record accepted updates' train_seconds."""

    def __init__(self) -> None:
        self.by_round: dict[int, list[float]] = {}
        self.cpu_by_round: dict[int, list[float]] = {}
        """The updates' ``metrics["cpu_seconds"]``: the training thread's CPU time, without waits for a core."""
        self._original: Any = None

    def __enter__(self) -> TrainSecondsTap:
        original = self._original = _inbound.on_update
        tap = self

        def on_update(service: Aggregator, envelope: Any, update: Any) -> None:
            original(service, envelope, update)
            current = getattr(service.driver, "current_round", None)
            if current is not None and current.accepted.get(update.device_id) == envelope.msg_id:
                tap.by_round.setdefault(update.server_round, []).append(float(update.train_seconds))
                cpu = update.metrics.get("cpu_seconds")
                if isinstance(cpu, int | float):
                    tap.cpu_by_round.setdefault(update.server_round, []).append(float(cpu))

        _inbound.on_update = on_update
        return self

    def __exit__(self, *exc: object) -> None:
        _inbound.on_update = self._original


def run_federation(kind: str, rounds: int, dataset: str, data_dir: str, train_examples: int) -> list[dict[str, float]]:
    """One simulate() run; per round: duration, slowest device's train_seconds, updates."""

    async def run(url: str | None) -> list[RoundMetrics]:
        config = job_config(rounds, url or "mqtt://127.0.0.1:1883")
        options = SimulationOptions(config=config, num_devices=NUM_DEVICES, dataset=dataset,  # type: ignore[arg-type]
                                    data_dir=data_dir, train_examples=train_examples, embedded_broker=url is None)
        history: list[RoundMetrics] = []
        async with asyncio.timeout(1800):
            report = await simulate(options, on_round=history.append)
        if report.result.state != "finished":
            raise RuntimeError(f"{kind}: the job ended {report.result.state}: {report.result.reason}")
        return history

    with TrainSecondsTap() as tap:
        if kind == "mosquitto":
            with broker_process("mosquitto") as port:
                history = asyncio.run(run(f"mqtt://127.0.0.1:{port}"))
        else:
            history = asyncio.run(run(None))
    rows = []
    for metrics in history:
        seconds = tap.by_round.get(metrics.server_round, [])
        if metrics.num_updates != NUM_DEVICES or len(seconds) != NUM_DEVICES:
            raise RuntimeError(f"{kind}: round {metrics.server_round} had {metrics.num_updates} updates "
                               f"({len(seconds)} tapped), expected {NUM_DEVICES}")
        rows.append({"round": metrics.server_round, "duration": metrics.duration_seconds,
                     "max_train": max(seconds), "min_train": min(seconds)})
    return rows


class ComputeFloor:
    """The same 10 local trainings as round ``r`` of the federation, without any messaging."""

    def __init__(self, dataset: str, data_dir: str, train_examples: int) -> None:
        config = job_config(1)
        self.config = config
        model = resolve_model(config.model.source, seed=config.model.seed)
        self.graph = Graph(model)
        self.params = read_parameters(model)
        train = load_dataset(dataset, "train", data_dir=data_dir or None, seed=config.job.seed,
                             num_examples=train_examples or None)
        indices = partition(train.y, NUM_DEVICES, "iid", seed=config.job.seed)
        self.shards = [Dataset(train.x[i], train.y[i], train.num_classes) for i in indices]
        self.stop = threading.Event()

    def _task(self, index: int, server_round: int) -> Task:
        device_id = f"device-{index:03d}"
        train = self.config.train
        return Task(device_id, f"r{server_round}.0.{device_id}", server_round, 0, train.epochs, train.batch_size,
                    train.learning_rate, config={"seed": device_seed(self.config.job.seed, server_round, device_id),
                                                 "momentum": train.momentum, "weight_decay": train.weight_decay})

    def _one(self, index: int, server_round: int) -> float:
        started = time.perf_counter()
        train_task(self.graph, self.params, self.shards[index], self._task(index, server_round), self.stop)
        return time.perf_counter() - started

    def sequential(self, server_round: int) -> float:
        started = time.perf_counter()
        for index in range(NUM_DEVICES):
            self._one(index, server_round)
        return time.perf_counter() - started

    def pooled(self, server_round: int) -> float:
        workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            started = time.perf_counter()
            list(pool.map(lambda i: self._one(i, server_round), range(NUM_DEVICES)))
            return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    add_blas_flag(parser)
    parser.add_argument("--rounds", type=int, help="measured rounds (after one warm-up round); default 5, quick 2")
    parser.add_argument("--brokers", nargs="+", choices=["mosquitto", "amqtt"], default=["mosquitto", "amqtt"])
    parser.add_argument("--train-examples", type=int,
                        help="training examples shared by the 10 devices (default 60000, quick 12000)")
    args = parser.parse_args()
    ensure_blas_threads(args.blas_threads)
    setup_output(args)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    dataset, data_dir = resolve_dataset(args)
    measured = args.rounds or (2 if args.quick else 5)
    train_examples = args.train_examples or (12_000 if args.quick else 60_000)
    brokers = [b for b in args.brokers if b != "mosquitto" or mosquitto_binary() is not None]
    if len(brokers) != len(args.brokers):
        say("NOTE: mosquitto is not installed: skipped")
    say(f"2NN, {NUM_DEVICES} in-process devices, {train_examples} {dataset} examples "
        f"({train_examples // NUM_DEVICES} per device), E=1 B=10, {measured} measured rounds after 1 warm-up; "
        f"{os.cpu_count()} CPUs, BLAS threads {blas_threads()}, load average {load_average():.2f}")

    floor = ComputeFloor(dataset, data_dir, train_examples)
    results: dict[str, Any] = {"machine": machine(), "dataset": dataset, "train_examples": train_examples,
                               "devices": NUM_DEVICES, "rounds": measured, "goal_overhead_fraction": GOAL}
    sequential: list[float] = []
    pooled: list[float] = []
    federations: dict[str, list[dict[str, float]]] = {}
    floor.sequential(1)  # warm-up (allocator, BLAS threads)
    for kind in brokers:
        say(f"... federation through {kind}")
        rows = run_federation(kind, measured + 1, dataset, data_dir, train_examples)
        federations[kind] = rows[1:]
        # The compute floors, interleaved with the federations, for the same rounds' seeds.
        for row in rows[1:]:
            sequential.append(floor.sequential(int(row["round"])))
            pooled.append(floor.pooled(int(row["round"])))
    floor_seq, floor_pool = median(sequential), median(pooled)
    say(f"\ncompute floors (median of {len(sequential)}): B sequential {floor_seq:.3f} s, "
        f"C thread pool ({min(32, (os.cpu_count() or 1) + 4)} workers) {floor_pool:.3f} s")
    say("\nper round (measured rounds):")
    say(f"{'broker':10} {'round':>5} {'wall s':>8} {'max train s':>12} {'min train s':>12}")
    for kind, rows in federations.items():
        for row in rows:
            say(f"{kind:10} {int(row['round']):5d} {row['duration']:8.3f} {row['max_train']:12.3f} "
                f"{row['min_train']:12.3f}")
    say(f"\n{'broker':10} {'floor':24} {'round s':>8} {'floor s':>8} {'overhead s':>11} {'overhead':>9} "
        f"{'round/floor':>12}   goal < {GOAL:.0%}")
    for kind, rows in federations.items():
        wall = median(r["duration"] for r in rows)
        slowest = median(r["duration"] - r["max_train"] for r in rows)
        entries = {
            "A slowest device": (median(r["max_train"] for r in rows), slowest,
                                 median((r["duration"] - r["max_train"]) / r["duration"] for r in rows)),
            "B sequential compute": (floor_seq, wall - floor_seq, (wall - floor_seq) / wall),
            "C same-parallelism": (floor_pool, wall - floor_pool, (wall - floor_pool) / wall),
        }
        figures: dict[str, Any] = {"round_seconds": wall, "rounds": rows}
        for name, (floor_s, overhead, fraction) in entries.items():
            key = name.split()[0]
            ratio = wall / floor_s if floor_s > 0 else float("nan")
            say(f"{kind:10} {name:24} {wall:8.3f} {floor_s:8.3f} {overhead:11.3f} {fraction:9.1%} {ratio:12.3f}   "
                f"{verdict(fraction < GOAL)}")
            figures[key] = {"floor_seconds": floor_s, "overhead_seconds": overhead, "overhead_fraction": fraction,
                            "ratio_round_over_floor": ratio, "goal_met": fraction < GOAL}
        results[kind] = figures
    results["floor_sequential_seconds"] = floor_seq
    results["floor_pool_seconds"] = floor_pool
    results["floor_sequential_samples"] = sequential
    results["floor_pool_samples"] = pooled
    say("\nA: overhead per round = wall - slowest device's reported train_seconds (median over rounds).")
    say("B/C: overhead = median wall - median pure compute of the same 10 trainings (B one by one, C in a pool).")
    results["load_average_end"] = load_average()
    say(f"load average at the end: {load_average():.2f} (other work on this machine inflates every figure)")
    emit(results)


if __name__ == "__main__":
    main()
