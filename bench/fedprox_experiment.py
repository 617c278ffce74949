"""The FedProx experiment: mu in {0, 0.01, 0.1} on non-IID MNIST with half the devices doing fewer epochs.

Setup (the programmability issue; results in ``docs/fedprox-experiment.md``): the McMahan 2NN on
MNIST, McMahan's pathological non-IID split (``shards``: each device holds 2 shards of the
label-sorted training set, so 2 digits or barely more), ``--devices`` in-process devices over
the embedded amqtt broker (``unus_edge.simulation.simulate``), C = ``--fraction`` of them per
round. *Systems heterogeneity* as in Li et al.: a seeded, fixed half of the devices
(``--slow-fraction``) do only ``--slow-epochs`` local epochs when selected, the others
``--epochs``. Every run uses the same seeds, partition, selection sequence and slow devices; only
mu changes, and mu = 0 is FedAvg (bit for bit: ``tests/unit/test_fedprox.py``).

Reported per mu: the test accuracy after every round (the full 10,000-image test set unless
``--eval-examples``), the accuracy at a few rounds, the mean and minimum over the last rounds
(non-IID FedAvg oscillates: the minimum shows how far it falls back), rounds to 90% and 95%,
and the mean absolute change of the accuracy from one round to the next over the second half of
the rounds (the oscillation).

The heterogeneity is :class:`HeterogeneousFedProx` below, a bench-only subclass: how much work
a device can do is a property of the device, not of FedProx, so it is not a library option (see
``unus_edge/strategies/_fedprox.py``). It loads like any strategy file, so a single run can be
reproduced from the command line too::

    unus-edge simulate --strategy bench/fedprox_experiment.py:HeterogeneousFedProx --scheme shards \\
        --devices 20 -C 0.5 -E 5 --lr 0.05 --rounds 30 --set strategy.mu=0.01

    python bench/fedprox_experiment.py [--quick] [--json] [--mus 0 0.01 0.1] [--plot PNG] [--results JSON]
    python bench/fedprox_experiment.py --from-results JSON [--plot PNG]     # tables and plot again, no training
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from unus_edge.strategies import Assignment, DeviceInfo, RoundContext
from unus_edge.strategies._fedprox import FedProx

THRESHOLDS = (0.90, 0.95)
SNAPSHOT_ROUNDS = (5, 10, 20, 30, 40, 50)


class HeterogeneousFedProx(FedProx):
    """FedProx (mu = 0: FedAvg) where a seeded, fixed ``slow_fraction`` of the devices do ``slow_epochs``.

    The slow devices are chosen once, among the devices of the first round (all of them in the
    experiment, C = 1 or not: ``configure_round`` sees every online device), by a keyed hash of
    their ids, like hardware that stays slow. Selection itself is FedProx's (FedAvg's), with the
    same RNG, so every mu sees the same devices in the same rounds.
    """

    name: ClassVar[str] = "fedprox_heterogeneous"

    def __init__(self, mu: float = 0.01, server_learning_rate: float = 1.0, slow_fraction: float = 0.5,
                 slow_epochs: int = 1, seed: int = 0) -> None:
        super().__init__(mu=mu, server_learning_rate=server_learning_rate)
        self.slow_fraction = float(slow_fraction)
        self.slow_epochs = int(slow_epochs)
        self.seed = int(seed)
        self.slow: set[str] | None = None

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        if self.slow is None:
            self.slow = _common().seeded_subset([d.device_id for d in devices], self.slow_fraction, self.seed, 0x510E)
        return [
            Assignment(a.device_id, min(a.epochs, self.slow_epochs) if a.device_id in self.slow else a.epochs,
                       a.batch_size, a.learning_rate, a.config)
            for a in super().configure_round(context, devices)
        ]


# ----------------------------------------------------------------------------- the experiment


def _common() -> ModuleType:
    """bench/_common.py, imported late so that this file also loads as a strategy file."""
    folder = str(Path(__file__).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import _common

    return _common


def run_one(args: argparse.Namespace, mu: float, dataset: str, data_dir: str) -> dict[str, Any]:
    from unus_edge.config import load_job_config
    from unus_edge.messages import RoundMetrics
    from unus_edge.simulation import SimulationOptions, simulate

    overrides = [
        "job.name=fedprox", f"job.seed={args.seed}", f"job.fraction={args.fraction}", f"job.rounds={args.rounds}",
        "job.round_deadline=600", "job.wait_for_devices=600", "model.source=mnist_2nn", "model.seed=0",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.learning_rate={args.lr}",
        f"evaluation.dataset={dataset}", f"evaluation.num_examples={args.eval_examples}",
        f"strategy.name={Path(__file__).resolve()}:HeterogeneousFedProx", f"strategy.mu={mu}",
        f"strategy.slow_fraction={args.slow_fraction}", f"strategy.slow_epochs={args.slow_epochs}",
        f"strategy.seed={args.seed}",
    ]
    if data_dir:
        overrides.append(f"evaluation.data_dir={data_dir}")
    config = load_job_config(environ={}, overrides=overrides)
    options = SimulationOptions(config=config, num_devices=args.devices, dataset=dataset,  # type: ignore[arg-type]
                                data_dir=data_dir, scheme="shards", train_examples=args.train_examples)
    rounds: list[RoundMetrics] = []
    started = time.perf_counter()

    async def main() -> Any:
        async with asyncio.timeout(3600):
            return await simulate(options, on_round=rounds.append)

    report = asyncio.run(main())
    return {"mu": mu, "state": report.result.state, "seconds": time.perf_counter() - started,
            "accuracy": [m.eval_accuracy for m in rounds], "test_loss": [m.eval_loss for m in rounds],
            "train_loss": [m.train_loss for m in rounds], "updates": [m.num_updates for m in rounds]}


def summarise(run: dict[str, Any], last: int) -> dict[str, Any]:
    accuracy = [a for a in run["accuracy"] if a is not None]
    tail = accuracy[-last:]
    row: dict[str, Any] = {"mu": run["mu"], "final": accuracy[-1], f"mean_last_{last}": float(np.mean(tail)),
                           f"min_last_{last}": float(np.min(tail)), "best": float(np.max(accuracy))}
    for threshold in THRESHOLDS:
        row[f"rounds_to_{round(threshold * 100)}"] = next((i + 1 for i, a in enumerate(accuracy) if a >= threshold),
                                                          None)
    # Oscillation over the second half: how much the accuracy jumps from one round to the next.
    second_half = accuracy[len(accuracy) // 2:]
    row["mean_abs_change_second_half"] = float(np.mean(np.abs(np.diff(second_half)))) if len(second_half) > 1 else None
    row["at_round"] = {r: accuracy[r - 1] for r in SNAPSHOT_ROUNDS if r <= len(accuracy)}
    return row


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    plt = _common().pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for run, colour in zip(runs, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        label = "mu = 0 (FedAvg)" if run["mu"] == 0 else f"mu = {run['mu']:g}"
        rounds = range(1, len(run["accuracy"]) + 1)
        left.plot(rounds, run["accuracy"], marker=".", color=colour, label=label,
                  linestyle="--" if run["mu"] == 0 else "-")
        right.plot(rounds, run["test_loss"], marker=".", color=colour, label=label,
                   linestyle="--" if run["mu"] == 0 else "-")
    left.set(xlabel="round", ylabel="test accuracy", title="test accuracy against round")
    right.set(xlabel="round", ylabel="test loss (cross-entropy)", title="test loss against round")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return _common().save_figure(plt, figure, path, title)


def report(common: ModuleType, runs: list[dict[str, Any]], settings: str, rounds: int,
           plot_path: Path | None) -> list[dict[str, Any]]:
    """The per-round table, the summary table and the plot."""
    common.say("\n| round | " + " | ".join(f"mu = {run['mu']:g}" for run in runs) + " |")
    common.say("|---" * (len(runs) + 1) + "|")
    for index in range(rounds):
        common.say(f"| {index + 1} | " + " | ".join(f"{run['accuracy'][index]:.4f}" for run in runs) + " |")
    last = min(5, rounds)
    rows = [summarise(run, last) for run in runs]
    snapshots = [r for r in SNAPSHOT_ROUNDS if r <= rounds]
    common.say(f"\n| mu | {' | '.join(f'round {r}' for r in snapshots)} | mean last {last} | min last {last} | "
               "best | rounds to 90% | mean abs change, 2nd half |")
    common.say("|---" * (len(snapshots) + 6) + "|")
    for row in rows:
        cells = [f"{row['at_round'][r]:.4f}" for r in snapshots]
        common.say(f"| {row['mu']:g} | {' | '.join(cells)} | {row[f'mean_last_{last}']:.4f} | "
                   f"{row[f'min_last_{last}']:.4f} | {row['best']:.4f} | {row['rounds_to_90'] or '-'} | "
                   f"{row['mean_abs_change_second_half']:.4f} |")
    if plot_path:
        written = plot(runs, plot_path, settings)
        if written:
            common.say(f"plot: {written}")
    return rows


def main() -> None:
    common = _common()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(parser)
    common.add_blas_flag(parser)
    parser.add_argument("--mus", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5, help="C (default 0.5)")
    parser.add_argument("--rounds", type=int, help="default 30 (quick 8)")
    parser.add_argument("--epochs", type=int, default=5, help="E of the other devices (default 5)")
    parser.add_argument("--slow-fraction", type=float, default=0.5)
    parser.add_argument("--slow-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, help="first N training examples (default all; quick 12000)")
    parser.add_argument("--eval-examples", type=int, help="first N test examples (default all; quick 2000)")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--from-results", type=Path, metavar="JSON",
                        help="do not train: print the table and draw the plot of an earlier --results file")
    args = parser.parse_args()
    if args.from_results:
        earlier = json.loads(args.from_results.read_text())
        report(common, earlier["runs"], earlier["settings"], earlier["args"]["rounds"], args.plot)
        return
    common.ensure_blas_threads(args.blas_threads)
    common.setup_output(args)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    args.rounds = args.rounds or (8 if args.quick else 30)
    args.train_examples = args.train_examples if args.train_examples is not None else (12000 if args.quick else 0)
    args.eval_examples = args.eval_examples if args.eval_examples is not None else (2000 if args.quick else 0)
    dataset, data_dir = common.resolve_dataset(args)
    slow = sorted(common.seeded_subset([f"device-{i:03d}" for i in range(args.devices)], args.slow_fraction,
                                       args.seed, 0x510E))
    settings = (f"2NN, {dataset} shards (2 per device), {args.devices} devices, C={args.fraction}, "
                f"E={args.epochs} ({args.slow_fraction:.0%} of devices: E={args.slow_epochs}), B={args.batch_size}, "
                f"lr={args.lr}, {args.rounds} rounds, seed {args.seed}"
                + (f", first {args.train_examples} training examples" if args.train_examples else "")
                + (f", first {args.eval_examples} test examples" if args.eval_examples else ""))
    common.say(f"{settings}\nslow devices: {', '.join(slow)}\nload average {common.load_average():.2f}")
    runs = []
    started = time.perf_counter()
    for mu in args.mus:
        run = run_one(args, mu, dataset, data_dir)
        runs.append(run)
        common.say(f"... mu={mu:<5g} {run['state']:8} {run['seconds']:6.0f} s  accuracy by round: "
                   + " ".join(f"{a:.3f}" for a in run["accuracy"]))
    rows = report(common, runs, settings, args.rounds, args.plot)
    total = time.perf_counter() - started
    common.say(f"experiment wall time {total:.0f} s; load average {common.load_average():.2f}")
    results = {"machine": common.machine(), "settings": settings, "slow_devices": slow, "args": vars(args) | {
        "plot": str(args.plot), "results": str(args.results), "from_results": None}, "runs": runs, "summary": rows,
        "seconds": total}
    common.finish(results, args.results)


if __name__ == "__main__":
    main()
