"""A fleet of 300 to 10,000 devices through Mosquitto: registration, rounds, memory (issue 21).

Per fleet size, in one run: a fresh Mosquitto on a free loopback port, then ``unus-edge simulate
--device-hosts 2`` (the aggregator in its own process, the devices in two host processes of
in-process devices), logreg, E=1, B=10, C=1, three rounds, each device with
``min(60, 60,000 / N)`` MNIST examples (MNIST has 60,000 training images). Measured from outside,
as an operator would see it:

* **register all**: from the first registration the fleet summary counts (``metrics/devices``,
  ``registered``) to the one that counts all N; and from the start of ``simulate``;
* **re-registrations**: registrations sent beyond one per device (the hosts' reports: a device
  sends another only when 15 s or more passed without an answer);
* **rounds**: each round's ``duration_seconds`` (``metrics/round``);
* **memory**: the peak RSS (``VmHWM``) of the aggregator's process, of Mosquitto and of the
  hosts, and the aggregator's largest RSS once the whole fleet registered (its peak is loading
  and partitioning MNIST, the same at every size); the slope of the latter between the two
  largest sizes is what the registry and the round state cost per device (goal: at most 1 KB
  per device beyond the model-sized buffers);
* **traffic**: messages the broker received and sent (``$SYS``), per second of the job;
* **descriptors**: the most file descriptors the aggregator and Mosquitto held;
* **profile** (``--profile``, needs ``py-spy``): a sampling profile of the aggregator's process
  over the whole job; the functions with the largest inclusive share of samples.

Goals: 3,000 devices register in under 15 s with no retry and finish 3 rounds; the per-round cost
grows linearly with the fleet between 1,000 and 3,000 devices (ratio of round times at most 3x
the ratio of fleets; the slope is reported).

* **objects** (``--objects``): the Python objects an in-memory aggregator keeps per registered
  device (tracemalloc, 1,000 against 3,000 registrations, no broker): what the RSS would be
  without the allocator's arenas and the transport's buffers.

    python bench/bench_fleet_scale.py [--quick] [--json] [--sizes 300,1000,3000,10000] [--profile] [--objects]
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from _common import (
    add_common_flags,
    emit,
    free_port,
    machine,
    mosquitto_binary,
    resolve_dataset,
    say,
    setup_output,
    verdict,
    wait_for_port,
)

ROUNDS = 3
HOSTS = 2
REGISTER_GOAL_SECONDS = 15.0
MEMORY_GOAL_BYTES = 1024


def status_kb(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def descriptors(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


class Sampler(threading.Thread):
    """Peak memory and descriptors of the processes, every half second (outside the library)."""

    def __init__(self, aggregator: int, broker: int, watcher: Watcher) -> None:
        super().__init__(daemon=True)
        self.aggregator, self.broker, self.watcher = aggregator, broker, watcher
        self.peak: Counter[str] = Counter()
        self.cpu: dict[int, float] = {}
        """The last CPU time seen per process (the hosts', the aggregator's, the broker's)."""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            if self.watcher.all_registered is not None:  # the fleet's steady state, after the data loading
                rss = status_kb(self.aggregator, "VmRSS")
                self.peak["aggregator_running_kb"] = max(self.peak["aggregator_running_kb"], rss)
                if not self.watcher.rounds:  # registered, no round finished yet
                    self.peak["aggregator_registered_kb"] = max(self.peak["aggregator_registered_kb"], rss)
            hosts = children(self.aggregator)
            for pid in (self.aggregator, self.broker, *hosts):
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu_seconds(pid))
            for name, kb in (("aggregator_kb", status_kb(self.aggregator, "VmHWM")),
                             ("broker_kb", status_kb(self.broker, "VmHWM")),
                             ("hosts_kb", sum(status_kb(pid, "VmHWM") for pid in hosts)),
                             ("aggregator_fds", descriptors(self.aggregator)),
                             ("broker_fds", descriptors(self.broker))):
                self.peak[name] = max(self.peak[name], kb)


