"""Distributed Selective SGD on MNIST: accuracy and upload bytes against theta_u (``docs/dssgd.md``).

Setup (Shokri & Shmatikov, CCS 2015, section 5, scaled to this machine): 30 participants, each
with 600 MNIST training examples (1% of the training set: an IID cut of the first 18 000
examples, the very ``load_dataset`` and ``partition`` calls ``simulate`` makes); the 2NN
(784-200-200-10, 199 210 parameters); one local epoch per exchange (B = 10, learning rate 0.05,
no momentum); one participant per exchange in round-robin order; ``--passes`` exchanges per
participant (30 x passes in all). DSSGD for every theta_u in {1, 0.1, 0.01, 0.001} and theta_d
in {0.1, 1}, largest-magnitude selection, no clipping (gamma = inf), no differential privacy.

How the DSSGD runs are made: an in-process loop over the library's own code, with no messaging:
``DSSGD.configure_round`` / ``new_accumulator`` / ``aggregate`` / ``model_payload`` on the
server side; the device's ``client_strategy``, ``starting_point`` and ``train_task`` (which
calls ``DSSGDClient.upload``) with the device's task config and seed
(``device_seed(job.seed, round, device_id)``); every participant's view of the global model
merged from the model messages exactly as ``Device._apply_model`` does. The loop is checked
against real runs: ``--verify`` configurations run their first exchanges through
``unus_edge.simulation.simulate`` (aggregator and 30 devices over the embedded amqtt broker) and
the global parameters must be bit-identical (``tests/integration/test_dssgd_run.py`` checks
the same on a small job). The loop is used because a real run broadcasts every model message to
all 30 devices through a pure-Python broker, which makes 4 800 exchanges slow on a shared
machine; it changes no arithmetic.

Figures:

* global accuracy: the server's model on the 10 000 MNIST test examples (every 10 exchanges and
  at the end); participants' accuracy: each participant's own model at the end (its local
  model overwritten by the final download, what it would train from next; the paper's
  participants use their local models), mean, min and max over the 30;
* bytes per exchange: ``len(encode_message(Update(...)))`` of every upload, with the fields a
  device sends, and ``len(encode_message(GlobalModel(...)))`` of every download;
* upload inside the download: the share of the uploaded entries that the participant had just
  downloaded (the others were computed from its own, older, values);
* baselines with the same engine, B, learning rate and number of epochs as a participant:
  standalone (each participant alone on its 600 examples; mean, min and max over the 30) and
  centralised (one model on the 18 000 pooled examples).

    python bench/dssgd_experiment.py [--quick] [--json] [--passes N] [--theta-u ...] [--theta-d ...]
                                     [--verify EXCHANGES] [--plot PNG] [--results JSON]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    add_blas_flag,
    add_common_flags,
    blas_threads,
    ensure_blas_threads,
    finish,
    load_average,
    machine,
    pyplot,
    resolve_dataset,
    save_figure,
    say,
    setup_output,
)

STRATEGY = "unus_edge.strategies._dssgd:DSSGD"
THETA_U = [1.0, 0.1, 0.01, 0.001]
JOB = "dssgd-experiment"
EVALUATE_EVERY = 10


@dataclass
class Outcome:
    theta_d: float
    theta_u: float
    accuracy: float
    participants: list[float]
    exchanges: int
    upload_bytes: float
    download_bytes: float
    inside_download: float
    seconds: float
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(local epochs per participant, global test accuracy)."""
    params: dict[str, Any] = field(default_factory=dict)


