"""The robust-aggregation experiment: FedAvg vs median, trimmed mean and norm clipping under attack.

Setup (the programmability issue; results in ``docs/robust-experiment.md``): the 2NN on MNIST,
IID, ``--devices`` (20) in-process devices over the embedded amqtt broker, every device every
round (C = 1), E = 1. A seeded, fixed ``--attacker-fraction`` (20%: 4 of 20) of the devices are
attackers, in every round. Attacks, on the update the attacker uploads:

* ``scaled``: it trains honestly and uploads ``--attack-scale`` (-10) times its delta;
* ``random``: it uploads Gaussian noise, ``N(0, --noise-std^2)`` per parameter, in place of its delta;
* ``none``: the same devices behave (the baseline).

Defences (server side, ``unus_edge.strategies._robust``): ``fedavg`` (the n_k-weighted mean),
``median`` (coordinate-wise), ``trimmed_mean`` (beta = ``--trim-fraction``, 0.2: as many as
the attackers at each end), ``clip`` (every update clipped to L2 norm ``--clip-norm``, then
FedAvg's weighted mean). Attackers report their true number of examples.

A run whose global model comes to hold a NaN or an infinity, or whose test loss does (logits
that overflow: FedAvg under the scaled attack), is stopped at the end of that round and reported
as diverged: the devices' updates from such a model are non-finite, every one is refused, and
its accuracy is about that of predicting one class.

Reported: test accuracy (the full test set unless ``--eval-examples``) after every round for
each attack x defence, the final accuracy and the mean of the last rounds, and the L2 norms of
the honest and malicious updates (median per round), which is what ``--clip-norm`` is chosen
against.

Attack code stays out of the library: :class:`AttackClient` is a bench-only device half
(``register_client_strategy``; the devices are in this process) and :class:`AttackedFedAvg` a
bench-only server strategy that hands it to the attackers through ``config["client"]``.

    python bench/robust_experiment.py [--quick] [--json] [--attacks none scaled random]
                                      [--defences fedavg median trimmed_mean clip] [--plot PNG] [--results JSON]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from unus_edge.codec import Tensor
from unus_edge.strategies import (
    Assignment,
    ClientStrategy,
    ClientUpdate,
    DeviceInfo,
    Params,
    RoundContext,
    register_client_strategy,
)
from unus_edge.strategies._robust import RobustFedAvg, update_norm

ATTACKS = ("none", "scaled", "random")
DEFENCES = ("fedavg", "median", "trimmed_mean", "clip")
NORMS: dict[str, list[tuple[int, str, float]]] = {}
"""Per run label: ``(round, device, L2 norm)`` of every update the aggregator received."""
DIVERGED: dict[str, int] = {}
"""Per run label: the first round after which the global model, or its test loss, held a NaN or an infinity."""


@register_client_strategy
class AttackClient(ClientStrategy):
    """A malicious device half: trains like everybody, then uploads a scaled delta or noise."""

    name: ClassVar[str] = "bench_attacker"

    def upload(self, start: Params, trained: Params, rng: np.random.Generator) -> Mapping[str, Tensor]:
        honest = {name: trained[name] - start[name] for name in start}
        attack = self.config.get("attack")
        if attack == "scaled":
            scale = np.float32(float(self.config.get("attack_scale", -10.0)))
            return {name: value * scale for name, value in honest.items()}
        if attack == "random":
            std = float(self.config.get("noise_std", 1.0))
            return {name: rng.normal(0.0, std, value.shape).astype(value.dtype) for name, value in honest.items()}
        return honest


class _NormTap:
    """Records the norm of every update, then passes it on (bench instrumentation, not checkpointable)."""

    def __init__(self, inner: Any, server_round: int, sink: list[tuple[int, str, float]]) -> None:
        self.inner, self.server_round, self.sink = inner, server_round, sink
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        self.sink.append((self.server_round, update.device_id, update_norm(update.delta)))
        self.inner.add(update)
        self.count = int(self.inner.count)

    @property
    def num_examples(self) -> int:
        return int(getattr(self.inner, "num_examples", 0))

    @property
    def train_loss(self) -> float | None:
        return getattr(self.inner, "train_loss", None)  # type: ignore[no-any-return]


class AttackedFedAvg(RobustFedAvg):
    """RobustFedAvg whose seeded, fixed ``attacker_fraction`` of the devices run :class:`AttackClient`."""

    name: ClassVar[str] = "robust_fedavg_attacked"

    def __init__(self, robust: str = "none", trim_fraction: float = 0.1, clip_norm: float = 0.0,
                 server_learning_rate: float = 1.0, attack: str = "scaled", attacker_fraction: float = 0.2,
                 attack_scale: float = -10.0, noise_std: float = 1.0, seed: int = 0, label: str = "") -> None:
        super().__init__(robust, trim_fraction, clip_norm, server_learning_rate)
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}")
        self.attack, self.attacker_fraction, self.seed = attack, float(attacker_fraction), int(seed)
        self.attack_config = {"client": AttackClient.name, "attack": attack, "attack_scale": float(attack_scale),
                              "noise_std": float(noise_std)}
        self.attackers: set[str] | None = None
        self.label = label
        self.norms = NORMS.setdefault(label, [])

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        if self.attackers is None:
            self.attackers = _common().seeded_subset([d.device_id for d in devices], self.attacker_fraction,
                                                     self.seed, 0xBAD)
        chosen = super().configure_round(context, devices)
        if self.attack == "none":
            return chosen
        return [Assignment(a.device_id, a.epochs, a.batch_size, a.learning_rate, {**a.config, **self.attack_config})
                if a.device_id in self.attackers else a for a in chosen]

    def evaluate(self, server_round: int, params: Params, central: Any) -> Mapping[str, float]:
        """The central evaluation without its non-finite values.

        Library workaround: a diverged model (FedAvg under the scaled attack) has a NaN or infinite
        test loss, and the aggregator then fails the job while publishing it (``metrics/job`` is
        JSON, which has no NaN). Dropping the value keeps the run going; the accuracy stays.
        """
        metrics = central(params)
        finite = all(bool(np.isfinite(value).all()) for value in params.values())
        if self.label not in DIVERGED and not (finite and all(np.isfinite(v) for v in metrics.values())):
            DIVERGED[self.label] = server_round
        return {key: value for key, value in metrics.items() if np.isfinite(value)}

    def new_accumulator(self, server_round: int, global_params: Params) -> Any:
        return _NormTap(super().new_accumulator(server_round, global_params), server_round, self.norms)

    def aggregate(self, server_round: int, global_params: Params, accumulator: Any, failures: Any) -> Params | None:
        return super().aggregate(server_round, global_params, accumulator.inner, failures)


# ----------------------------------------------------------------------------- the experiment


def _common() -> ModuleType:
    folder = str(Path(__file__).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import _common

    return _common


def defence_options(args: argparse.Namespace, defence: str) -> list[str]:
    return {
        "fedavg": ["strategy.robust=none"],
        "median": ["strategy.robust=median"],
        "trimmed_mean": ["strategy.robust=trimmed_mean", f"strategy.trim_fraction={args.trim_fraction}"],
        "clip": ["strategy.robust=none", f"strategy.clip_norm={args.clip_norm}"],
    }[defence]


def run_one(args: argparse.Namespace, attack: str, defence: str, dataset: str, data_dir: str) -> dict[str, Any]:
    from unus_edge.config import load_job_config
    from unus_edge.messages import RoundMetrics
    from unus_edge.simulation import SimulationOptions, simulate

    label = f"{attack}/{defence}"
    overrides = [
        "job.name=robust", f"job.seed={args.seed}", "job.fraction=1.0", f"job.rounds={args.rounds}",
        "job.round_deadline=120", "job.wait_for_devices=600", "model.source=mnist_2nn", "model.seed=0",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.learning_rate={args.lr}",
        f"evaluation.dataset={dataset}", f"evaluation.num_examples={args.eval_examples}",
        # by module name, so that every run shares this one copy of the module (and NORMS)
        "strategy.name=robust_experiment:AttackedFedAvg", f"strategy.attack={attack}",
        f"strategy.attacker_fraction={args.attacker_fraction}", f"strategy.attack_scale={args.attack_scale}",
        f"strategy.noise_std={args.noise_std}", f"strategy.seed={args.seed}", f"strategy.label={label}",
        *defence_options(args, defence),
    ]
    if data_dir:
        overrides.append(f"evaluation.data_dir={data_dir}")
    config = load_job_config(environ={}, overrides=overrides)
    options = SimulationOptions(config=config, num_devices=args.devices, dataset=dataset,  # type: ignore[arg-type]
                                data_dir=data_dir, scheme="iid", train_examples=args.train_examples)
    rounds: list[RoundMetrics] = []
    started = time.perf_counter()
    module: Any = None

    async def main() -> Any:
        nonlocal module
        stop = asyncio.Event()

        def on_round(metrics: RoundMetrics) -> None:
            nonlocal module
            rounds.append(metrics)
            module = module or sys.modules["robust_experiment"]  # loaded by the aggregator by now
            # A model with NaN or inf, or whose logits overflow, cannot train any more: every device's
            # update is non-finite and refused, and the engine then waits out each round's deadline
            # (a refused update does not fail the device in its round). Stop: it has diverged for good.
            if label in module.DIVERGED:
                stop.set()

        async with asyncio.timeout(3600):
            return await simulate(options, on_round=on_round, shutdown_trigger=stop)

    report = asyncio.run(main())
    module = module or sys.modules["robust_experiment"]
    return {"attack": attack, "defence": defence, "state": report.result.state,
            "seconds": time.perf_counter() - started, "accuracy": [m.eval_accuracy for m in rounds],
            "test_loss": [m.eval_loss for m in rounds], "diverged_at": module.DIVERGED.get(label),
            "norms": module.NORMS.get(label, [])}


def norm_summary(runs: list[dict[str, Any]], attackers: set[str]) -> dict[str, Any]:
    """Median honest and malicious update norms per round, over the runs of each attack."""
    found: dict[str, Any] = {}
    for attack in ATTACKS:
        honest: dict[int, list[float]] = {}
        evil: dict[int, list[float]] = {}
        for run in (r for r in runs if r["attack"] == attack):
            for server_round, device, norm in run["norms"]:
                into = evil if attack != "none" and device in attackers else honest
                into.setdefault(int(server_round), []).append(float(norm))
        if honest:
            found[attack] = {
                "honest_median_by_round": {r: float(np.median(v)) for r, v in sorted(honest.items())},
                "malicious_median_by_round": {r: float(np.median(v)) for r, v in sorted(evil.items())},
            }
    return found


def plot(runs: list[dict[str, Any]], attacks: list[str], path: Path, title: str) -> Path | None:
    plt = _common().pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(1, len(attacks), figsize=(5 * len(attacks), 4.4), squeeze=False)
    styles = {"fedavg": ("black", "--"), "median": ("tab:blue", "-"), "trimmed_mean": ("tab:orange", "-"),
              "clip": ("tab:green", "-")}
    for axis, attack in zip(axes[0], attacks, strict=True):
        for run in (r for r in runs if r["attack"] == attack):
            colour, line = styles.get(run["defence"], ("grey", ":"))
            accuracy = [a if a is not None else float("nan") for a in run["accuracy"]]
            label = run["defence"] + (f" (diverged, round {run['diverged_at']})" if run.get("diverged_at") else "")
            axis.plot(range(1, len(accuracy) + 1), accuracy, marker=".", color=colour, linestyle=line, label=label)
            if run.get("diverged_at"):
                axis.plot([len(accuracy)], [accuracy[-1]], marker="x", markersize=10, color=colour)
        axis.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=f"attack: {attack}")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    return _common().save_figure(plt, figure, path, title)


def main() -> None:
    common = _common()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(parser)
    common.add_blas_flag(parser)
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", choices=DEFENCES, default=list(DEFENCES))
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--attacker-fraction", type=float, default=0.2)
    parser.add_argument("--attack-scale", type=float, default=-10.0)
    parser.add_argument("--noise-std", type=float, default=1.0)
    parser.add_argument("--trim-fraction", type=float, default=0.2)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, help="default 20 (quick 5)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, help="first N training examples (default 20000; quick 6000)")
    parser.add_argument("--eval-examples", type=int, help="first N test examples (default all; quick 2000)")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    common.ensure_blas_threads(args.blas_threads)
    common.setup_output(args)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    args.rounds = args.rounds or (5 if args.quick else 20)
    args.train_examples = args.train_examples if args.train_examples is not None else (6000 if args.quick else 20000)
    args.eval_examples = args.eval_examples if args.eval_examples is not None else (2000 if args.quick else 0)
    dataset, data_dir = common.resolve_dataset(args)
    attackers = common.seeded_subset([f"device-{i:03d}" for i in range(args.devices)], args.attacker_fraction,
                                     args.seed, 0xBAD)
    settings = (f"2NN, {dataset} IID, {args.devices} devices (attackers: {', '.join(sorted(attackers))}), C=1, "
                f"E={args.epochs}, B={args.batch_size}, lr={args.lr}, {args.rounds} rounds, seed {args.seed}, "
                f"{args.train_examples or 'all'} training examples; scaled x{args.attack_scale:g}, random "
                f"N(0, {args.noise_std:g}^2); trimmed beta={args.trim_fraction}, clip C={args.clip_norm}")
    common.say(f"{settings}\nload average {common.load_average():.2f}")
    runs = []
    started = time.perf_counter()
    for attack in args.attacks:
        for defence in args.defences:
            run = run_one(args, attack, defence, dataset, data_dir)
            runs.append(run)
            common.say(f"... {attack:7} {defence:13} {run['state']:8} {run['seconds']:5.0f} s  "
                       + " ".join(f"{a:.3f}" for a in run["accuracy"])
                       + (f"  DIVERGED after round {run['diverged_at']}" if run["diverged_at"] else ""))
    last = min(5, args.rounds)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        accuracy = [a if a is not None else float("nan") for a in run["accuracy"]]
        table.setdefault(run["attack"], {})[run["defence"]] = {"final": accuracy[-1],
                                                               "mean_last": float(np.mean(accuracy[-last:])),
                                                               "diverged_at": run["diverged_at"]}
    common.say(f"\nfinal test accuracy after {args.rounds} rounds (mean of the last {last} rounds)\n")
    common.say("| attack | " + " | ".join(args.defences) + " |")
    common.say("|---" * (len(args.defences) + 1) + "|")
    for attack in args.attacks:
        cells = [f"diverged at round {table[attack][d]['diverged_at']} ({table[attack][d]['final']:.4f})"
                 if table[attack][d]["diverged_at"] else
                 f"{table[attack][d]['final']:.4f} ({table[attack][d]['mean_last']:.4f})" for d in args.defences]
        common.say(f"| {attack} | " + " | ".join(cells) + " |")
    norms = norm_summary(runs, attackers)
    for attack, summary in norms.items():
        honest = summary["honest_median_by_round"]
        evil = summary["malicious_median_by_round"]
        common.say(f"update norms, attack {attack}: honest median by round "
                   + " ".join(f"{v:.2f}" for v in honest.values())
                   + ("; malicious " + " ".join(f"{v:.1f}" for v in evil.values()) if evil else ""))
    total = time.perf_counter() - started
    common.say(f"experiment wall time {total:.0f} s; load average {common.load_average():.2f}")
    results = {"machine": common.machine(), "settings": settings, "attackers": sorted(attackers),
               "args": vars(args) | {"plot": str(args.plot), "results": str(args.results)},
               "runs": [{k: v for k, v in run.items() if k != "norms"} for run in runs], "table": table,
               "norms": norms, "seconds": total}
    if args.plot:
        written = plot(runs, args.attacks, args.plot, settings)
        if written:
            common.say(f"plot: {written}")
    common.finish(results, args.results)


if __name__ == "__main__":
    main()
