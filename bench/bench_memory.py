"""Aggregator peak RSS against the number of devices per round: the O(model) bound.

The aggregator (``run_aggregator``: the CLI's code path, an ``MqttTransport`` to mosquitto) runs
in a subprocess with the CNN (``mnist_cnn``, 1,663,370 float32 parameters, 6.65 MB) and central
evaluation off. Lightweight *fake devices* in this process speak the protocol of
``docs/protocol.md`` without training: each connects with a persistent session and a last will,
publishes ``status: online``, registers with the CNN's fingerprint, heartbeats, and answers
every task at once with a dense random delta update (6.65 MB). Every device is selected every
round (C = 1), so N updates of 6.65 MB arrive in a burst per round: the worst case for memory.

The devices start once the aggregator has announced itself (retained ``status: online``).

Measured: the aggregator process's peak RSS (``VmHWM`` of ``/proc/self/status``, after each round
and at exit) for N = 10, 50 and 100 devices, each in a fresh process. (``ru_maxrss`` is not used:
Linux carries it across ``execve`` from the forking parent, here the fake devices' process.)
Floor: the same aggregator process, idle (model loaded, published, connected, waiting for
devices that never come). A naive design that keeps every update until the round ends would
need N x 6.65 MB more.
Goal: peak RSS - floor does not grow with N: from the fewest to the most devices it grows by
less than one model.

Two diagnostic runs at the largest N (``--no-diagnostics`` skips them): the aggregator's
transport built with ``max_queued_messages=1`` (the transport's own receive-queue bound), and
devices that answer after a random delay in ``[0, --spread]`` seconds instead of at once. The
deepest backlog of the aggregator transport's receive queue is recorded in every run (by
wrapping ``MqttTransport._on_message`` in the aggregator subprocess only).

    python bench/bench_memory.py [--quick] [--json] [--devices 10 50 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
from _common import (
    add_common_flags,
    broker_process,
    emit,
    load_average,
    machine,
    mosquitto_binary,
    say,
    setup_output,
    single_thread_env,
    verdict,
)

from unus_edge import __version__, topics
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings, load_job_config
from unus_edge.device import Device
from unus_edge.errors import ProtocolError, PublishError
from unus_edge.messages import (
    Clock,
    Heartbeat,
    Registration,
    RegistrationReply,
    Status,
    Task,
    Update,
    decode_message,
    encode_message,
)
from unus_edge.onnx_io import fingerprint, read_parameters
from unus_edge.topics import Channel
from unus_edge.transport import MqttTransport
from unus_edge.zoo import resolve_model

MODEL = "mnist_cnn"
MB = 1e6
SCRIPT = os.path.abspath(__file__)


def job_overrides(job: str, url: str, devices: int, rounds: int) -> list[str]:
    return [f"job.name={job}", f"job.rounds={rounds}", "job.seed=0", "job.fraction=1.0", f"job.min_devices={devices}",
            "job.round_deadline=600", "job.wait_for_devices=600", "job.heartbeat_timeout=120",
            f"model.source={MODEL}", "evaluation.dataset=none", f"broker.url={url}"]


# ----------------------------------------------------------------------------- the aggregator (child)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_main(args: argparse.Namespace) -> None:
    from unus_edge.aggregator import run_aggregator

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.max_queued:  # the bounded queue pauses and resumes reading all the time: expected, not news
        logging.getLogger("unus_edge.transport").setLevel(logging.ERROR)
    config = load_job_config(environ={}, overrides=job_overrides(args.job, args.url, max(1, args.child_devices),
                                                                 args.rounds))
    rounds: list[dict[str, Any]] = []
    # Diagnosis, in this process only: how deep the transport's receive queue gets (messages, bytes).
    backlog = {"messages": 0, "bytes": 0}
    original = MqttTransport._on_message

    def on_message(transport: MqttTransport, client: Any, userdata: Any, message: Any) -> None:
        original(transport, client, userdata, message)
        queue = transport._queue
        backlog["messages"] = max(backlog["messages"], len(queue))
        backlog["bytes"] = max(backlog["bytes"], sum(len(m.payload) for m in queue))

    MqttTransport._on_message = on_message  # type: ignore[method-assign]

    def on_round(metrics: Any) -> None:
        rounds.append({"round": metrics.server_round, "updates": metrics.num_updates,
                       "duration_seconds": metrics.duration_seconds,
                       "hwm_kb": _proc_status_kb("VmHWM"), "rss_kb": _proc_status_kb("VmRSS")})

    async def run() -> Any:
        trigger = asyncio.Event()
        if args.idle_seconds:
            asyncio.get_running_loop().call_later(args.idle_seconds, trigger.set)
        transport = None
        if args.max_queued:  # the diagnostic variant: a receive queue bounded to a few messages
            from unus_edge.aggregator import Aggregator

            options = Aggregator.connect_options(config, secrets.token_hex(8))
            transport = MqttTransport(replace(options, max_queued_messages=args.max_queued))
        return await run_aggregator(config, shutdown_trigger=trigger, on_round=on_round, resume=False,
                                    transport=transport)

    result = asyncio.run(run())
    print(json.dumps({"state": result.state, "rounds": rounds, "rejected": result.rejected,
                      "max_queue_messages": backlog["messages"], "max_queue_bytes": backlog["bytes"],
                      "hwm_kb": _proc_status_kb("VmHWM"), "rss_kb": _proc_status_kb("VmRSS"),
                      "wall_seconds": result.wall_seconds}), flush=True)


# ----------------------------------------------------------------------------- fake devices (parent)


class FakeDevice:
    """Speaks the device side of the protocol; answers each task with a random dense delta."""

    def __init__(self, job: str, index: int, url: str, fingerprint: str, delta: dict[str, np.ndarray],
                 spread: float = 0.0) -> None:
        self.job = job
        self.spread = spread
        self.rng = np.random.default_rng(index)
        self.device_id = f"fake-{index:03d}"
        self.session = secrets.token_hex(8)
        self.fingerprint = fingerprint
        self.delta = delta
        settings = DeviceSettings(id=self.device_id, job=job, data="none", model=MODEL)
        self.options = Device.connect_options(DeviceConfig(settings, BrokerSettings(url=url)), self.session)
        self.aggregator_session = ""
        self.updates = 0
        self.acks = 0

    def _topic(self, channel: Channel) -> str:
        return topics.device_topic(self.job, self.device_id, channel)

    async def _send(self, transport: MqttTransport, channel: Channel, message: Any) -> None:
        spec = topics.TOPIC_SPECS[channel]
        await transport.publish(self._topic(channel), encode_message(message, self.job, channel),
                                qos=spec.qos, retain=spec.retain)

    async def _heartbeats(self, transport: MqttTransport) -> None:
        sequence = 0
        while True:
            sequence += 1
            with contextlib.suppress(PublishError):
                await self._send(transport, Channel.HEARTBEAT, Heartbeat(self.device_id, self.session, sequence))
            await asyncio.sleep(5.0)

    async def _answer(self, transport: MqttTransport, task: Task) -> None:
        if self.spread:
            await asyncio.sleep(float(self.rng.uniform(0, self.spread)))
        update = Update(self.device_id, self.session, task.task_id, task.server_round, task.model_version, 600, 0.1,
                        self.delta, train_seconds=0.0)
        await self._send(transport, Channel.UPDATE, update)
        self.updates += 1

    async def run(self) -> None:
        async with MqttTransport(self.options) as transport, asyncio.TaskGroup() as group:
            await self._send(transport, Channel.STATUS, Status(self.device_id, "online", self.session,
                                                               software_version=__version__))
            await transport.subscribe(self._topic(Channel.TASKS), qos=1)
            await transport.subscribe(topics.clock(self.job), qos=1)
            await transport.subscribe(topics.aggregator_status(self.job), qos=1)
            beats = group.create_task(self._heartbeats(transport))
            async for received in transport.messages():
                try:
                    parsed = topics.parse(received.topic)
                    _, message = decode_message(received.payload, parsed.channel)
                except ProtocolError:
                    continue
                if isinstance(message, Status) and message.role == "aggregator" and message.state == "online" \
                        and message.session != self.aggregator_session:
                    self.aggregator_session = message.session
                    await self._send(transport, Channel.REGISTER, Registration(
                        self.device_id, self.session, 600, self.fingerprint, __version__, "fake", "fake"))
                elif isinstance(message, RegistrationReply) and not message.accepted:
                    raise RuntimeError(f"{self.device_id} refused: {message.reason} {message.detail}")
                elif isinstance(message, Task):
                    group.create_task(self._answer(transport, message))
                elif isinstance(message, Clock) and message.state in ("finished", "failed"):
                    break
                elif not isinstance(message, RegistrationReply | Status | Clock):
                    self.acks += 1
            beats.cancel()
            await self._send(transport, Channel.STATUS, Status(self.device_id, "offline", self.session,
                                                               reason="shutdown"))


async def aggregator_online(url: str, job: str) -> None:
    """Wait for the aggregator's retained ``status: online``."""
    options = BrokerSettings(url=url).connect_options(client_id="", clean_session=True)
    async with MqttTransport(options) as watcher:
        await watcher.subscribe(topics.aggregator_status(job), qos=1)
        async for received in watcher.messages():
            _, message = decode_message(received.payload, Channel.AGGREGATOR_STATUS)
            if isinstance(message, Status) and message.state == "online":
                return