class Experiment:
    """The data, the model and the evaluation shared by every run."""

    def __init__(self, args: argparse.Namespace, dataset: str, data_dir: str) -> None:
        from unus_edge.data import Dataset, load_dataset, partition
        from unus_edge.nn import Graph
        from unus_edge.onnx_io import Evaluator, fingerprint
        from unus_edge.zoo import resolve_model

        self.args, self.dataset, self.data_dir = args, dataset, data_dir
        self.model = resolve_model("mnist_2nn")
        self.graph = Graph(self.model)
        self.fingerprint = fingerprint(self.model)
        self.evaluator = Evaluator(self.model)
        train = load_dataset(dataset, "train", data_dir=data_dir or None, seed=args.seed,
                             num_examples=args.participants * args.examples)
        self.train = train
        self.shards = [Dataset(train.x[i], train.y[i], train.num_classes)
                       for i in partition(train.y, args.participants, "iid", seed=args.seed)]
        self.test = load_dataset(dataset, "test", data_dir=data_dir or None, seed=args.seed)
        self.ids = [f"device-{index:03d}" for index in range(args.participants)]

    def accuracy(self, params: dict[str, Any]) -> float:
        return float(self.evaluator.evaluate(params, self.test.x, self.test.y, batch_size=1000).accuracy)

    def options(self, theta_d: float, theta_u: float) -> dict[str, Any]:
        return {"theta_d": theta_d, "theta_u": theta_u, "selection": "largest", "order": "round-robin"}

    # ------------------------------------------------------------------ the in-process loop

    def dssgd(self, theta_d: float, theta_u: float, exchanges: int, *, evaluate: bool = True) -> Outcome:
        import numpy as np

        from unus_edge.codec import SparseTensor
        from unus_edge.device._training import train_task
        from unus_edge.messages import GlobalModel, Task, Update, encode_message
        from unus_edge.onnx_io import read_parameters
        from unus_edge.seeds import device_seed
        from unus_edge.strategies import (
            ClientStrategy,
            ClientUpdate,
            DeviceInfo,
            RoundContext,
            client_strategy,
            load_strategy,
        )
        from unus_edge.topics import Channel

        args = self.args
        started = time.perf_counter()
        strategy = load_strategy(STRATEGY, self.options(theta_d, theta_u))
        params = read_parameters(self.model)
        view = {name: value.copy() for name, value in params.items()}
        devices = [DeviceInfo(device_id, len(shard)) for device_id, shard in zip(self.ids, self.shards, strict=True)]
        clients: dict[str, ClientStrategy] = {}
        rng = np.random.default_rng(args.seed)
        stop = threading.Event()
        session = "0" * 16
        version = 0
        upload_sizes: list[int] = []
        download_sizes: list[int] = []
        inside: list[float] = []
        curve: list[tuple[float, float]] = []

        def publish(server_round: int) -> tuple[dict[str, Any], Any]:
            payload = dict(strategy.model_payload(params))
            for name, tensor in payload.items():  # Device._apply_model
                if isinstance(tensor, SparseTensor):
                    view[name].reshape(-1)[tensor.indices] = tensor.values
                else:
                    view[name] = np.array(tensor)
            message = GlobalModel(version, server_round, self.fingerprint, session, payload)
            download_sizes.append(len(encode_message(message, JOB, Channel.MODEL)))
            masks = []
            for tensor in payload.values():
                mask = np.ones(tensor.size, bool)
                if isinstance(tensor, SparseTensor):
                    mask[:] = False
                    mask[tensor.indices] = True
                masks.append(mask)
            return payload, np.concatenate(masks)

        payload, downloaded = publish(0)
        for server_round in range(1, exchanges + 1):
            context = RoundContext(server_round, 1.0, 1, args.batch_size, args.learning_rate, rng)
            (assignment,) = strategy.configure_round(context, devices)
            device_id = assignment.device_id
            shard = self.shards[self.ids.index(device_id)]
            config = {**assignment.config, "seed": device_seed(args.seed, server_round, device_id),
                      "momentum": 0.0, "weight_decay": 0.0}
            task = Task(device_id, f"r{server_round}.0.{device_id}", server_round, version, assignment.epochs,
                        assignment.batch_size, assignment.learning_rate, deadline_seconds=300.0, config=config)
            client = clients[device_id] = client_strategy(config, clients.get(device_id))
            start = client.starting_point(view, payload)
            result = train_task(self.graph, start, shard, task, stop, client)
            update = Update(device_id, session, task.task_id, server_round, version, result.num_examples,
                            result.train_loss, result.delta, "delta", 0, result.train_seconds, {"steps": result.steps})
            upload_sizes.append(len(encode_message(update, JOB, Channel.UPDATE)))
            uploaded = np.concatenate([np.asarray(t.to_dense() if isinstance(t, SparseTensor) else t).reshape(-1) != 0
                                       for t in result.delta.values()])
            inside.append(float(np.count_nonzero(uploaded & downloaded)) / max(1, int(np.count_nonzero(uploaded))))
            accumulator = strategy.new_accumulator(server_round, params)
            accumulator.add(ClientUpdate(device_id, result.num_examples, result.delta, version, result.train_loss))
            new = strategy.aggregate(server_round, params, accumulator, [])
            assert new is not None
            params, version = new, version + 1
            payload, downloaded = publish(server_round)
            if evaluate and (server_round % EVALUATE_EVERY == 0 or server_round in (1, exchanges)):
                curve.append((server_round / args.participants, self.accuracy(params)))
        participants = []
        if evaluate:  # each participant's model: its local model overwritten by the final download
            participants = [self.accuracy(clients[i].starting_point(view, payload)) for i in self.ids if i in clients]
        return Outcome(theta_d, theta_u, curve[-1][1] if curve else float("nan"), participants, exchanges,
                       sum(upload_sizes) / len(upload_sizes), sum(download_sizes[1:]) / max(1, len(download_sizes) - 1),
                       sum(inside) / len(inside), time.perf_counter() - started, curve, params)

    # ------------------------------------------------------------------ the real thing, for the check

    def simulate(self, theta_d: float, theta_u: float, exchanges: int) -> tuple[dict[str, Any], float, float | None]:
        """``exchanges`` rounds through ``simulate``: (global parameters, bytes up per exchange, accuracy)."""
        import unus_edge.strategies._dssgd  # noqa: F401  (registers the "dssgd" device half for the devices)
        from unus_edge.config import load_job_config
        from unus_edge.simulation import SimulationOptions, simulate

        args = self.args
        overrides = [f"job.name={JOB}", f"job.rounds={exchanges}", f"job.seed={args.seed}", "job.round_deadline=300",
                     "job.wait_for_devices=300", f"strategy.name={STRATEGY}", "train.epochs=1",
                     f"train.batch_size={args.batch_size}", f"train.learning_rate={args.learning_rate}",
                     "model.source=mnist_2nn", f"evaluation.dataset={self.dataset}", "broker.url=mqtt://127.0.0.1:1"]
        overrides += [f"strategy.{key}={value}" for key, value in self.options(theta_d, theta_u).items()]
        if self.data_dir:
            overrides.append(f"evaluation.data_dir={self.data_dir}")
        config = load_job_config(environ={}, overrides=overrides)
        options = SimulationOptions(config=config, num_devices=args.participants, dataset=self.dataset,  # type: ignore[arg-type]
                                    data_dir=self.data_dir, train_examples=args.participants * args.examples)
        result = asyncio.run(simulate(options)).result
        if result.state != "finished" or result.rejected or any(m.num_updates != 1 for m in result.history):
            raise RuntimeError(f"simulate: {result.state} {result.reason} rejected={result.rejected}")
        return result.params, result.bytes_up / len(result.history), result.final_accuracy

    # ------------------------------------------------------------------ baselines

    def baselines(self) -> dict[str, Any]:
        """Standalone (each participant alone) and centralised (pooled) training, evaluated every epoch."""
        import numpy as np

        from unus_edge.nn import TrainConfig, train
        from unus_edge.onnx_io import read_parameters
        from unus_edge.seeds import device_seed

        args = self.args

        def epochs(x: Any, y: Any, name: str) -> list[float]:
            params = read_parameters(self.model)
            curve = []
            for epoch in range(1, args.passes + 1):
                settings = TrainConfig(1, args.batch_size, args.learning_rate, seed=device_seed(args.seed, epoch, name))
                params = train(self.graph, params, x, y, settings).params
                curve.append(self.accuracy(params))
            return curve

        started = time.perf_counter()
        standalone = np.array([epochs(shard.x, shard.y, device_id) for device_id, shard in zip(self.ids, self.shards,
                                                                                              strict=True)])
        centralised = epochs(self.train.x, self.train.y, "centralised")
        return {"standalone_curve": standalone.mean(axis=0).tolist(), "standalone_final": standalone[:, -1].tolist(),
                "centralised_curve": centralised, "seconds": time.perf_counter() - started}


