"""What a user waits for: the round, and the time to 97 % test accuracy, against a framework-free floor.

The job (issue 11): FedAvg, McMahan's 2NN, 10 devices with 6,000 MNIST examples each (IID),
E = 1, B = 10, lr 0.1, C = 1, central evaluation on the 10,000 test images after every round.
It runs through :func:`unus_edge.simulation.simulate` in four modes: in-process devices and
``--processes``, each over Mosquitto (a separate process) and over the embedded amqtt.

The floor, measured in the same run, is what a competent engineer writes without a framework
(``bench/_reference.py``): the 2NN's forward, backward and SGD by hand in float32 with one BLAS
thread, FedAvg as a float64 weighted mean of the deltas, evaluation by a NumPy forward pass. It
trains the same shards with the same per-round seeds, hence the same batches. Each of its 10
local trainings is timed alone, one after another; a round of the floor with the federation's
parallelism takes ``max(longest training, sum of trainings / cores)`` plus its aggregation and
its evaluation. The floor's own FedAvg runs until it reaches the target: its rounds, and its
time (the sum of its round floors).

Reported, per mode: the round wall time (median of the rounds after the first), its ratio to the
floor's round (goal <= 1.15x over Mosquitto, both device modes), the rounds and the time to the
target, and their ratio to the floor's. Contention: the devices' training CPU time summed over a
round (each update's ``metrics["cpu_seconds"]``, the training thread's CPU time, which excludes
waiting for a core) against the same 10 trainings by the engine (``train_task``) one after
another in this process (goal <= 1.3x). The old "overhead" figure (round - the slowest device's
reported training time) is printed beside it, labelled for what it is: that training time is
the device's own wall time on shared cores, so subtracting it hides both the engine's cost and
the contention between devices.

    python bench/bench_time_to_accuracy.py [--quick] [--json] [--modes ...] [--target 0.97]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from _reference import train_reference
from bench_round_overhead import TrainSecondsTap

from unus_edge.config import JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device import train_task
from unus_edge.messages import RoundMetrics, Task
from unus_edge.nn import Graph
from unus_edge.onnx_io import read_parameters
from unus_edge.seeds import device_seed
from unus_edge.simulation import SimulationOptions, simulate, usable_cores
from unus_edge.zoo import resolve_model

NUM_DEVICES = 10
SEED = 3
ROUND_GOAL = 1.15
CONTENTION_GOAL = 1.3
MODES = ("inprocess-mosquitto", "processes-mosquitto", "inprocess-amqtt", "processes-amqtt")

Params = dict[str, np.ndarray[Any, Any]]


def job_config(rounds: int, url: str, learning_rate: float) -> JobConfig:
    return load_job_config(environ={}, overrides=[
        "job.name=tta", f"job.rounds={rounds}", f"job.seed={SEED}", "job.fraction=1.0", "job.round_deadline=900",
        "strategy.name=fedavg", "model.source=mnist_2nn", "train.epochs=1", "train.batch_size=10",
        f"train.learning_rate={learning_rate}", "evaluation.dataset=mnist", f"broker.url={url}",
    ])


# ------------------------------------------------------------------------------------------ the floor


def evaluate_reference(params: Mapping[str, np.ndarray[Any, Any]], x: np.ndarray[Any, Any],
                       y: np.ndarray[Any, Any]) -> float:
    """Test accuracy of the 2NN by a plain NumPy forward pass, 1,000 rows at a time."""
    correct = 0
    for start in range(0, len(x), 1000):
        h = x[start : start + 1000] @ params["fc1.weight"].T + params["fc1.bias"]
        np.maximum(h, 0, out=h)
        h = h @ params["fc2.weight"].T + params["fc2.bias"]
        np.maximum(h, 0, out=h)
        logits = h @ params["fc3.weight"].T + params["fc3.bias"]
        correct += int((logits.argmax(axis=1) == y[start : start + 1000]).sum())
    return correct / len(x)


@dataclass
class FloorRound:
    server_round: int
    trainings: list[float]
    """Wall seconds of each local training, run alone."""
    training_cpu: float
    """CPU seconds of the 10 trainings."""
    aggregate_seconds: float
    evaluate_seconds: float
    accuracy: float

    def seconds(self, parallel: int) -> float:
        """The round with the federation's parallelism: max(longest, sum / cores) + aggregation + evaluation."""
        return (max(max(self.trainings), sum(self.trainings) / parallel) + self.aggregate_seconds
                + self.evaluate_seconds)