class Watcher:
    """What ``mosquitto_sub`` would show: the fleet summary, the rounds, the broker's counters."""

    def __init__(self, port: int, job: str, num_devices: int) -> None:
        self.num_devices = num_devices
        self.first_registered: float | None = None
        self.all_registered: float | None = None
        self.most_registered = 0
        self.rounds: list[dict[str, Any]] = []
        self.sys: dict[str, list[tuple[float, int]]] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{job}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        for topic in (f"unus/v1/{job}/metrics/devices", f"unus/v1/{job}/metrics/round",
                      "$SYS/broker/messages/received", "$SYS/broker/messages/sent"):
            self.client.subscribe(topic, qos=0)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.monotonic()
        if message.topic.startswith("$SYS/"):
            self.sys.setdefault(message.topic.rsplit("/", 1)[1], []).append((now, int(message.payload)))
            return
        body = json.loads(message.payload)["body"]
        if message.topic.endswith("/metrics/round"):
            self.rounds.append(body)
            return
        registered = int(body["registered"])
        self.most_registered = max(self.most_registered, registered)
        if registered and self.first_registered is None:
            self.first_registered = now
        if registered >= self.num_devices and self.all_registered is None:
            self.all_registered = now

    def rate(self, name: str, start: float, end: float) -> float:
        """Messages per second over [start, end] from the cumulative ``$SYS`` counter."""
        points = [(t, v) for t, v in self.sys.get(name, []) if start - 1 <= t <= end + 1]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return 0.0
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Any:
    binary = mosquitto_binary()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                      "persistence false\nmax_queued_messages 100000\nmax_inflight_messages 0\n"
                      "max_packet_size 268435456\nsys_interval 1\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_SPINE = ("cli.py", "_cli_common.py", "_cli_simulate.py", "runpy", "runners.py", "base_events.py:", "events.py:",
          "<module>")


def top_frames(raw: Path, limit: int = 12) -> dict[str, list[tuple[str, float]]]:
    """A ``py-spy --format raw`` file (non-idle samples) summed three ways: the functions with the
    largest inclusive share (the event loop's spine left out, every sample is in it), the leaf
    frames with the largest own share, and the deepest unus_edge frame of each sample (where the
    library's own code spends, or calls out)."""
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    deepest: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaves[frames[-1]] += count
        ours = [frame for frame in frames if "unus_edge/" in frame and not any(part in frame for part in _SPINE)]
        if ours:
            deepest[ours[-1]] += count
        for frame in set(frames):
            if not any(part in frame for part in _SPINE):
                inclusive[frame] += count
    if not total:
        return {"inclusive": [], "self": [], "deepest unus_edge frame": []}
    return {"inclusive": [(frame, count / total) for frame, count in inclusive.most_common(limit)],
            "self": [(frame, count / total) for frame, count in leaves.most_common(limit)],
            "deepest unus_edge frame": [(frame, count / total) for frame, count in deepest.most_common(limit)]}


