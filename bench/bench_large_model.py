"""A 10M-parameter model's round: its overhead over compute, against bare paho moving the same bytes.

The job (issue 11): FedAvg, an MLP 784-2800-2800-10 (10,099,210 parameters, 40.4 MB as float32),
10 devices with 250 MNIST examples each, E = 1, B = 50 (5 local steps), lr 0.05, no central
evaluation, through :func:`unus_edge.simulation.simulate` with ``--processes`` and with in-process
devices, over Mosquitto and over the embedded amqtt (each a separate broker process here).

Per round (median of the rounds after the first):

* **round**: ``RoundMetrics.duration_seconds``, what a user waits for;
* **compute floor**: the round's 10 local trainings by the hand-written NumPy reference
  (``bench/_reference.py``, the same shards, seeds and batches), each timed alone in this
  process, with the federation's parallelism: ``max(longest, sum / cores)``;
* **overhead** = round - compute floor;
* **transport floor**: the same round's messages moved by bare paho clients through the same
  broker in the same run, with no framework around them: one process publishes a 40.4 MB model
  (QoS 1, retained) to 10 subscriber processes, each of which answers with a 40.4 MB message
  (QoS 1) on its own topic; the time from the publish to the 10th answer received (median of
  the rounds before and after the federation's, which share the broker process);
* **overhead / transport floor**: goal <= 1.5x over Mosquitto.

Where the overhead goes, from the same run: the timeline of each round as the aggregator sees
it (each update's arrival after the round started, minus that device's reported training time;
the time from the last arrival to the round's end: FedAvg, commit, publication of the next
model), the aggregator's own per-update work (``on_update``: the checks and the accumulation,
tapped), and the codec's encode and decode of one update of this size, timed here.

    python bench/bench_large_model.py [--quick] [--json] [--modes ...] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import statistics
import tempfile
import threading
import time
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

from unus_edge.aggregator import Aggregator, _inbound
from unus_edge.config import JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition
from unus_edge.messages import RoundMetrics, Update, decode_message, encode_message
from unus_edge.onnx_io import read_parameters
from unus_edge.seeds import device_seed
from unus_edge.simulation import SimulationOptions, simulate, usable_cores
from unus_edge.topics import Channel
from unus_edge.zoo import build_mlp, resolve_model

NUM_DEVICES = 10
EXAMPLES_PER_DEVICE = 250
BATCH_SIZE = 50
LEARNING_RATE = 0.05
HIDDEN = 2800
SEED = 5
GOAL = 1.5
MODES = ("processes-mosquitto", "inprocess-mosquitto", "processes-amqtt", "inprocess-amqtt")

Params = dict[str, np.ndarray[Any, Any]]


def job_config(rounds: int, url: str, model_path: Path) -> JobConfig:
    return load_job_config(environ={}, overrides=[
        "job.name=large", f"job.rounds={rounds}", f"job.seed={SEED}", "job.fraction=1.0", "job.round_deadline=900",
        "strategy.name=fedavg", f"model.source={model_path}", "train.epochs=1", f"train.batch_size={BATCH_SIZE}",
        f"train.learning_rate={LEARNING_RATE}", "evaluation.dataset=none", f"broker.url={url}",
    ])


# ------------------------------------------------------------------------------------------ compute floor


def floor_trainings(params: Params, shards: list[Dataset], server_round: int) -> list[float]:
    """Wall seconds of each of the round's trainings by the hand-written reference, one after another."""
    seconds = []
    for index, shard in enumerate(shards):
        seed = device_seed(SEED, server_round, f"device-{index:03d}")
        started = time.perf_counter()
        train_reference(params, shard.x, shard.y, epochs=1, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                        seed=seed)
        seconds.append(time.perf_counter() - started)
    return seconds


# ------------------------------------------------------------------------------------------ transport floor


