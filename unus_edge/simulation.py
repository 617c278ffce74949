"""A whole federation on one machine: broker, aggregator and N devices (``unus-edge simulate``).

Nothing is faked: the devices speak MQTT to a real broker (the embedded amqtt by default, or
any ``mqtt://`` URL) exactly as Raspberry Pis would. By default the devices are asyncio tasks
in this process; with ``processes=True`` each one is a real ``unus-edge device`` process that
reads its partition from an ``.npz`` file; with ``device_hosts=K`` the fleet is split over K
processes that each run their slice as in-process devices (:mod:`unus_edge._device_host`), the
layout for fleets of thousands: the aggregator (and the embedded broker, if used) keeps this
process to itself.

Outputs, in ``out_dir``: ``metrics.json`` and ``metrics.csv`` (one row per round),
``metrics.png`` (accuracy and loss against round; needs matplotlib) and ``model.onnx`` (the
final global model).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from unus_edge._device_host import HostReport, read_report, write_host
from unus_edge._paced_device import profile_to_json, read_pace_report
from unus_edge.aggregator import JobResult, RoundProgress, run_aggregator
from unus_edge.broker import EmbeddedBroker
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings, JobConfig
from unus_edge.data import Dataset, holdout_split, load_dataset, partition, save_partition
from unus_edge.device import Pace, run_device
from unus_edge.errors import ConfigError
from unus_edge.messages import RoundMetrics
from unus_edge.onnx_io import read_parameters, save_model
from unus_edge.profiles import DeviceProfile, ProfilePace, SlowdownPace, workload_cost
from unus_edge.zoo import resolve_model

__all__ = ["SimulationOptions", "SimulationReport", "simulate", "stragglers"]

logger = logging.getLogger("unus_edge.simulation")


@dataclass(frozen=True)
class SimulationOptions:
    config: JobConfig
    num_devices: int = 10
    dataset: Literal["mnist", "synthetic", "digits"] = "mnist"
    data_dir: str = ""
    scheme: Literal["iid", "shards", "dirichlet"] = "iid"
    alpha: float = 0.5
    train_examples: int = 0
    """Use only the first N training examples (0: all)."""
    embedded_broker: bool = True
    processes: bool = False
    device_hosts: int = 0
    """Run the devices in this many processes, each hosting its share as in-process devices
    (0: in this process, or one process each with ``processes``)."""
    out_dir: Path | None = None
    device_settings: DeviceSettings = field(default_factory=DeviceSettings)
    slowdowns: dict[int, float] = field(default_factory=dict)
    """Device index -> compute slowdown factor (stragglers): with ``profiles``, their profile that
    many times slower; without, they stay busy ``factor - 1`` times each training's own CPU time
    (:class:`~unus_edge.profiles.SlowdownPace`)."""
    profiles: list[DeviceProfile] | None = None
    """A profile per device (:mod:`unus_edge.profiles`), which paces its trainings and transfers
    (with ``processes``, each device process runs :mod:`unus_edge._paced_device`); stragglers
    (``slowdowns``) then get their profile that many times slower. None: the devices run at the
    host's speed (stragglers wait out extra CPU time)."""
    compute_slots: int | None = None
    """In-process devices: how many may train at once (default: the usable cores; 0: no limit).

    In-process devices share one interpreter, hence one GIL: more concurrent trainings than
    cores only add switching and cache misses (docs/engine.md, "Training under contention").
    Ignored with ``processes``, whose devices each have their own interpreter.
    """