async def _objects_after_registrations(num_devices: int) -> int:
    """Bytes of Python objects an in-memory aggregator allocated for ``num_devices`` registrations."""
    import asyncio
    import gc
    import tracemalloc

    from unus_edge import topics
    from unus_edge.aggregator import Aggregator, prepare_job
    from unus_edge.config import load_job_config
    from unus_edge.messages import Registration, Status, encode_message
    from unus_edge.topics import Channel
    from unus_edge.transport import ConnectOptions, MemoryBroker, MemoryTransport

    job = "objects"
    config = load_job_config(environ={}, overrides=[
        f"job.name={job}", f"job.min_devices={num_devices + 1}", "job.wait_for_devices=600", "model.source=logreg",
        "evaluation.dataset=synthetic", "evaluation.num_examples=100", "job.heartbeat_timeout=600"])
    parts = prepare_job(config)
    broker = MemoryBroker()
    aggregator = Aggregator(config, MemoryTransport(broker, Aggregator.connect_options(config, "agg")),
                            params=parts.params, fingerprint=parts.fingerprint, strategy=parts.strategy,
                            evaluate=parts.evaluate, session="agg", resume=False)
    fleet = MemoryTransport(broker, ConnectOptions(client_id="fleet"))
    async with aggregator.transport, fleet:
        running = asyncio.create_task(aggregator.run())
        await fleet.subscribe(topics.aggregator_status(job))
        async for message in fleet.messages():  # register only once the aggregator listens, as devices do
            if b'"online"' in message.payload:
                break
        await fleet.unsubscribe(topics.aggregator_status(job))
        await fleet.subscribe(topics.device_filter(job, Channel.TASKS))
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for index in range(num_devices):
            device_id, session = f"device-{index:05d}", f"{index:016x}"
            await fleet.publish(topics.device_topic(job, device_id, Channel.STATUS),
                                encode_message(Status(device_id, "online", session), job, Channel.STATUS), retain=True)
            registration = Registration(device_id, session, 60, aggregator.fingerprint, "0.9.0",
                                        platform="Linux-6.8.0-aarch64-with-glibc2.39", machine="aarch64",
                                        python_version="3.12.3", cpu_count=4, memory_bytes=4 << 30)
            await fleet.publish(topics.device_topic(job, device_id, Channel.REGISTER),
                                encode_message(registration, job, Channel.REGISTER))
        answered = 0
        async for _ in fleet.messages():
            answered += 1
            if answered == num_devices:
                break
        broker.retained.clear()  # the in-memory broker's copies and log are not the aggregator's
        broker.published.clear()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        aggregator.shutdown_trigger.set()
        await running
    return used


def python_objects_per_device(low: int = 1000, high: int = 3000) -> float:
    """The slope of the Python objects an aggregator keeps per registered device (tracemalloc)."""
    import asyncio
    import logging
    import tracemalloc

    logging.disable(logging.WARNING)
    tracemalloc.start()
    try:
        small = asyncio.run(_objects_after_registrations(low))
        large = asyncio.run(_objects_after_registrations(high))
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
    return (large - small) / (high - low)