def _paho_device(port: int, index: int, size: int, ready: Any, stop: Any) -> None:
    """A bare paho device: on every model message, answer with ``size`` bytes on its own topic."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    answer = b"\x5a" * size
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-device-{index}")
    client.max_inflight_messages_set(20)

    def on_connect(c: paho.Client, *_: object) -> None:
        c.subscribe("bench/large/model", qos=1)

    def on_message(c: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        c.publish(f"bench/large/up/{index}", answer, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: ready.release()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop.wait(600)
    client.disconnect()
    client.loop_stop()


def paho_round_seconds(port: int, size: int, rounds: int) -> list[float]:
    """The round's message pattern by bare paho clients in 1 + 10 processes; seconds per round."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    context = multiprocessing.get_context("spawn")
    ready = context.Semaphore(0)
    stop = context.Event()
    devices = [context.Process(target=_paho_device, args=(port, i, size, ready, stop), daemon=True)
               for i in range(NUM_DEVICES)]
    for process in devices:
        process.start()
    answers = 0
    lock = threading.Lock()
    all_answered = threading.Event()
    subscribed = threading.Event()

    def on_message(c: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal answers
        with lock:
            answers += 1
            if answers == NUM_DEVICES:
                all_answered.set()

    server = paho.Client(CallbackAPIVersion.VERSION2, client_id="paho-aggregator")
    server.max_inflight_messages_set(20)
    server.on_message = on_message
    server.on_subscribe = lambda *_: subscribed.set()
    server.connect("127.0.0.1", port)
    server.loop_start()
    server.subscribe("bench/large/up/+", qos=1)
    model = b"\xa5" * size
    seconds = []
    try:
        if not subscribed.wait(30):
            raise RuntimeError("the paho aggregator did not subscribe")
        for _ in range(NUM_DEVICES):
            if not ready.acquire(timeout=60):
                raise RuntimeError("a paho device did not subscribe")
        for _ in range(rounds):
            with lock:
                answers = 0
            all_answered.clear()
            started = time.perf_counter()
            server.publish("bench/large/model", model, qos=1, retain=True)
            if not all_answered.wait(300):
                raise RuntimeError(f"paho round: {answers}/{NUM_DEVICES} answers")
            seconds.append(time.perf_counter() - started)
    finally:
        server.publish("bench/large/model", b"", qos=1, retain=True)  # clear the retained copy
        stop.set()
        server.disconnect()
        server.loop_stop()
        for process in devices:
            process.join(30)
            if process.is_alive():
                process.kill()
    return seconds


# ------------------------------------------------------------------------------------------ federations


@dataclass
class Tap:
    """Wraps the aggregator's update handler (this process only): arrival time and handling time."""

    arrivals: dict[int, list[tuple[float, float, float]]] = field(default_factory=dict)
    """server_round -> (arrival perf_counter, the device's train_seconds, seconds in on_update)."""
    round_ends: dict[int, float] = field(default_factory=dict)
    _original: Any = None

    def __enter__(self) -> Tap:
        original = self._original = _inbound.on_update
        tap = self

        def on_update(service: Aggregator, envelope: Any, update: Any) -> None:
            arrived = time.perf_counter()
            original(service, envelope, update)
            handled = time.perf_counter() - arrived
            tap.arrivals.setdefault(update.server_round, []).append((arrived, float(update.train_seconds), handled))

        _inbound.on_update = on_update
        return self

    def __exit__(self, *exc: object) -> None:
        _inbound.on_update = self._original

    def on_round(self, metrics: RoundMetrics) -> None:
        self.round_ends[metrics.server_round] = time.perf_counter()


def run_federation(mode: str, port: int, rounds: int, dataset: str, data_dir: str,
                   model_path: Path) -> list[dict[str, float]]:
    placement, _ = mode.split("-")

    async def run() -> list[RoundMetrics]:
        history: list[RoundMetrics] = []
        with tempfile.TemporaryDirectory(prefix="unus-large-") as folder:
            options = SimulationOptions(
                config=job_config(rounds, f"mqtt://127.0.0.1:{port}", model_path), num_devices=NUM_DEVICES,
                dataset=dataset, data_dir=data_dir,  # type: ignore[arg-type]
                train_examples=NUM_DEVICES * EXAMPLES_PER_DEVICE, embedded_broker=False,
                processes=placement == "processes", out_dir=Path(folder) if placement == "processes" else None)

            def on_round(metrics: RoundMetrics) -> None:
                tap.on_round(metrics)
                history.append(metrics)

            async with asyncio.timeout(3600):
                report = await simulate(options, on_round=on_round)
        if report.result.state != "finished":
            raise RuntimeError(f"{mode}: the job ended {report.result.state}: {report.result.reason}")
        return history

    with Tap() as tap:
        history = asyncio.run(run())
    rows = []
    for metrics in history:
        arrivals = sorted(tap.arrivals.get(metrics.server_round, []))
        if metrics.num_updates != NUM_DEVICES or len(arrivals) != NUM_DEVICES:
            raise RuntimeError(f"{mode}: round {metrics.server_round} had {metrics.num_updates} updates")
        end = tap.round_ends[metrics.server_round]
        start = end - metrics.duration_seconds
        first_at, first_train, _ = arrivals[0]
        rows.append({
            "round": metrics.server_round, "duration": metrics.duration_seconds,
            "first_arrival": first_at - start, "first_train": first_train,
            "last_arrival": arrivals[-1][0] - start, "close": end - arrivals[-1][0],
            "on_update_sum": sum(a[2] for a in arrivals), "max_train": max(a[1] for a in arrivals),
            "bytes_up": metrics.bytes_up, "bytes_down": metrics.bytes_down,
        })
    return rows


def codec_seconds(params: Params) -> dict[str, float]:
    """Encode and decode of one update of this model (the device's and the aggregator's codec work)."""
    delta = {key: value * np.float32(1e-3) for key, value in params.items()}
    update = Update("device-000", "s" * 16, "r1.0.device-000", 1, 0, EXAMPLES_PER_DEVICE, 0.5, delta)
    encodes, decodes = [], []
    for _ in range(3):
        started = time.perf_counter()
        payload = encode_message(update, "large", Channel.UPDATE)
        encodes.append(time.perf_counter() - started)
        started = time.perf_counter()
        decode_message(payload, Channel.UPDATE)
        decodes.append(time.perf_counter() - started)
    return {"encode": min(encodes), "decode": min(decodes), "payload_bytes": float(len(payload))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    add_blas_flag(parser)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, help="rounds per federation, the first one untimed (default 4, quick 2)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden width (default {HIDDEN}: 10.1M parameters)")
    args = parser.parse_args()
    ensure_blas_threads(args.blas_threads)
    setup_output(args)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("unus_edge").setLevel(logging.ERROR)
    dataset, data_dir = resolve_dataset(args)
    rounds = args.rounds or (2 if args.quick else 4)
    modes = [m for m in args.modes if not m.endswith("mosquitto") or mosquitto_binary() is not None]
    if len(modes) != len(args.modes):
        say("NOTE: mosquitto is not installed: its modes are skipped")
    cores = usable_cores()

    with tempfile.TemporaryDirectory(prefix="unus-large-model-") as folder:
        model_path = Path(folder) / f"mlp_{args.hidden}.onnx"
        model_path.write_bytes(build_mlp((args.hidden, args.hidden), seed=SEED))
        params = read_parameters(resolve_model(str(model_path)))
        model_bytes = sum(int(v.nbytes) for v in params.values())
        say(f"FedAvg, MLP 784-{args.hidden}-{args.hidden}-10 ({sum(v.size for v in params.values()):,} parameters, "
            f"{model_bytes / 1e6:.1f} MB), {NUM_DEVICES} devices x {EXAMPLES_PER_DEVICE} {dataset} examples, "
            f"E=1 B={BATCH_SIZE}; {cores} cores, BLAS threads {blas_threads()}, load average {load_average():.2f}")
        train = load_dataset(dataset, "train", data_dir=data_dir or None, seed=SEED,
                             num_examples=NUM_DEVICES * EXAMPLES_PER_DEVICE)
        indices = partition(train.y, NUM_DEVICES, "iid", seed=SEED)
        shards = [Dataset(train.x[i].reshape(len(i), -1), train.y[i], train.num_classes) for i in indices]
        codec = codec_seconds(params)
        say(f"codec, one update: encode {codec['encode'] * 1e3:.1f} ms, decode {codec['decode'] * 1e3:.1f} ms "
            f"({codec['payload_bytes'] / 1e6:.1f} MB)")

        results: dict[str, Any] = {"machine": machine(), "dataset": dataset, "parameters": int(
            sum(v.size for v in params.values())), "model_bytes": model_bytes, "cores": cores, "goal": GOAL,
            "codec": codec, "modes": {}}
        for mode in modes:
            broker = mode.split("-")[1]
            with broker_process(broker) as port:
                say(f"... {mode}: paho floor, {rounds} rounds, paho floor again")
                paho_rounds = 1 + (2 if args.quick else 3)  # the first one untimed
                paho = paho_round_seconds(port, model_bytes, paho_rounds)[1:]
                rows = run_federation(mode, port, rounds, dataset, data_dir, model_path)
                paho += paho_round_seconds(port, model_bytes, paho_rounds)[1:]
            timed = rows[1:] or rows
            floors = [floor_trainings(params, shards, row["round"]) for row in timed]
            compute = median(max(max(f), sum(f) / cores) for f in floors)
            round_seconds = median(r["duration"] for r in timed)
            transport = median(paho)
            overhead = round_seconds - compute
            entry = {
                "round_seconds": round_seconds, "compute_floor_seconds": compute,
                "sequential_floor_seconds": median(sum(f) for f in floors), "overhead_seconds": overhead,
                "paho_round_seconds": transport, "paho_rounds": paho,
                "overhead_vs_paho": overhead / transport, "goal_met": overhead / transport <= GOAL,
                "rows": rows,
                "first_arrival_minus_train": median(r["first_arrival"] - r["first_train"] for r in timed),
                "last_arrival": median(r["last_arrival"] for r in timed),
                "close": median(r["close"] for r in timed),
                "on_update_sum": median(r["on_update_sum"] for r in timed),
                "max_train": median(r["max_train"] for r in timed),
            }
            results["modes"][mode] = entry
            say(f"    round {round_seconds:.2f} s, compute floor {compute:.2f} s, overhead {overhead:.2f} s, "
                f"paho {transport:.2f} s ({statistics.fmean(paho):.2f} mean): x{overhead / transport:.2f}")
        results["load_average_end"] = load_average()

    say(f"\n{'mode':22} {'round s':>8} {'compute':>8} {'overhead':>9} {'paho':>6} {'x paho':>7} {'goal':>6}   "
        "timeline (s): first update - its training | last update | close | on_update x10 | slowest training")
    for mode, e in results["modes"].items():
        goal = f"<= {GOAL}" if mode.endswith("mosquitto") else ""
        met = verdict(e["goal_met"]) if mode.endswith("mosquitto") else ""
        say(f"{mode:22} {e['round_seconds']:8.2f} {e['compute_floor_seconds']:8.2f} {e['overhead_seconds']:9.2f} "
            f"{e['paho_round_seconds']:6.2f} {e['overhead_vs_paho']:7.2f} {goal:>6} {met:6} "
            f"{e['first_arrival_minus_train']:6.2f} | {e['last_arrival']:5.2f} | {e['close']:5.2f} | "
            f"{e['on_update_sum']:5.2f} | {e['max_train']:5.2f}")
    say(f"load average at the end: {results['load_average_end']:.2f}")
    emit(results)


if __name__ == "__main__":
    main()