@dataclass(frozen=True)
class SimulationReport:
    result: JobResult
    num_devices: int
    out_dir: Path | None
    plot: Path | None
    paces: tuple[ProfilePace, ...] = ()
    """The devices' paces (with ``profiles``): their trainings and overruns (a device process's as
    it reported them at exit)."""
    hosts: tuple[HostReport, ...] = ()
    """With ``device_hosts``: each host's counters (devices, failures, registrations sent)."""

    @property
    def pace_overruns(self) -> tuple[int, int]:
        """(trainings the host computed more slowly than the profile asked, trainings)."""
        return sum(p.overruns for p in self.paces), sum(p.trainings for p in self.paces)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def stragglers(spec: str, num_devices: int, seed: int) -> dict[int, float]:
    """``"0.2:5"``: a seeded 20% of the devices (at least one) become 5 times slower."""
    fraction_text, colon, factor_text = spec.partition(":")
    try:
        fraction, factor = float(fraction_text), float(factor_text)
    except ValueError:
        raise ConfigError("--stragglers", f"expected FRACTION:FACTOR such as 0.2:5, got {spec!r}") from None
    if not colon or not 0 <= fraction <= 1 or factor < 1:
        raise ConfigError("--stragglers", f"FRACTION in [0, 1] and FACTOR >= 1, got {spec!r}")
    count = min(num_devices, max(1, round(fraction * num_devices))) if fraction > 0 else 0
    chosen = np.random.default_rng([seed, 0x57A6]).choice(num_devices, size=count, replace=False)
    return {int(index): factor for index in sorted(chosen)}


def _device_config(options: SimulationOptions, index: int, broker: BrokerSettings, data: str) -> DeviceConfig:
    config = options.config
    settings = replace(options.device_settings, id=f"device-{index:03d}", job=config.job.name, data=data,
                       model=config.model.source, model_seed=config.model.seed)
    return DeviceConfig(device=settings, broker=broker)


def _write_device_files(options: SimulationOptions, shards: list[Dataset], broker: BrokerSettings) -> list[Path]:
    assert options.out_dir is not None
    configs = []
    for index, shard in enumerate(shards):
        data = options.out_dir / "partitions" / f"device_{index:03d}.npz"
        data.parent.mkdir(parents=True, exist_ok=True)
        save_partition(data, shard)
        device = _device_config(options, index, broker, str(data)).device
        path = options.out_dir / "devices" / f"device_{index:03d}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["[device]"] + [f"{key} = {json.dumps(value)}" for key, value in vars(device).items()]
        lines += ["", "[broker]", f"url = {json.dumps(broker.url)}"]
        path.write_text("\n".join(lines) + "\n")
        configs.append(path)
    return configs


def _pace_path(out_dir: Path, index: int) -> Path:
    return out_dir / "paces" / f"device_{index:03d}.json"


def _device_command(config: Path, index: int, out_dir: Path, paces: list[ProfilePace],
                    slowdowns: dict[int, float]) -> list[str]:
    """``unus-edge device``, or the paced wrapper (:mod:`unus_edge._paced_device`) for a device
    with a profile or a straggler's slowdown."""
    if not paces and index not in slowdowns:
        return [sys.executable, "-m", "unus_edge.cli", "device", "--config", str(config), "--exit-when-finished"]
    report = _pace_path(out_dir, index)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    pacing = (["--profile", profile_to_json(paces[index].profile), "--cost", repr(paces[index].cost)] if paces
              else ["--slowdown", repr(slowdowns[index])])
    return [sys.executable, "-m", "unus_edge._paced_device", "--config", str(config), *pacing,
            "--report", str(report)]


def _host_commands(options: SimulationOptions, shards: list[Dataset], config: JobConfig) -> list[list[str]]:
    """Write each device host's files; return the commands that start them."""
    assert options.out_dir is not None
    folder, hosts = options.out_dir / "hosts", options.device_hosts
    slots = 1 if options.compute_slots is None else options.compute_slots  # one interpreter each
    commands = []
    for host in range(hosts):
        first, last = host * len(shards) // hosts, (host + 1) * len(shards) // hosts
        path = write_host(folder, host, first, shards[first:last], _device_config(options, first, config.broker, "-"))
        report = folder / f"report_{host}.json"
        report.unlink(missing_ok=True)
        commands.append([sys.executable, "-m", "unus_edge._device_host", "--config", str(path), "--layout",
                         str(path.with_suffix(".json")), "--report", str(report), "--compute-slots", str(slots),
                         *(["--quiet"] if last - first > 100 else [])])
    return commands