@dataclass
class Floor:
    """FedAvg by hand over the federation's shards, seeds and batches."""

    shards: list[Dataset]
    test: Dataset
    params: Params
    learning_rate: float
    rounds: list[FloorRound] = field(default_factory=list)

    def run_round(self) -> FloorRound:
        server_round = len(self.rounds) + 1
        trainings: list[float] = []
        models: list[Params] = []
        cpu = time.thread_time()
        for index, shard in enumerate(self.shards):
            seed = device_seed(SEED, server_round, f"device-{index:03d}")
            started = time.perf_counter()
            trained, _, _ = train_reference(self.params, shard.x, shard.y, epochs=1, batch_size=10,
                                            learning_rate=self.learning_rate, seed=seed)
            trainings.append(time.perf_counter() - started)
            models.append(trained)
        cpu = time.thread_time() - cpu
        started = time.perf_counter()
        weights = [len(shard) for shard in self.shards]
        total = float(sum(weights))
        new: Params = {}
        for key, base in self.params.items():
            sums = np.zeros(base.shape, np.float64)
            for trained, n in zip(models, weights, strict=True):
                sums += np.multiply(trained[key] - base, n, dtype=np.float64)
            new[key] = (base + sums / total).astype(np.float32)
        self.params = new
        aggregate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        accuracy = evaluate_reference(self.params, self.test.x.reshape(len(self.test), -1), self.test.y)
        result = FloorRound(server_round, trainings, cpu, aggregate_seconds, time.perf_counter() - started, accuracy)
        self.rounds.append(result)
        return result


def threaded_training_seconds(params: Params, shards: list[Dataset], server_round: int, learning_rate: float,
                              workers: int) -> float:
    """Wall seconds of the round's 10 floor trainings in ``workers`` threads of this process.

    The floor of in-process devices, which share one interpreter and hence one GIL: no code
    written in Python gets ``cores`` times faster in threads, hand-written NumPy included.
    """
    def one(index: int) -> None:
        seed = device_seed(SEED, server_round, f"device-{index:03d}")
        train_reference(params, shards[index].x, shards[index].y, epochs=1, batch_size=10,
                        learning_rate=learning_rate, seed=seed)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(shards))))
    return time.perf_counter() - started


def engine_cpu_seconds(graph: Graph, params: Params, shards: list[Dataset], server_round: int,
                       learning_rate: float) -> float:
    """CPU seconds of the round's 10 trainings by the engine, one after another (what the devices run)."""
    stop = threading.Event()
    total = 0.0
    for index, shard in enumerate(shards):
        device_id = f"device-{index:03d}"
        task = Task(device_id, f"r{server_round}.0.{device_id}", server_round, 0, 1, 10, learning_rate,
                    config={"seed": device_seed(SEED, server_round, device_id), "momentum": 0.0, "weight_decay": 0.0})
        started = time.thread_time()
        train_task(graph, params, shard, task, stop)
        total += time.thread_time() - started
    return total


def first_round_at(accuracies: list[tuple[int, float | None, float]], target: float) -> tuple[int, float] | None:
    """(round, seconds since the start) of the first round whose accuracy reaches ``target``."""
    for server_round, accuracy, seconds in accuracies:
        if accuracy is not None and accuracy >= target:
            return server_round, seconds
    return None


# ------------------------------------------------------------------------------------------ federations