def run_size(num_devices: int, dataset: str, data_dir: str, workdir: Path, profile: bool) -> dict[str, Any]:
    job = f"fleet{num_devices}"
    examples = min(60, 60_000 // num_devices)
    out = workdir / job
    with mosquitto(workdir) as (port, broker_pid):
        watcher = Watcher(port, job, num_devices)
        command = [sys.executable, "-m", "unus_edge.cli", "-q", "simulate", "--broker", f"mqtt://127.0.0.1:{port}",
                   "--devices", str(num_devices), "--device-hosts", str(HOSTS), "--model", "logreg",
                   "--rounds", str(ROUNDS), "--dataset", dataset, "--train-examples", str(examples * num_devices),
                   "-E", "1", "-B", "10", "-C", "1", "--lr", "0.1", "--job", job, "--out", str(out),
                   "--deadline", "900", "--set", "job.wait_for_devices=900"]
        if data_dir:
            command += ["--data-dir", data_dir]
        environment = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment)
        sampler = Sampler(process.pid, broker_pid, watcher)
        sampler.start()
        spy = None
        if profile:
            spy = subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--pid", str(process.pid),
                                    "--format", "raw", "--rate", "50", "--nonblocking", "-o",
                                    str(workdir / f"{job}.profile.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            output, _ = process.communicate(timeout=3600)
        finally:
            if process.poll() is None:
                process.kill()
            sampler.stop.set()
            sampler.join()
        ended = time.monotonic()
        if spy is not None:
            spy.wait(timeout=60)
        watcher.close()
    text = output.decode(errors="replace")
    reports = [json.loads(path.read_text()) for path in sorted((out / "hosts").glob("report_*.json"))]
    registrations = sum(int(r["registrations"]) for r in reports)
    warnings = sum(text.count(word) for word in ("WARNING", "ERROR"))
    host_logs = "".join(path.read_text(errors="replace") for path in sorted((out / "logs").glob("host_*.log")))
    rounds = sorted(watcher.rounds, key=lambda r: int(r["server_round"]))
    figures: dict[str, Any] = {
        "devices": num_devices, "examples_per_device": examples, "returncode": process.returncode,
        "finished": f"finished: {ROUNDS} rounds" in text,
        "register_seconds": (watcher.all_registered - watcher.first_registered
                             if watcher.all_registered and watcher.first_registered else None),
        "register_from_start_seconds": watcher.all_registered - started if watcher.all_registered else None,
        "most_registered": watcher.most_registered,
        "re_registrations": registrations - num_devices if reports else None,
        "round_seconds": [float(r["duration_seconds"]) for r in rounds],
        "wall_seconds": ended - started,
        "aggregator_peak_mb": sampler.peak["aggregator_kb"] / 1024,
        "aggregator_running_mb": sampler.peak["aggregator_running_kb"] / 1024,
        "aggregator_registered_mb": sampler.peak["aggregator_registered_kb"] / 1024,
        "broker_peak_mb": sampler.peak["broker_kb"] / 1024,
        "hosts_peak_mb": sampler.peak["hosts_kb"] / 1024,
        "aggregator_cpu_seconds": sampler.cpu.get(process.pid, 0.0),
        "broker_cpu_seconds": sampler.cpu.get(broker_pid, 0.0),
        "hosts_cpu_seconds": sum(v for pid, v in sampler.cpu.items() if pid not in (process.pid, broker_pid)),
        "aggregator_fds": sampler.peak["aggregator_fds"], "broker_fds": sampler.peak["broker_fds"],
        "broker_received_per_second": watcher.rate("received", started, ended),
        "broker_sent_per_second": watcher.rate("sent", started, ended),
        "aggregator_warnings": warnings,
        "host_warnings": host_logs.count("WARNING"), "host_errors": host_logs.count("ERROR"),
    }
    if spy is not None and (workdir / f"{job}.profile.txt").exists():
        figures["profile"] = top_frames(workdir / f"{job}.profile.txt")
    if process.returncode != 0:
        figures["tail"] = text[-2000:]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument("--sizes", default="300,1000,3000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--profile", action="store_true", help="sample the aggregator with py-spy")
    parser.add_argument("--objects", action="store_true", help="also measure the Python objects kept per "
                        "registered device (tracemalloc, in memory, no broker)")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs (logs, host reports, raw profiles) in DIR")
    args = parser.parse_args()
    setup_output(args)
    if args.profile and shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    sizes = [300, 1000] if args.quick else [int(size) for size in args.sizes.split(",")]
    dataset, data_dir = resolve_dataset(args)
    results = []
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="fleet-scale-")
          ) as folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for size in sizes:
            say(f"{size} devices ...")
            figures = run_size(size, dataset, data_dir, Path(folder), args.profile)
            results.append(figures)
            rounds = " / ".join(f"{s:.2f}" for s in figures["round_seconds"]) or "-"
            register = figures["register_seconds"]
            say(f"  {'finished' if figures['finished'] else 'NOT finished'} in {figures['wall_seconds']:.1f} s; "
                f"registered all in {register:.2f} s" if register is not None else
                f"  not all registered (at most {figures['most_registered']})")
            say(f"  re-registrations {figures['re_registrations']}, rounds {rounds} s, aggregator peak "
                f"{figures['aggregator_peak_mb']:.0f} MB (running {figures['aggregator_running_mb']:.0f}), "
                f"broker {figures['broker_peak_mb']:.0f} MB, hosts "
                f"{figures['hosts_peak_mb']:.0f} MB, fds {figures['aggregator_fds']}/{figures['broker_fds']}, "
                f"broker {figures['broker_received_per_second']:.0f} msg/s in, "
                f"{figures['broker_sent_per_second']:.0f} out, warnings {figures['aggregator_warnings']} "
                f"(hosts {figures['host_warnings']})")
            say(f"  CPU seconds: aggregator {figures['aggregator_cpu_seconds']:.1f}, broker "
                f"{figures['broker_cpu_seconds']:.1f}, hosts {figures['hosts_cpu_seconds']:.1f} "
                f"(of {figures['wall_seconds']:.1f} s wall on {os.cpu_count()} cores)")
            for kind, entries in figures.get("profile", {}).items():
                say(f"  profile of the aggregator's process, {kind}:")
                for frame, share in entries[:10]:
                    say(f"    {share:6.1%}  {frame}")
            if "tail" in figures:
                say(figures["tail"])
    summary = summarise(results)
    if args.objects:
        per_device = python_objects_per_device()
        summary["python_objects_bytes_per_device"] = per_device
        summary["lines"].append(f"Python objects the aggregator keeps per registered device (tracemalloc, "
                                f"1,000 vs 3,000): {per_device:.0f} B")
    for line in summary.pop("lines"):
        say(line)
    emit({"machine": machine(), "dataset": dataset, "hosts": HOSTS, "rounds": ROUNDS, "sizes": results, **summary})


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_size = {r["devices"]: r for r in results}
    lines, summary = [], {}
    if 3000 in by_size:
        r = by_size[3000]
        met = bool(r["finished"] and r["register_seconds"] is not None and r["register_seconds"] < REGISTER_GOAL_SECONDS
                   and r["re_registrations"] == 0)
        summary["goal_3000"] = met
        lines.append(f"3,000 devices: register {r['register_seconds']} s (goal < 15 s), re-registrations "
                     f"{r['re_registrations']} (goal 0), finished {r['finished']}: {verdict(met)}")
    if 1000 in by_size and 3000 in by_size:
        small, large = by_size[1000], by_size[3000]
        if len(small["round_seconds"]) == ROUNDS and len(large["round_seconds"]) == ROUNDS:
            t_small = sum(small["round_seconds"][1:]) / (ROUNDS - 1)  # rounds 2 and 3: round 1 includes warm-up
            t_large = sum(large["round_seconds"][1:]) / (ROUNDS - 1)
            slope_ms = 1000 * (t_large - t_small) / 2000
            ratio = t_large / t_small
            summary.update(round_slope_ms_per_device=slope_ms, round_ratio_3000_over_1000=ratio)
            lines.append(f"per-round cost: {t_small:.2f} s at 1,000, {t_large:.2f} s at 3,000: ratio {ratio:.2f} "
                         f"(linear: 3, quadratic: 9), slope {slope_ms:.2f} ms per device per round: "
                         f"{verdict(ratio <= 4.5)}")
    sizes = sorted(size for size in by_size if by_size[size]["aggregator_running_mb"])
    if len(sizes) >= 2:
        low, high = by_size[sizes[-2]], by_size[sizes[-1]]
        for key, label in (("aggregator_registered_mb", "registered, before round 1"),
                           ("aggregator_running_mb", "at most, over the rounds")):
            per_device = (high[key] - low[key]) * 2**20 / (high["devices"] - low["devices"])
            summary[key.replace("_mb", "_bytes_per_device")] = per_device
            lines.append(f"aggregator RSS {label}: {low[key]:.0f} MB at {low['devices']}, {high[key]:.0f} MB at "
                         f"{high['devices']}: {per_device:.0f} B per device (goal <= {MEMORY_GOAL_BYTES}): "
                         f"{verdict(per_device <= MEMORY_GOAL_BYTES)}")
    return {**summary, "lines": lines}


if __name__ == "__main__":
    main()
