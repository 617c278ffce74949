"""The chaos harness (``unus-edge chaos``): a federated job under faults, then an audit.

It starts Mosquitto (with persistence), a :class:`~unus_edge.faults.FaultProxy` in front of
it, an aggregator process and N device processes, all connected through the proxy. While the
job runs it breaks things, at points chosen by the job's progress (read from the retained
metrics, not from timers):

* the proxy cuts connections at random (and holds some half-open);
* a fraction of the devices is killed with SIGKILL and restarted;
* the aggregator is killed with SIGKILL and restarted (it resumes from its checkpoint);
* Mosquitto is restarted.

Then it audits: the job completed; every applied update (the aggregator's ``audit.jsonl``)
is unique; every update a device saw acknowledged (its log) was applied. The final accuracy is
compared with a fault-free run of the same job by the caller (``faults=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unus_edge import topics
from unus_edge.aggregator._checkpoint import read_audit
from unus_edge.data import Dataset, load_dataset, partition, save_partition
from unus_edge.errors import ConfigError, JobError
from unus_edge.faults import FaultProxy
from unus_edge.messages import JobMetrics, RoundMetrics, decode_message
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MqttTransport

__all__ = ["ChaosOptions", "ChaosReport", "run_chaos"]

logger = logging.getLogger("unus_edge.chaos")

_ACKED = re.compile(r"update ([0-9a-f]{32}) for (\S+) applied")


@dataclass(frozen=True)
class ChaosOptions:
    out_dir: Path
    devices: int = 20
    rounds: int = 30
    mode: Literal["sync", "ssp"] = "sync"
    staleness_bound: int | str = 2
    dataset: Literal["mnist", "synthetic"] = "synthetic"
    data_dir: str = ""
    train_examples: int = 0
    eval_examples: int = 2000
    model: str = "mnist_2nn"
    epochs: int = 1
    batch_size: int = 10
    learning_rate: float = 0.05
    seed: int = 0
    faults: bool = True
    cut_interval: float = 2.0
    hold_fraction: float = 0.1
    device_kill_fraction: float = 0.2
    aggregator_kills: int = 2
    broker_restarts: int = 1
    keepalive: int = 5
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 8.0
    round_deadline: float = 60.0
    timeout: float = 1800.0


@dataclass
class ChaosReport:
    state: str = "unknown"
    rounds: int = 0
    final_accuracy: float | None = None
    wall_seconds: float = 0.0
    applied: int = 0
    duplicates: list[str] = field(default_factory=list)
    acknowledged: int = 0
    acknowledged_not_applied: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.state == "finished" and not self.duplicates and not self.acknowledged_not_applied

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "rounds": self.rounds, "final_accuracy": self.final_accuracy,
                "wall_seconds": self.wall_seconds, "applied": self.applied, "duplicates": self.duplicates,
                "acknowledged": self.acknowledged, "acknowledged_not_applied": self.acknowledged_not_applied,
                "faults": self.faults, "passed": self.passed}


class _Mosquitto:
    """Mosquitto with persistence on a loopback port; started when it says it is running."""

    def __init__(self, workdir: Path, port: int) -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "")
        if not binary:
            raise ConfigError("chaos", "the chaos run needs Mosquitto (apt-get install mosquitto)")
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.config = workdir / "mosquitto.conf"
        self.config.write_text("\n".join([
            f"user {getpass.getuser()}", f"listener {port} 127.0.0.1", "allow_anonymous true",
            "persistence true", f"persistence_location {workdir}/", "autosave_interval 5",
            "max_queued_messages 100000", "max_inflight_messages 0", "max_packet_size 67108864",
            "log_dest stdout", "log_type error", "log_type warning", "log_type notice", "log_type information",
        ]) + "\n")

    async def start(self) -> None:
        # Mosquitto block-buffers stdout on a pipe; stdbuf makes it line-buffered so that its
        # "running" line is seen when it is written.
        stdbuf = shutil.which("stdbuf")
        launcher = [stdbuf, "-oL"] if stdbuf else []
        self.process = await asyncio.create_subprocess_exec(
            *launcher, self.binary, "-c", str(self.config), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent)
        assert self.process.stdout is not None
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115, ASYNC230 (closed by the drain task)
        running = False
        async with asyncio.timeout(30):
            while line := await self.process.stdout.readline():
                log.write(line)
                if b" running" in line:
                    running = True
                    break
        if not running:
            log.close()
            raise JobError("chaos", f"mosquitto exited while starting (see {self.workdir}/mosquitto.log)")
        self._drain = asyncio.create_task(_drain(self.process.stdout, log), name="chaos-mosquitto-log")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)  # a clean stop: Mosquitto saves its persistence file
            async with asyncio.timeout(30):
                await process.wait()
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)


async def _drain(stream: asyncio.StreamReader, log: Any) -> None:
    try:
        while line := await stream.readline():
            log.write(line)
    finally:
        log.close()


def _die_with_parent() -> None:
    """In a child, before exec: the kernel kills it if the harness dies (Linux), so that a killed
    harness leaves no devices or broker behind."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Fleet:
    """The job's processes: one aggregator, N devices, restartable."""

    def __init__(self, options: ChaosOptions, url: str) -> None:
        self.options = options
        self.url = url
        self.out = options.out_dir
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.environment = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.devices: dict[int, subprocess.Popen[bytes]] = {}
        self.job = f"chaos-{options.mode}"
        self._write_job()

    def _write_job(self) -> None:
        o = self.options
        lines: dict[str, dict[str, Any]] = {
            "job": {"name": self.job, "rounds": o.rounds, "seed": o.seed, "fraction": 1.0,
                    "min_devices": max(1, math.ceil(o.devices / 2)), "round_deadline": o.round_deadline,
                    "min_fraction": 0.5, "max_retries": 3, "heartbeat_timeout": o.heartbeat_timeout,
                    "wait_for_devices": 600.0, "mode": o.mode},
            "model": {"source": o.model},
            "train": {"epochs": o.epochs, "batch_size": o.batch_size, "learning_rate": o.learning_rate},
            "evaluation": {"dataset": o.dataset, "num_examples": o.eval_examples},
            "checkpoint": {"dir": str(self.out / "checkpoint")},
            "broker": {"url": self.url, "keepalive": o.keepalive},
        }
        if o.mode == "ssp":
            lines["job"]["staleness_bound"] = o.staleness_bound
        if o.data_dir:
            lines["evaluation"]["data_dir"] = o.data_dir
        (self.out / "job.toml").write_text(_toml(lines))

    def write_devices(self, shards: list[Dataset]) -> None:
        o = self.options
        for index, shard in enumerate(shards):
            data = self.out / "parts" / f"device_{index:03d}.npz"
            data.parent.mkdir(parents=True, exist_ok=True)
            save_partition(data, shard)
            (self.out / f"device_{index:03d}.toml").write_text(_toml({
                "device": {"id": f"device-{index:03d}", "job": self.job, "data": str(data), "model": o.model,
                           "heartbeat_interval": o.heartbeat_interval, "ack_timeout": 10.0, "model_wait": 10.0},
                "broker": {"url": self.url, "keepalive": o.keepalive},
            }))

    def _spawn(self, arguments: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.logs / log, "ab") as handle:
            return subprocess.Popen([sys.executable, "-m", "unus_edge.cli", *arguments], stdout=handle,
                                    stderr=subprocess.STDOUT, env=self.environment, preexec_fn=_die_with_parent)

    def start_aggregator(self) -> None:
        self.aggregator = self._spawn(["aggregator", "--config", str(self.out / "job.toml")], "aggregator.log")

    def start_device(self, index: int) -> None:
        self.devices[index] = self._spawn(["device", "--config", str(self.out / f"device_{index:03d}.toml"),
                                           "--exit-when-finished"], f"device_{index:03d}.log")

    def kill(self, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for process in [self.aggregator, *self.devices.values()]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _toml(document: dict[str, dict[str, Any]]) -> str:
    out = []
    for section, values in document.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        out.append("")
    return "\n".join(out)


class _Progress:
    """Follows the job on its retained metrics topics, straight from the broker (not the proxy)."""

    def __init__(self, job: str, rounds: int, port: int) -> None:
        self.job = job
        self.rounds = rounds
        self.port = port
        self.fraction = 0.0
        self.state = "waiting"
        self.history: dict[int, dict[str, Any]] = {}
        self.changed = asyncio.Event()

    async def follow(self) -> None:
        options = ConnectOptions(port=self.port, reconnect_min_delay=0.2, reconnect_max_delay=2.0,
                                 retry_first_connect=True)
        async with MqttTransport(options) as transport:
            await transport.subscribe(topics.metrics(self.job, "round"))
            await transport.subscribe(topics.metrics(self.job, "job"))
            async for message in transport.messages():
                _, decoded = decode_message(message.payload, Channel.METRICS)
                if isinstance(decoded, RoundMetrics):
                    self.history[decoded.server_round] = dict(decoded.body())
                    self.fraction = max(self.fraction, decoded.server_round / self.rounds)
                elif isinstance(decoded, JobMetrics):
                    self.state = decoded.state
                    self.fraction = max(self.fraction, decoded.server_round / self.rounds)
                self.changed.set()

    async def reached(self, fraction: float) -> None:
        while self.fraction < fraction and self.state not in ("finished", "failed"):
            self.changed.clear()
            await self.changed.wait()


async def run_chaos(options: ChaosOptions) -> ChaosReport:
    """Run the job under faults (or, with ``faults=False``, without) and audit it."""
    started = time.perf_counter()
    out = options.out_dir
    if out.exists() and any(out.iterdir()):
        raise ConfigError("chaos.out_dir", f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(options.seed)
    data = load_dataset(options.dataset, "train", data_dir=options.data_dir or None, seed=options.seed,
                        num_examples=options.train_examples or None)
    shards = [Dataset(data.x[i], data.y[i], data.num_classes)
              for i in partition(data.y, options.devices, "iid", seed=options.seed)]
    broker = _Mosquitto(out, _free_port())
    await broker.start()
    proxy = FaultProxy("127.0.0.1", broker.port, cut_interval=options.cut_interval if options.faults else 0.0,
                       hold_fraction=options.hold_fraction, hold_seconds=3 * options.keepalive, seed=options.seed)
    await proxy.start()
    fleet = _Fleet(options, f"mqtt://127.0.0.1:{proxy.port}")
    fleet.write_devices(shards)
    progress = _Progress(fleet.job, options.rounds, broker.port)
    follower = asyncio.create_task(progress.follow(), name="chaos-progress")
    counts = {"device_kills": 0, "aggregator_kills": 0, "broker_restarts": 0}
    report = ChaosReport()
    try:
        fleet.start_aggregator()
        for index in range(options.devices):
            fleet.start_device(index)
        schedule: list[tuple[float, str]] = []
        if options.faults:
            kills = options.aggregator_kills
            schedule += [(0.25 + 0.4 * k / max(1, kills), "aggregator") for k in range(kills)]
            schedule += [(0.45 + 0.2 * k, "broker") for k in range(options.broker_restarts)]
            count = max(1, round(options.device_kill_fraction * options.devices))
            victims = rng.sample(range(options.devices), count)
            schedule += [(rng.uniform(0.1, 0.85), f"device:{index}") for index in victims]
        async with asyncio.timeout(options.timeout):
            for point, fault in sorted(schedule):
                await progress.reached(point)
                if progress.state in ("finished", "failed"):
                    break
                logger.warning("chaos at %.0f%% of the job: %s", 100 * progress.fraction, fault)
                if fault == "aggregator":
                    fleet.kill(fleet.aggregator)
                    counts["aggregator_kills"] += 1
                    fleet.start_aggregator()
                elif fault == "broker":
                    await broker.stop()
                    await broker.start()
                    counts["broker_restarts"] += 1
                else:
                    index = int(fault.split(":")[1])
                    fleet.kill(fleet.devices.get(index))
                    counts["device_kills"] += 1
                    fleet.start_device(index)
            while True:  # the aggregator process may have been restarted: wait for the job's end
                assert fleet.aggregator is not None
                status = await asyncio.to_thread(fleet.aggregator.wait)
                if status == 0 or progress.state in ("finished", "failed"):
                    break
                logger.warning("the aggregator exited with status %d; restarting it", status)
                fleet.start_aggregator()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):  # devices leave on the job's "finished" clock
                    await asyncio.gather(*(asyncio.to_thread(p.wait) for p in fleet.devices.values()))
    finally:
        fleet.stop_all()
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await proxy.stop()
        await broker.stop()
    report.state = progress.state
    report.history = [progress.history[k] for k in sorted(progress.history)]
    report.rounds = max(progress.history, default=0)
    report.final_accuracy = report.history[-1].get("eval_accuracy") if report.history else None
    report.wall_seconds = time.perf_counter() - started
    counts.update(cuts=proxy.stats.cuts, holds=proxy.stats.holds, proxy_connections=proxy.stats.connections)
    report.faults = counts
    _audit(report, out)
    (out / "chaos-report.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report


def _audit(report: ChaosReport, out: Path) -> None:
    applied = read_audit(out / "checkpoint")
    report.applied = len(applied)
    seen: set[str] = set()
    steps: set[tuple[str, int]] = set()
    for entry in applied:
        key = (str(entry["device_id"]), int(entry["step"]))
        if entry["msg_id"] in seen or key in steps:
            report.duplicates.append(f"{entry['msg_id']} ({key[0]} step {key[1]})")
        seen.add(str(entry["msg_id"]))
        steps.add(key)
    acknowledged = set()
    for log in (out / "logs").glob("device_*.log"):
        acknowledged |= {match.group(1) for match in _ACKED.finditer(log.read_text(errors="replace"))}
    report.acknowledged = len(acknowledged)
    report.acknowledged_not_applied = sorted(acknowledged - seen)
