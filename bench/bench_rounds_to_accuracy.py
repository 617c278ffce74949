"""Rounds of FedAvg to 97% test accuracy: 2NN, MNIST IID, 100 devices, C = 0.1, E = 1, B = 10.

McMahan et al. (2017, Table 2) report 87 rounds for this setting with a tuned learning rate.

Running 100 in-process devices through a broker for hundreds of rounds is slow on 2 cores, so
the rounds run in an in-process loop that computes exactly what the framework computes:

* the same job, model, partition and test set (``prepare_job``, ``load_dataset``, ``partition``
  with the job seed, device ids ``device-000`` ... as ``simulate`` names them);
* selection by ``FedAvg().configure_round`` with the job's seeded RNG (``default_rng(job.seed)``,
  one draw per round, as the aggregator's driver does);
* local training by the device's own ``train_task`` with the task the driver would send
  (per-device seed ``device_seed(job.seed, round, device_id)``, momentum, weight decay);
* aggregation by the strategy's ``WeightedMean`` accumulator and ``FedAvg.aggregate``;
* the aggregator's central evaluation function after every round.

The shortcut is checked in the same run: the best learning rate's rounds (all of them, up to
the target; the first 2 with ``--quick``) also run through the real
``unus_edge.simulation.simulate`` (100 in-process devices over mosquitto, or the embedded amqtt
without it) and the global parameters after those rounds must be identical to the loop's (the
maximum absolute difference is printed; 0 means bit-for-bit). That run also gives the floor of the
wall-time figure: framework seconds per round / loop (pure compute) seconds per round.

For each learning rate the loop stops at 97% or at the round cap.

    python bench/bench_rounds_to_accuracy.py [--quick] [--json] [--lrs 0.05 0.1 0.2] [--cap 300]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np
from _common import (
    add_blas_flag,
    add_common_flags,
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
)

from unus_edge.aggregator import device_seed, prepare_job
from unus_edge.config import JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.device import train_task
from unus_edge.messages import RoundMetrics, Task
from unus_edge.nn import Graph
from unus_edge.simulation import SimulationOptions, simulate
from unus_edge.strategies import ClientUpdate, DeviceInfo, Params, RoundContext

NUM_DEVICES = 100
TARGET = 0.97
THRESHOLDS = (0.90, 0.95, 0.97)
PAPER_ROUNDS = 87
SEED = 0


def job_config(lr: float, rounds: int, dataset: str, data_dir: str, url: str = "mqtt://127.0.0.1:1883") -> JobConfig:
    overrides = [
        "job.name=r2a", f"job.rounds={rounds}", f"job.seed={SEED}", "job.fraction=0.1", "job.round_deadline=600",
        "job.wait_for_devices=600", "model.source=mnist_2nn", "strategy.name=fedavg", "train.epochs=1",
        "train.batch_size=10", f"train.learning_rate={lr}", f"evaluation.dataset={dataset}",
        "evaluation.num_examples=0", f"broker.url={url}",
    ]
    if data_dir:
        overrides.append(f"evaluation.data_dir={data_dir}")
    return load_job_config(environ={}, overrides=overrides)


class FaithfulLoop:
    """FedAvg rounds computed as the aggregator and devices compute them, without messaging."""

    def __init__(self, config: JobConfig, dataset: str, data_dir: str) -> None:
        self.config = config
        self.parts = prepare_job(config)
        self.graph = Graph(self.parts.model)
        train = load_dataset(dataset, "train", data_dir=data_dir or None, seed=config.job.seed)
        indices = partition(train.y, NUM_DEVICES, "iid", seed=config.job.seed)
        self.shards = {f"device-{i:03d}": Dataset(train.x[part], train.y[part], train.num_classes)
                       for i, part in enumerate(indices)}
        self.devices = [DeviceInfo(device_id, len(shard)) for device_id, shard in self.shards.items()]
        self.rng = np.random.default_rng(config.job.seed)
        self.params: Params = {name: np.array(value) for name, value in self.parts.params.items()}
        self.version = 0
        self.stop = threading.Event()

    def round(self, server_round: int) -> dict[str, float]:
        config = self.config
        strategy = self.parts.strategy
        context = RoundContext(server_round, config.job.fraction, config.train.epochs, config.train.batch_size,
                               config.train.learning_rate, self.rng)
        assignments = strategy.configure_round(context, self.devices)
        accumulator = strategy.new_accumulator(server_round, self.params)
        for assignment in assignments:
            settings = dict(assignment.config)
            settings.setdefault("seed", device_seed(config.job.seed, server_round, assignment.device_id))
            settings.setdefault("momentum", config.train.momentum)
            settings.setdefault("weight_decay", config.train.weight_decay)
            task = Task(assignment.device_id, f"r{server_round}.0.{assignment.device_id}", server_round, self.version,
                        assignment.epochs, assignment.batch_size, assignment.learning_rate,
                        deadline_seconds=config.job.round_deadline, config=settings)
            result = train_task(self.graph, self.params, self.shards[assignment.device_id], task, self.stop)
            accumulator.add(ClientUpdate(assignment.device_id, result.num_examples, result.delta, self.version,
                                         result.train_loss, 0, {"steps": result.steps}))
        new_params = strategy.aggregate(server_round, self.params, accumulator, [])
        if new_params is not None:
            self.params = new_params
            self.version += 1
        evaluation: dict[str, float] = {}
        if self.parts.evaluate is not None:
            evaluation = dict(strategy.evaluate(server_round, self.params, self.parts.evaluate))
        return evaluation


def verify(lr: float, rounds: int, dataset: str, data_dir: str) -> dict[str, Any]:
    """The first ``rounds`` through the real simulate(), against the loop: identical parameters?"""
    history: list[RoundMetrics] = []

    async def run(url: str | None) -> Any:
        config = job_config(lr, rounds, dataset, data_dir, url or "mqtt://127.0.0.1:1883")
        options = SimulationOptions(config=config, num_devices=NUM_DEVICES, dataset=dataset,  # type: ignore[arg-type]
                                    data_dir=data_dir, embedded_broker=url is None)
        async with asyncio.timeout(1800):
            return await simulate(options, on_round=history.append)

    broker = "mosquitto" if mosquitto_binary() is not None else "amqtt (embedded)"
    started = time.perf_counter()
    if mosquitto_binary() is not None:
        with broker_process("mosquitto") as port:
            report = asyncio.run(run(f"mqtt://127.0.0.1:{port}"))
    else:
        report = asyncio.run(run(None))
    simulate_wall = time.perf_counter() - started
    if report.result.state != "finished":
        raise RuntimeError(f"the simulation ended {report.result.state}: {report.result.reason}")
    loop = FaithfulLoop(job_config(lr, rounds, dataset, data_dir), dataset, data_dir)
    loop_seconds, loop_accuracy = [], []
    for server_round in range(1, rounds + 1):
        began = time.perf_counter()
        evaluation = loop.round(server_round)
        loop_seconds.append(time.perf_counter() - began)
        loop_accuracy.append(evaluation.get("accuracy"))
    got = report.result.params
    worst = max(float(np.max(np.abs(got[name].astype(np.float64) - loop.params[name]))) for name in got)
    identical = all(np.array_equal(got[name], loop.params[name]) for name in got)
    sim_accuracy = [m.eval_accuracy for m in history]
    return {"broker": broker, "rounds": rounds, "lr": lr, "identical": identical, "max_abs_difference": worst,
            "simulate_round_seconds": [m.duration_seconds for m in history],
            "simulate_wall_seconds": simulate_wall, "loop_round_seconds": loop_seconds,
            "simulate_accuracy": sim_accuracy, "loop_accuracy": loop_accuracy,
            "updates": [m.num_updates for m in history], "rejected": report.result.rejected}


def run_lr(lr: float, cap: int, dataset: str, data_dir: str) -> dict[str, Any]:
    loop = FaithfulLoop(job_config(lr, cap, dataset, data_dir), dataset, data_dir)
    reached: dict[str, int | None] = {f"{t:.2f}": None for t in THRESHOLDS}
    accuracy: list[float] = []
    started = time.perf_counter()
    for server_round in range(1, cap + 1):
        value = float(loop.round(server_round).get("accuracy", float("nan")))
        accuracy.append(value)
        for threshold in THRESHOLDS:
            key = f"{threshold:.2f}"
            if reached[key] is None and value >= threshold:
                reached[key] = server_round
        if server_round % 25 == 0:
            say(f"    lr {lr}: round {server_round}, accuracy {value:.4f}")
        if value >= TARGET:
            break
    wall = time.perf_counter() - started
    return {"lr": lr, "rounds_run": len(accuracy), "reached": reached, "rounds_to_target": reached[f"{TARGET:.2f}"],
            "best_accuracy": max(accuracy), "final_accuracy": accuracy[-1], "wall_seconds": wall,
            "seconds_per_round": wall / len(accuracy), "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    add_blas_flag(parser)
    parser.add_argument("--lrs", type=float, nargs="+", help="learning rates (default 0.05 0.1 0.2; quick 0.1)")
    parser.add_argument("--cap", type=int, help="round cap per learning rate (default 300, quick 25)")
    parser.add_argument("--verify-rounds", type=int,
                        help="rounds through simulate() with the best learning rate (default: all the rounds it "
                             "took to reach the target, or 3 if none did; quick 2)")
    args = parser.parse_args()
    ensure_blas_threads(args.blas_threads)
    setup_output(args)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    dataset, data_dir = resolve_dataset(args)
    lrs = args.lrs or ([0.1] if args.quick else [0.05, 0.1, 0.2])
    cap = args.cap or (25 if args.quick else 300)
    say(f"2NN, {dataset} IID, {NUM_DEVICES} devices, C=0.1, E=1, B=10, target {TARGET:.0%}, cap {cap} rounds; "
        f"load average {load_average():.2f}")
    figures: dict[str, Any] = {"machine": machine(), "dataset": dataset, "target": TARGET, "cap": cap,
                               "paper_rounds": PAPER_ROUNDS, "runs": []}

    say("\n1. rounds to accuracy (in-process loop that computes what the framework computes)")
    for lr in lrs:
        figures["runs"].append(run_lr(lr, cap, dataset, data_dir))
    say(f"\n{'lr':>6} {'to 90%':>7} {'to 95%':>7} {'to 97%':>7} {'/ 87':>6} {'best acc':>9} {'rounds run':>10} "
        f"{'wall s':>8} {'s/round':>8}")
    for result in figures["runs"]:
        reached = result["reached"]
        shown = {key: str(value) if value is not None else f">{result['rounds_run']}" for key, value in reached.items()}
        target = result["rounds_to_target"]
        ratio = f"{target / PAPER_ROUNDS:.2f}" if target else "-"
        say(f"{result['lr']:6g} {shown['0.90']:>7} {shown['0.95']:>7} {shown['0.97']:>7} "
            f"{ratio:>6} {result['best_accuracy']:9.4f} {result['rounds_run']:10d} {result['wall_seconds']:8.1f} "
            f"{result['seconds_per_round']:8.3f}")
    hits = [r for r in figures["runs"] if r["rounds_to_target"] is not None]
    best = min(hits, key=lambda r: r["rounds_to_target"]) if hits else None
    figures["best"] = {"lr": best["lr"], "rounds": best["rounds_to_target"],
                       "ratio_to_paper": best["rounds_to_target"] / PAPER_ROUNDS} if best else None

    verify_lr = best["lr"] if best else lrs[0]
    verify_rounds = args.verify_rounds or (2 if args.quick else (best["rounds_to_target"] if best else 3))
    say(f"\n2. the shortcut checked: {verify_rounds} rounds of lr {verify_lr} through simulate() "
        f"({NUM_DEVICES} in-process devices) vs the loop")
    check = verify(verify_lr, verify_rounds, dataset, data_dir)
    figures["verification"] = check
    sim_round = median(check["simulate_round_seconds"])
    loop_round = median(check["loop_round_seconds"])
    figures.update(simulate_round_seconds=sim_round, loop_round_seconds=loop_round,
                   simulate_over_loop=sim_round / loop_round)
    say(f"   simulate ({check['broker']}): {sum(check['updates'])} updates in {verify_rounds} rounds, "
        f"rejected {check['rejected'] or 0}")
    last = min(3, verify_rounds)
    say(f"   accuracy, last {last} rounds: simulate {[round(a, 4) for a in check['simulate_accuracy'][-last:]]}, "
        f"loop {[round(a, 4) for a in check['loop_accuracy'][-last:]]}")
    say(f"   global parameters after {verify_rounds} rounds: "
        + ("IDENTICAL (bit for bit)" if check["identical"] else
           f"DIFFERENT, max |difference| {check['max_abs_difference']:.3g}"))
    say(f"   seconds per round (median): simulate {sim_round:.3f}, loop {loop_round:.3f} (floor); "
        f"ratio {sim_round / loop_round:.2f}")
    say(f"   whole simulate() call, start-up included: {check['simulate_wall_seconds']:.1f} s")

    if best is not None:
        say(f"\nbest: {best['rounds_to_target']} rounds to {TARGET:.0%} with lr {best['lr']} "
            f"(McMahan et al.: {PAPER_ROUNDS}; ratio {best['rounds_to_target'] / PAPER_ROUNDS:.2f})"
            + ("" if dataset == "mnist" else "  [synthetic data: NOT comparable with the paper]"))
    else:
        say(f"\n{TARGET:.0%} NOT REACHED within {cap} rounds for any learning rate tried")
    figures["load_average_end"] = load_average()
    emit(figures)


if __name__ == "__main__":
    main()