def plot(outcomes: list[Outcome], base: dict[str, Any], passes: int, path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.4))
    values = sorted({o.theta_u for o in outcomes}, reverse=True)
    colours = {u: plt.get_cmap("viridis")(i / max(1, len(values) - 1) * 0.85) for i, u in enumerate(values)}
    for outcome in outcomes:
        left.plot([p for p, _ in outcome.curve], [a for _, a in outcome.curve], "-" if outcome.theta_d < 1 else "--",
                  color=colours[outcome.theta_u], linewidth=1.3,
                  label=f"DSSGD θu={outcome.theta_u:g} θd={outcome.theta_d:g}")
    epochs = list(range(1, passes + 1))
    left.plot(epochs, base["centralised_curve"], "k-s", markersize=3, linewidth=2, label="centralised (pooled)")
    left.plot(epochs, base["standalone_curve"], "r-o", markersize=3, linewidth=2, label="standalone (mean of 30)")
    left.set(xlabel="local epochs per participant (exchanges / 30)", ylabel="test accuracy", ylim=(0.80, 0.985),
             title="global model (server)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="lower right", ncol=2)
    for theta_d, marker, colour in ((0.1, "o", "tab:blue"), (1.0, "s", "tab:orange")):
        kept = sorted((o for o in outcomes if o.theta_d == theta_d), key=lambda o: o.upload_bytes)
        if not kept:
            continue
        right.plot([o.upload_bytes for o in kept], [o.accuracy for o in kept], marker=marker, color=colour,
                   label=f"θd={theta_d:g}: global model")
        if theta_d < 1:
            right.plot([o.upload_bytes for o in kept], [sum(o.participants) / len(o.participants) for o in kept],
                       marker=marker, color=colour, linestyle=":", label=f"θd={theta_d:g}: participants (mean)")
        for o in kept:
            right.annotate(f"θu={o.theta_u:g}", (o.upload_bytes, o.accuracy), fontsize=7, textcoords="offset points",
                           xytext=(4, -10))
    right.axhline(base["centralised_curve"][-1], color="black", linewidth=1, linestyle="--", label="centralised")
    right.axhline(sum(base["standalone_final"]) / len(base["standalone_final"]), color="red", linewidth=1,
                  linestyle="--", label="standalone (mean)")
    right.set(xscale="log", xlabel="bytes uploaded per exchange (encoded update message)",
              ylabel=f"test accuracy after {passes} epochs", title="accuracy against upload size")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8, loc="upper left")
    return save_figure(plt, figure, path, title)