async def measure(url: str, job: str, devices: int, rounds: int, idle_seconds: float,
                  model_fingerprint: str, delta: dict[str, np.ndarray], max_queued: int = 0,
                  spread: float = 0.0) -> dict[str, Any]:
    command = [sys.executable, SCRIPT, "--child-aggregator", "--job", job, "--url", url,
               "--child-devices", str(devices), "--rounds", str(rounds), "--idle-seconds", str(idle_seconds),
               "--max-queued", str(max_queued)]
    child = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=single_thread_env())
    fakes = [FakeDevice(job, i, url, model_fingerprint, delta, spread) for i in range(devices)]
    started = time.perf_counter()
    try:
        async with asyncio.timeout(900):
            # Devices start once the aggregator is up (as a fleet that is already running would see it).
            await aggregator_online(url, job)
            tasks = [asyncio.create_task(f.run()) for f in fakes]
            out, _ = await child.communicate()
            if tasks:
                done, pending = await asyncio.wait(tasks, timeout=30)
                for task in pending:
                    task.cancel()
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
    finally:
        if child.returncode is None:
            child.terminate()
            await child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"the aggregator exited with status {child.returncode}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    report["devices"] = devices
    report["updates_sent"] = sum(f.updates for f in fakes)
    report["elapsed_seconds"] = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, data=False)
    parser.add_argument("--devices", type=int, nargs="+", help="devices per round (default 10 50 100)")
    parser.add_argument("--rounds", type=int, help="rounds per configuration (default 3, quick 2)")
    parser.add_argument("--spread", type=float, default=10.0,
                        help="diagnostic run: devices answer after a random delay in [0, SPREAD] s (default 10)")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the two diagnostic runs")
    parser.add_argument("--child-aggregator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", default="mem", help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--max-queued", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--idle-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_aggregator:
        child_main(args)
        return
    setup_output(args)
    logging.basicConfig(level=logging.ERROR)
    if mosquitto_binary() is None:
        say("mosquitto is not installed: this benchmark needs it (apt-get install mosquitto)")
        sys.exit(2)
    counts = sorted(args.devices or ([10, 100] if args.quick else [10, 50, 100]))
    rounds = args.rounds or (2 if args.quick else 3)
    model = resolve_model(MODEL)
    template = read_parameters(model)
    params = sum(int(v.size) for v in template.values())
    model_mb = sum(int(v.nbytes) for v in template.values()) / MB
    rng = np.random.default_rng(0)
    delta = {name: (rng.standard_normal(value.shape, dtype=np.float32) * np.float32(1e-3))
             for name, value in template.items()}
    print_ = fingerprint(model)
    say(f"{MODEL}: {params:,} parameters, {model_mb:.2f} MB; aggregator in a subprocess over mosquitto; "
        f"{rounds} rounds per configuration, every device selected; load average {load_average():.2f}")
    figures: dict[str, Any] = {"machine": machine(), "model": MODEL, "parameters": params, "model_mb": model_mb,
                               "rounds": rounds, "runs": {}, "diagnostics": {}}
    top = counts[-1]
    with broker_process("mosquitto") as port:
        url = f"mqtt://127.0.0.1:{port}"
        say("... idle aggregator (floor)")
        idle = asyncio.run(measure(url, "mem-idle", 0, 1, 3.0, print_, delta))
        floor_mb = idle["hwm_kb"] * 1024 / MB
        figures["floor"] = {"peak_rss_mb": floor_mb}
        for count in counts:
            say(f"... {count} devices, burst")
            figures["runs"][str(count)] = asyncio.run(measure(url, f"mem-{count}", count, rounds, 0.0, print_, delta))
        if not args.no_diagnostics:
            say(f"... {top} devices, burst, receive queue bounded to 1 message (ConnectOptions.max_queued_messages)")
            figures["diagnostics"]["queue_bound_1"] = asyncio.run(
                measure(url, f"mem-{top}-q1", top, rounds, 0.0, print_, delta, max_queued=1))
            say(f"... {top} devices, answers spread over {args.spread:g} s")
            figures["diagnostics"]["spread"] = asyncio.run(
                measure(url, f"mem-{top}-spread", top, rounds, 0.0, print_, delta, spread=args.spread))

    def row(label: str, run: dict[str, Any], count: int) -> float:
        peak_mb = run["hwm_kb"] * 1024 / MB
        extra = peak_mb - floor_mb
        per_round = [r["hwm_kb"] * 1024 / MB for r in run["rounds"]]
        seconds = sum(r["duration_seconds"] for r in run["rounds"]) / max(1, len(run["rounds"]))
        updates = sum(r["updates"] for r in run["rounds"])
        ok = run["state"] == "finished" and updates == count * rounds and not run["rejected"]
        run.update(peak_rss_mb=peak_mb, above_floor_mb=extra, above_floor_x_model=extra / model_mb,
                   ratio_peak_over_floor=peak_mb / floor_mb, naive_extra_mb=count * model_mb, complete=ok)
        say(f"{label:26} {count:7d} {updates:8d} {peak_mb:9.1f} {extra:8.1f} {extra / model_mb:8.2f} "
            f"{count * model_mb:8.1f} {run['max_queue_messages']:8d} {run['max_queue_bytes'] / MB:8.1f} "
            f"{seconds:8.2f}   {' '.join(f'{v:.0f}' for v in per_round)}"
            + ("" if ok else f"   INCOMPLETE: state {run['state']}, rejected {run['rejected']}"))
        return extra

    say(f"\nfloor (idle aggregator: model loaded and published, connected): peak RSS {floor_mb:.1f} MB")
    say(f"{'configuration':26} {'devices':>7} {'updates':>8} {'peak MB':>9} {'-floor':>8} {'x model':>8} "
        f"{'naive MB':>8} {'queue':>8} {'queue MB':>8} {'s/round':>8}   peak after each round (MB)")
    extras = [row("burst (library defaults)", figures["runs"][str(c)], c) for c in counts]
    if not args.no_diagnostics:
        row("burst, queue bound 1", figures["diagnostics"]["queue_bound_1"], top)
        row(f"spread over {args.spread:g} s", figures["diagnostics"]["spread"], top)
    growth = extras[-1] - extras[0]
    span = counts[-1] - counts[0]
    # "Does not grow": from the fewest to the most devices, the peak grows by less than one model
    # (a design that keeps every update until the round ends grows by (N_max - N_min) models).
    met = growth < model_mb and all(figures["runs"][str(c)]["complete"] for c in counts)
    figures.update(growth_mb=growth, naive_growth_mb=span * model_mb, goal_met=met,
                   ratio_peak_over_floor=figures["runs"][str(top)]["ratio_peak_over_floor"],
                   load_average_end=load_average())
    say("queue / queue MB: deepest backlog of the aggregator transport's receive queue (messages, payload MB).")
    say(f"\nfrom {counts[0]} to {top} devices the peak grows by {growth:.1f} MB "
        f"(naive design: {span * model_mb:.0f} MB); "
        f"peak / floor at {top} devices: {figures['ratio_peak_over_floor']:.2f}  "
        f"({verdict(met)}: growth < one model, {model_mb:.2f} MB)")
    emit(figures)


if __name__ == "__main__":
    main()