async def _run_processes(commands: list[list[str]], names: list[str], out_dir: Path, finished: asyncio.Event) -> None:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    processes = []
    for command, name in zip(commands, names, strict=True):
        # A small local log file per process, created before the process starts; closed below.
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115, ASYNC230
        process = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=subprocess.STDOUT,
                                                       env=environment)
        processes.append((process, log))
    try:
        await finished.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*(process.wait() for process, _ in processes))
    finally:
        for process, log in processes:
            if process.returncode is None:
                process.terminate()
                await process.wait()
            log.close()


async def simulate(
    options: SimulationOptions,
    *,
    on_round: Callable[[RoundMetrics], None] | None = None,
    on_progress: Callable[[RoundProgress], None] | None = None,
    shutdown_trigger: asyncio.Event | None = None,
) -> SimulationReport:
    """Run the federation described by ``options``; return the job's result."""
    config = options.config
    if options.num_devices < 1:
        raise ConfigError("--devices", "must be at least 1")
    if options.compute_slots is not None and options.compute_slots < 0:
        raise ConfigError("--compute-slots", f"must be 0 (no limit) or more, not {options.compute_slots}")
    if (options.processes or options.device_hosts) and options.out_dir is None:
        raise ConfigError("--out", "is required with --processes or --device-hosts (partition files live there)")
    if options.device_hosts and (options.processes or options.profiles or options.slowdowns):
        raise ConfigError("--device-hosts", "runs plain devices: it cannot be combined with --processes, "
                                            "--device-profiles or --stragglers")
    if not 0 <= options.device_hosts <= options.num_devices:
        raise ConfigError("--device-hosts", f"must be between 0 and the {options.num_devices} devices, "
                                            f"not {options.device_hosts}")
    if options.profiles is not None and len(options.profiles) != options.num_devices:
        raise ConfigError("--device-profiles", f"{len(options.profiles)} profiles for {options.num_devices} devices")
    if config.evaluation.mode != "central" and not options.device_settings.holdout:
        options = replace(options, device_settings=replace(options.device_settings, holdout=0.1))
        logger.info("federated evaluation: each device keeps a tenth of its examples aside (device.holdout)")
    train = load_dataset(options.dataset, "train", data_dir=options.data_dir or None, seed=config.job.seed,
                         num_examples=options.train_examples or None)
    indices = partition(train.y, options.num_devices, options.scheme, seed=config.job.seed, alpha=options.alpha)
    shards = [Dataset(train.x[i], train.y[i], train.num_classes) for i in indices]
    del train
    logger.info("%d devices, %s partition of %d %s examples", options.num_devices, options.scheme,
                sum(len(s) for s in shards), options.dataset)
    async with contextlib.AsyncExitStack() as stack:
        if options.embedded_broker:
            broker = await stack.enter_async_context(EmbeddedBroker("127.0.0.1", 0))
            config = replace(config, broker=replace(config.broker, url=broker.url))
        config = replace(config, job=replace(config.job, min_devices=max(config.job.min_devices,
                                                                          options.num_devices)))
        finished = asyncio.Event()
        devices: list[asyncio.Task[object]] = []
        paces = _paces(options, config)
        if options.device_hosts:
            assert options.out_dir is not None
            commands = _host_commands(options, shards, config)
            del shards  # the hosts have their own copies; the aggregator's process should not hold them
            devices.append(asyncio.create_task(
                _run_processes(commands, [f"host_{h}" for h in range(len(commands))], options.out_dir, finished),
                name="simulation-device-hosts"))
        elif options.processes:
            assert options.out_dir is not None
            paths = _write_device_files(options, shards, config.broker)
            commands = [_device_command(path, index, options.out_dir, paces, options.slowdowns)
                        for index, path in enumerate(paths)]
            devices.append(asyncio.create_task(_run_processes(commands, [path.stem for path in paths],
                                                              options.out_dir, finished),
                                               name="simulation-device-processes"))
        else:
            slots = usable_cores() if options.compute_slots is None else options.compute_slots
            compute_slots = asyncio.Semaphore(slots) if slots > 0 else None
            for index, shard in enumerate(shards):
                device_config = _device_config(options, index, config.broker, "memory")
                train, held_out = holdout_split(shard, device_config.device.holdout, device_config.device.model_seed)
                devices.append(asyncio.create_task(
                    run_device(device_config, dataset=train, held_out=held_out, exit_when_finished=True,
                               shutdown_trigger=finished,
                               compute_slots=compute_slots, pace=_pace(paces, options.slowdowns, index)),
                    name=f"simulation-{device_config.device.id}"))
        try:
            result = await run_aggregator(config, on_round=on_round, on_progress=on_progress,
                                          shutdown_trigger=shutdown_trigger, resume=False)
        finally:
            finished.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await asyncio.gather(*devices, return_exceptions=True)
            for task in devices:
                task.cancel()
    plot = _write_outputs(options.out_dir, config, result) if options.out_dir else None
    if options.processes and paces:
        assert options.out_dir is not None
        paces = [read_pace_report(_pace_path(options.out_dir, index), pace.profile, pace.cost)
                 for index, pace in enumerate(paces)]
    hosts: tuple[HostReport, ...] = ()
    if options.device_hosts:
        assert options.out_dir is not None
        bounds = [h * options.num_devices // options.device_hosts for h in range(options.device_hosts + 1)]
        hosts = tuple(read_report(options.out_dir / "hosts" / f"report_{h}.json", bounds[h + 1] - bounds[h])
                      for h in range(options.device_hosts))
    return SimulationReport(result, options.num_devices, options.out_dir, plot, tuple(paces), hosts)


def _pace(paces: list[ProfilePace], slowdowns: dict[int, float], index: int) -> Pace | None:
    """An in-process device's pace: its profile's, a straggler's slowdown without profiles, or none."""
    if paces:
        return paces[index]
    return SlowdownPace(slowdowns[index]) if index in slowdowns else None


def _paces(options: SimulationOptions, config: JobConfig) -> list[ProfilePace]:
    """A pace per in-process device from its profile (a straggler's made slower), or none."""
    if not options.profiles:
        return []
    parameters = sum(int(v.size) for v in read_parameters(resolve_model(config.model.source,
                                                                         seed=config.model.seed)).values())
    cost = workload_cost(parameters, config.train.batch_size)
    return [ProfilePace(profile.scaled(options.slowdowns[index]) if index in options.slowdowns else profile, cost)
            for index, profile in enumerate(options.profiles)]


def _write_outputs(out_dir: Path, config: JobConfig, result: JobResult) -> Path | None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(m.body()) for m in result.history]
    summary = {
        "job": result.job, "state": result.state, "rounds": result.rounds, "wall_seconds": result.wall_seconds,
        "final_accuracy": result.final_accuracy, "final_loss": result.final_loss, "bytes_up": result.bytes_up,
        "bytes_down": result.bytes_down, "rejected": result.rejected,
        "strategy": config.strategy.resolved(config.job.mode),
        "model": config.model.source,
    }
    federated = [dict(m.body()) for m in result.federated]
    (out_dir / "metrics.json").write_text(json.dumps({"summary": summary, "rounds": rows, "federated": federated},
                                                     indent=2))
    columns = ["server_round", "version", "num_selected", "num_updates", "num_failures", "num_examples",
               "duration_seconds", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down"]
    with open(out_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    save_model(resolve_model(config.model.source, seed=config.model.seed), out_dir / "model.onnx", result.params)
    title = f"{result.job}: {config.strategy.resolved(config.job.mode)}"
    return plot_history(result.history, out_dir / "metrics.png", title=title)


def plot_history(history: list[RoundMetrics], path: Path, *, title: str = "") -> Path | None:
    """Accuracy and loss against round, as a PNG; ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plot (pip install 'unus-edge[plot]')")
        return None
    rounds = [m.server_round for m in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rounds, [m.eval_accuracy for m in history], marker="o")
    left.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    left.grid(alpha=0.3)
    right.plot(rounds, [m.eval_loss for m in history], marker="o", label="test")
    right.plot(rounds, [m.train_loss for m in history], marker=".", label="train")
    right.set(xlabel="round", ylabel="loss", title="loss")
    right.legend()
    right.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