def verify(experiment: Experiment, specs: list[tuple[float, float]], exchanges: int) -> list[dict[str, Any]]:
    """The loop against ``simulate`` over the same exchanges: the global models must be identical."""
    import numpy as np

    checks = []
    for theta_d, theta_u in specs:
        real, real_bytes, real_accuracy = experiment.simulate(theta_d, theta_u, exchanges)
        looped = experiment.dssgd(theta_d, theta_u, exchanges, evaluate=False)
        identical = all(np.array_equal(real[name], looped.params[name]) for name in real)
        worst = max(float(np.max(np.abs(real[name] - looped.params[name]))) for name in real)
        checks.append({"theta_d": theta_d, "theta_u": theta_u, "exchanges": exchanges, "identical": identical,
                       "max_abs_difference": worst, "simulate_upload_bytes": real_bytes,
                       "loop_upload_bytes": looped.upload_bytes, "simulate_accuracy": real_accuracy})
        say(f"... check θd={theta_d:g} θu={theta_u:g}: {exchanges} exchanges through simulate vs the loop: "
            f"{'bit-identical' if identical else f'DIFFERENT (max {worst:.3g})'} global models; bytes up per "
            f"exchange {real_bytes:,.1f} (broker) vs {looped.upload_bytes:,.1f} (loop)")
        if not identical:
            raise SystemExit("the in-process loop does not reproduce simulate: its figures would not stand")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    add_blas_flag(parser)
    parser.add_argument("--passes", type=int, help="local epochs per participant (default 20, quick 2)")
    parser.add_argument("--theta-u", type=float, nargs="+", default=THETA_U)
    parser.add_argument("--theta-d", type=float, nargs="+", help="default 0.1 1 (quick: 0.1)")
    parser.add_argument("--verify", type=int, help="exchanges checked against simulate (default 60, quick 30; 0: none)")
    parser.add_argument("--participants", type=int, default=30)
    parser.add_argument("--examples", type=int, default=600, help="training examples per participant")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    parser.add_argument("--results", type=Path, help="write the figures and curves here (JSON)")
    args = parser.parse_args()
    ensure_blas_threads(args.blas_threads)
    setup_output(args)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    args.passes = args.passes or (2 if args.quick else 20)
    args.theta_d = args.theta_d or ([0.1] if args.quick else [0.1, 1.0])
    args.verify = (30 if args.quick else 60) if args.verify is None else args.verify
    dataset, data_dir = resolve_dataset(args)
    settings = (f"2NN, {dataset}, {args.participants} participants x {args.examples} examples (IID), round-robin, "
                f"1 epoch per exchange, B={args.batch_size}, lr={args.learning_rate}, {args.passes} epochs per "
                f"participant ({args.participants * args.passes} exchanges), largest selection, gamma=inf, no DP, "
                f"seed {args.seed}")
    say(f"{settings}\nBLAS threads {blas_threads()}, load average {load_average():.2f}")
    started = time.perf_counter()
    experiment = Experiment(args, dataset, data_dir)
    specs = [(0.1, 0.01)] if args.quick else [(0.1, 0.1), (1.0, 0.01)]
    checks = verify(experiment, specs, args.verify) if args.verify else []
    base = experiment.baselines()
    standalone = base["standalone_final"]
    say(f"... standalone {sum(standalone) / len(standalone):.4f} (min {min(standalone):.4f}, max "
        f"{max(standalone):.4f}), centralised {base['centralised_curve'][-1]:.4f} ({base['seconds']:.0f} s)")
    outcomes = []
    for theta_d in args.theta_d:
        for theta_u in args.theta_u:
            outcome = experiment.dssgd(theta_d, theta_u, args.participants * args.passes)
            outcomes.append(outcome)
            say(f"... DSSGD θd={theta_d:g} θu={theta_u:g}: global {outcome.accuracy:.4f}, participants "
                f"{sum(outcome.participants) / len(outcome.participants):.4f}, {outcome.upload_bytes:,.0f} bytes up "
                f"per exchange ({outcome.seconds:.0f} s, load {load_average():.1f})")
    total = time.perf_counter() - started
    dense = next((o.upload_bytes for o in outcomes if o.theta_u == 1), None)
    say("\n| run | θd | θu | global model | participants: mean (min-max) | bytes up per exchange | vs dense | "
        "bytes down per exchange | upload inside download |\n|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        ratio = f"{o.upload_bytes / dense:.4f}" if dense else "-"
        mean = sum(o.participants) / len(o.participants)
        say(f"| DSSGD | {o.theta_d:g} | {o.theta_u:g} | {o.accuracy:.4f} | {mean:.4f} "
            f"({min(o.participants):.4f}-{max(o.participants):.4f}) | {o.upload_bytes:,.0f} | {ratio} | "
            f"{o.download_bytes:,.0f} | {o.inside_download:.1%} |")
    say(f"| standalone | - | - | - | {sum(standalone) / len(standalone):.4f} ({min(standalone):.4f}-"
        f"{max(standalone):.4f}) | 0 | - | 0 | - |")
    say(f"| centralised | - | - | {base['centralised_curve'][-1]:.4f} | - | - | - | - | - |")
    say(f"\nexperiment wall time {total:.0f} s; load average at the end {load_average():.2f}")
    results: dict[str, Any] = {
        "machine": machine(), "settings": settings, "dataset": dataset, "participants": args.participants,
        "examples_per_participant": args.examples, "passes": args.passes, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "seed": args.seed, "experiment_seconds": total, "checks": checks,
        "standalone": {"mean": sum(standalone) / len(standalone), "min": min(standalone), "max": max(standalone),
                       "curve": base["standalone_curve"]},
        "centralised": {"accuracy": base["centralised_curve"][-1], "curve": base["centralised_curve"]},
        "dssgd": [{"theta_d": o.theta_d, "theta_u": o.theta_u, "global_accuracy": o.accuracy,
                   "participants_mean": sum(o.participants) / len(o.participants),
                   "participants_min": min(o.participants),
                   "participants_max": max(o.participants), "exchanges": o.exchanges,
                   "upload_bytes_per_exchange": o.upload_bytes, "download_bytes_per_exchange": o.download_bytes,
                   "upload_inside_download": o.inside_download, "seconds": o.seconds, "curve": o.curve}
                  for o in outcomes],
    }
    if args.plot:
        written = plot(outcomes, base, args.passes, args.plot, settings)
        if written:
            say(f"plot: {written}")
    finish(results, args.results)


if __name__ == "__main__":
    main()