def run_federation(mode: str, rounds: int, dataset: str, data_dir: str, train_examples: int,
                   learning_rate: float) -> dict[str, Any]:
    placement, broker = mode.split("-")

    async def run(url: str | None) -> list[RoundMetrics]:
        history: list[RoundMetrics] = []
        with tempfile.TemporaryDirectory(prefix="unus-tta-") as folder:
            options = SimulationOptions(
                config=job_config(rounds, url or "mqtt://127.0.0.1:1883", learning_rate), num_devices=NUM_DEVICES,
                dataset=dataset, data_dir=data_dir, train_examples=train_examples,  # type: ignore[arg-type]
                embedded_broker=url is None, processes=placement == "processes",
                out_dir=Path(folder) if placement == "processes" else None)
            async with asyncio.timeout(3600):
                report = await simulate(options, on_round=history.append)
        if report.result.state != "finished":
            raise RuntimeError(f"{mode}: the job ended {report.result.state}: {report.result.reason}")
        return history

    with TrainSecondsTap() as tap:
        if broker == "mosquitto":
            with broker_process("mosquitto") as port:
                history = asyncio.run(run(f"mqtt://127.0.0.1:{port}"))
        else:
            history = asyncio.run(run(None))
    rows = [{"round": m.server_round, "duration": m.duration_seconds, "wall": m.wall_seconds,
             "accuracy": m.eval_accuracy, "max_train": max(tap.by_round.get(m.server_round, [0.0])),
             "cpu_sum": sum(tap.cpu_by_round.get(m.server_round, [])),
             "cpu_reports": len(tap.cpu_by_round.get(m.server_round, []))}
            for m in history]
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    add_blas_flag(parser)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--target", type=float, help="test accuracy to reach (default 0.97; quick 0.90)")
    parser.add_argument("--max-rounds", type=int, help="rounds the floor may take to reach it (default 40)")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--train-examples", type=int, help="examples shared by the 10 devices (default 60000, "
                                                           "quick 12000)")
    args = parser.parse_args()
    ensure_blas_threads(args.blas_threads)
    setup_output(args)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    dataset, data_dir = resolve_dataset(args)
    target = args.target or (0.90 if args.quick else 0.97)
    max_rounds = args.max_rounds or (10 if args.quick else 40)
    train_examples = args.train_examples or (12_000 if args.quick else 60_000)
    modes = [m for m in args.modes if not m.endswith("mosquitto") or mosquitto_binary() is not None]
    if len(modes) != len(args.modes):
        say("NOTE: mosquitto is not installed: its modes are skipped")
    parallel = usable_cores()  # the simulator's compute slots for in-process devices, too
    say(f"FedAvg, 2NN, {NUM_DEVICES} devices x {train_examples // NUM_DEVICES} {dataset} examples (IID), E=1 B=10 "
        f"lr {args.learning_rate}, central evaluation every round, target {target:.0%}; {parallel} cores, "
        f"BLAS threads {blas_threads()}, load average {load_average():.2f}")

    config = job_config(1, "mqtt://127.0.0.1:1", args.learning_rate)
    model = resolve_model(config.model.source, seed=config.model.seed)
    train = load_dataset(dataset, "train", data_dir=data_dir or None, seed=SEED, num_examples=train_examples)
    test = load_dataset(dataset, "test", data_dir=data_dir or None, seed=SEED)
    indices = partition(train.y, NUM_DEVICES, "iid", seed=SEED)
    shards = [Dataset(train.x[i].reshape(len(i), -1), train.y[i], train.num_classes) for i in indices]

    say("... the floor's FedAvg, by hand, until the target")
    floor = Floor(shards, test, read_parameters(model), args.learning_rate)
    while len(floor.rounds) < max_rounds:
        done = floor.run_round()
        if done.accuracy >= target:
            break
    floor_reached = first_round_at([(r.server_round, r.accuracy, 0.0) for r in floor.rounds], target)
    rounds = len(floor.rounds) + (2 if floor_reached else 0)  # a little slack for the federation
    say(f"    {len(floor.rounds)} rounds, accuracy {floor.rounds[-1].accuracy:.4f}"
        + ("" if floor_reached else f" (the target was not reached in {max_rounds} rounds)"))

    results: dict[str, Any] = {"machine": machine(), "dataset": dataset, "train_examples": train_examples,
                               "devices": NUM_DEVICES, "target": target, "cores": parallel,
                               "goal_round_ratio": ROUND_GOAL, "modes": {}}
    replays: list[list[FloorRound]] = []
    graph = Graph(model)
    sequential_cpu: list[float] = []
    threaded: list[float] = []
    for mode in modes:
        say(f"... {mode}: {rounds} rounds")
        results["modes"][mode] = run_federation(mode, rounds, dataset, data_dir, train_examples, args.learning_rate)
        # The floors again, interleaved with the federations, so both see the same machine.
        replay = Floor(shards, test, read_parameters(model), args.learning_rate)
        replays.append([replay.run_round() for _ in range(min(3, rounds))])
        sequential_cpu.append(engine_cpu_seconds(graph, read_parameters(model), shards, 2, args.learning_rate))
        threaded.append(threaded_training_seconds(read_parameters(model), shards, 2, args.learning_rate, parallel))
    engine_cpu = median(sequential_cpu)

    # The floor's round: its median over every timed round (first run and replays), rounds after the first.
    timed = [r for r in floor.rounds[1:]] + [r for replay in replays for r in replay[1:]]
    floor_round = median(r.seconds(parallel) for r in timed) if timed else floor.rounds[0].seconds(parallel)
    floor_training = median(max(max(r.trainings), sum(r.trainings) / parallel) for r in timed or floor.rounds)
    floor_eval = median(r.evaluate_seconds for r in timed or floor.rounds)
    floor_time = (sum(floor_round for _ in range(floor_reached[0])) if floor_reached else None)
    results["floor"] = {"round_seconds": floor_round, "training_seconds": floor_training,
                        "evaluate_seconds": floor_eval, "rounds_to_target": floor_reached and floor_reached[0],
                        "seconds_to_target": floor_time,
                        "accuracies": [r.accuracy for r in floor.rounds],
                        "sequential_training_seconds": median(sum(r.trainings) for r in timed or floor.rounds),
                        "sequential_training_cpu_seconds": median(r.training_cpu for r in timed or floor.rounds)}
    say(f"\nfloor (hand-written NumPy, {parallel} cores): round {floor_round:.3f} s = training {floor_training:.3f} s "
        f"(max(longest, sum/{parallel})) + evaluation {floor_eval:.3f} s + aggregation; "
        + (f"{floor_reached[0]} rounds, {floor_time:.1f} s to {target:.0%}" if floor_reached and floor_time
           else "target not reached"))
    gil_round = median(threaded) + floor_round - floor_training
    results["floor"]["gil_round_seconds"] = gil_round
    say(f"GIL floor (the same trainings in {parallel} threads of one process, as in-process devices run): "
        f"round {gil_round:.3f} s")
    results["engine_sequential_cpu_seconds"] = engine_cpu
    say(f"engine, the same 10 trainings one after another: {engine_cpu:.3f} CPU s "
        f"({engine_cpu / results['floor']['sequential_training_cpu_seconds']:.2f}x the floor's CPU time: the "
        f"engine runs at {results['floor']['sequential_training_cpu_seconds'] / engine_cpu:.2f}x its speed)")
    say(f"\n{'mode':22} {'round s':>8} {'x floor':>8} {'goal':>6} {'rounds':>7} {'to target s':>12} "
        f"{'x floor':>8} {'CPU x seq':>10} {'goal':>6} {'x GIL floor':>11}   "
        "old 'overhead' (round - slowest device's own train time)")
    for mode in modes:
        rows = results["modes"][mode]["rows"]
        wall = median(r["duration"] for r in rows[1:]) if len(rows) > 1 else rows[0]["duration"]
        reached = first_round_at([(r["round"], r["accuracy"], r["wall"]) for r in rows], target)
        old = median((r["duration"] - r["max_train"]) / r["duration"] for r in rows[1:]) if len(rows) > 1 else 0.0
        ratio = wall / floor_round
        to_target = reached[1] / floor_time if reached and floor_time else None
        goal_applies = mode.endswith("mosquitto")
        measured = [r for r in rows[1:] if r["cpu_reports"] == NUM_DEVICES] or rows
        contention = median(r["cpu_sum"] for r in measured) / engine_cpu
        results["modes"][mode] |= {"round_seconds": wall, "round_ratio": ratio,
                                   "round_goal_met": ratio <= ROUND_GOAL if goal_applies else None,
                                   "rounds_to_target": reached and reached[0],
                                   "seconds_to_target": reached and reached[1], "time_to_target_ratio": to_target,
                                   "old_overhead_fraction": old, "cpu_over_sequential": contention,
                                   "contention_goal_met": contention <= CONTENTION_GOAL,
                                   "round_over_gil_floor": wall / gil_round if mode.startswith("inprocess") else None}
        say(f"{mode:22} {wall:8.3f} {ratio:8.2f} {verdict(ratio <= ROUND_GOAL) if goal_applies else '':>6} "
            f"{reached[0] if reached else '-':>7} {reached[1] if reached else float('nan'):12.1f} "
            f"{to_target if to_target else float('nan'):8.2f} {contention:10.2f} "
            f"{verdict(contention <= CONTENTION_GOAL):>6} "
            f"{f'{wall / gil_round:.2f}' if mode.startswith('inprocess') else '':>11}   {old:.1%}")
    results["load_average_end"] = load_average()
    say(f"\nload average at the end: {load_average():.2f} (other work on this machine inflates every figure)")
    emit(results)


if __name__ == "__main__":
    main()
