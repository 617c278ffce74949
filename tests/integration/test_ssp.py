"""Stale Synchronous Parallel over the embedded broker, with in-process and real device processes.

* s = 0 with full participation IS FedAvg: same global model as synchronous FedAvg.
* The SSP invariant (a device starts update c_i only when c_i <= c_min + s) holds over the whole
  log of a run with a straggler and a device killed with SIGKILL.
* No deadlock when the slowest device dies; a device that rejoins resumes at c_min.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import PYTHON, AmqttBroker, python_env
from unus_edge.aggregator import JobResult, run_aggregator
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings, JobConfig, load_job_config
from unus_edge.data import Dataset, load_dataset, partition, save_partition
from unus_edge.device import run_device
from unus_edge.profiles import SlowdownPace
from unus_edge.simulation import SimulationOptions, simulate

START = re.compile(r"ssp start device=(\S+) clock=(\d+) c_min=(\d+) bound=(\S+) version=(\d+)")


def job(url: str, **settings: object) -> JobConfig:
    overrides = ["job.name=ssp", "job.mode=ssp", "strategy.name=ssp", "model.source=mnist_2nn", "train.batch_size=20",
                 "train.learning_rate=0.05", "evaluation.dataset=synthetic", "evaluation.num_examples=300",
                 "job.wait_for_devices=60", f"broker.url={url}"]
    overrides += [f"{key.replace('__', '.')}={value}" for key, value in settings.items()]
    return load_job_config(environ={}, overrides=overrides)


# ------------------------------------------------------------------------------ s = 0 is FedAvg


def test_ssp_with_s_0_equals_synchronous_fedavg() -> None:
    def options(mode: str) -> SimulationOptions:
        settings = {"job__rounds": 3, "job__seed": 3}
        if mode == "ssp":
            settings |= {"job__staleness_bound": 0, "strategy__name": "ssp"}
        else:
            settings |= {"job__mode": "sync", "strategy__name": "fedavg"}
        return SimulationOptions(config=job("mqtt://127.0.0.1:1", **settings), num_devices=4, dataset="synthetic",
                                 train_examples=1200, scheme="dirichlet", alpha=1.0)

    async def both() -> tuple[JobResult, JobResult]:
        async with asyncio.timeout(240):
            return (await simulate(options("sync"))).result, (await simulate(options("ssp"))).result

    synchronous, ssp = asyncio.run(both())
    assert synchronous.state == ssp.state == "finished"
    assert ssp.version == 12  # one version per applied update: 4 devices x 3 clocks
    worst = max(float(np.max(np.abs(ssp.params[n] - synchronous.params[n]))) for n in synchronous.params)
    assert worst <= 1e-6, worst  # in practice bit-identical: the same float64 fold


# ------------------------------------------------------------------------------ runs with processes


@dataclass
class Run:
    starts: list[tuple[str, int, int, int | None]] = field(default_factory=list)
    result: JobResult | None = None
    changed: asyncio.Event | None = None

    def add(self, line: str) -> tuple[str, int, int] | None:
        match = START.search(line)
        if match is None:
            return None
        device, clock, c_min, bound = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        self.starts.append((device, clock, c_min, None if bound == "inf" else int(bound)))
        if self.changed is not None:
            self.changed.set()
        return device, clock, c_min

    async def reached(self, device_id: str, clock: int) -> None:
        """Wait (on log events, not a timer) until ``device_id`` starts update ``clock``."""
        self.changed = asyncio.Event()
        while not any(device == device_id and c >= clock for device, c, *_ in self.starts):
            self.changed.clear()
            await self.changed.wait()


class _Collector(logging.Handler):
    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        self.run.add(record.getMessage())


def shards(count: int, examples: int = 1600) -> list[Dataset]:
    data = load_dataset("synthetic", "train", seed=0, num_examples=examples)
    return [Dataset(data.x[i], data.y[i], data.num_classes) for i in partition(data.y, count, "iid", seed=0)]


def device_config(url: str, index: int, data: str = "memory") -> DeviceConfig:
    return DeviceConfig(DeviceSettings(id=f"dev-{index}", job="ssp", data=data, model="mnist_2nn",
                                       heartbeat_interval=0.5), BrokerSettings(url=url))


async def start_process(tmp_path: Path, url: str, index: int, shard: Dataset) -> asyncio.subprocess.Process:
    data = tmp_path / f"dev-{index}.npz"
    if not data.exists():
        save_partition(data, shard)
    config = tmp_path / f"dev-{index}.toml"
    config.write_text(f'[device]\nid = "dev-{index}"\njob = "ssp"\ndata = "{data}"\nmodel = "mnist_2nn"\n'
                      f'heartbeat_interval = 0.5\n\n[broker]\nurl = "{url}"\n')
    return await asyncio.create_subprocess_exec(PYTHON, "-m", "unus_edge.cli", "device", "--config", str(config),
                                                "--exit-when-finished", stderr=asyncio.subprocess.PIPE,
                                                env=python_env())


async def kill_when(
    process: asyncio.subprocess.Process, run: Run, clock: int, aggregator: asyncio.Task[object]
) -> None:
    """Follow a device process's log; SIGKILL it when it starts update ``clock``.

    Races the aggregator: if the job fails first, its error surfaces here at once.
    """
    assert process.stderr is not None

    async def watch() -> None:
        while line := (await process.stderr.readline()).decode():  # type: ignore[union-attr]
            seen = run.add(line)
            if seen is not None and seen[1] >= clock:
                process.send_signal(signal.SIGKILL)
                await process.wait()
                return
        raise AssertionError(f"the device process exited before clock {clock} (status {process.returncode})")

    watcher = asyncio.create_task(watch())
    done, _ = await asyncio.wait({watcher, aggregator}, return_when=asyncio.FIRST_COMPLETED)
    if watcher not in done:
        watcher.cancel()
        aggregator.result()  # raises the job's error
        raise AssertionError("the job ended before the device could be killed")
    watcher.result()


def reap(*processes: asyncio.subprocess.Process) -> None:
    for process in processes:
        if process.returncode is None:
            process.kill()


async def follow(process: asyncio.subprocess.Process, run: Run) -> None:
    assert process.stderr is not None
    while line := (await process.stderr.readline()).decode():
        run.add(line)
    await process.wait()


def check_invariant(run: Run) -> None:
    assert run.starts, "no SSP start was logged"
    for device, clock, c_min, bound in run.starts:
        assert bound is None or clock <= c_min + bound, f"{device} started clock {clock} with c_min {c_min}, s {bound}"
    for device in {start[0] for start in run.starts}:
        clocks = [start[1] for start in run.starts if start[0] == device]
        assert clocks == sorted(clocks), f"{device} went back in time: {clocks}"


@pytest.fixture
def ssp_log() -> Run:
    run = Run()
    handler = _Collector(run)
    logger = logging.getLogger("unus_edge.device.ssp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield run
    logger.removeHandler(handler)


@pytest.mark.slow
def test_invariant_holds_with_a_straggler_and_a_killed_device(tmp_path: Path, ssp_log: Run) -> None:
    async def scenario() -> None:
        broker = AmqttBroker()
        await broker.start()
        try:
            parts = shards(4)
            config = job(broker.url, job__staleness_bound=1, job__rounds=6, job__min_devices=4)
            aggregator = asyncio.create_task(run_aggregator(config, resume=False))
            devices = [asyncio.create_task(run_device(device_config(broker.url, i), dataset=parts[i],
                                                      exit_when_finished=True,
                                                      pace=SlowdownPace(4.0) if i == 0 else None))
                       for i in range(3)]
            victim = await start_process(tmp_path, broker.url, 3, parts[3])
            try:
                async with asyncio.timeout(180):
                    await kill_when(victim, ssp_log, 2, aggregator)
                    ssp_log.result = await aggregator
                    await asyncio.gather(*devices)
            finally:
                reap(victim)
        finally:
            await broker.stop()

    asyncio.run(scenario())
    assert ssp_log.result is not None
    assert ssp_log.result.state == "finished"
    check_invariant(ssp_log)
    # The straggler held the others back: nobody ran more than s = 1 ahead of it.
    assert max(clock for device, clock, *_ in ssp_log.starts if device != "dev-3") <= 6


@pytest.mark.slow
def test_no_deadlock_when_the_slowest_device_dies(tmp_path: Path, ssp_log: Run) -> None:
    async def scenario() -> None:
        broker = AmqttBroker()
        await broker.start()
        try:
            parts = shards(3)
            config = job(broker.url, job__staleness_bound=0, job__rounds=4, job__min_devices=3)
            aggregator = asyncio.create_task(run_aggregator(config, resume=False))
            devices = [asyncio.create_task(run_device(device_config(broker.url, i), dataset=parts[i],
                                                      exit_when_finished=True)) for i in range(2)]
            slowest = await start_process(tmp_path, broker.url, 2, parts[2])
            try:
                async with asyncio.timeout(120):
                    await kill_when(slowest, ssp_log, 1, aggregator)  # dies during its second update
                    ssp_log.result = await aggregator
                    await asyncio.gather(*devices)
            finally:
                reap(slowest)
        finally:
            await broker.stop()

    asyncio.run(scenario())
    assert ssp_log.result is not None
    assert ssp_log.result.state == "finished"
    check_invariant(ssp_log)
    assert {clock for device, clock, *_ in ssp_log.starts if device == "dev-0"} == {0, 1, 2, 3}


REJOIN = re.compile(r"device dev-1 rejoins at c_min = (\d+)")


@pytest.mark.slow
def test_a_device_that_rejoins_resumes_at_c_min(tmp_path: Path, ssp_log: Run, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="unus_edge.aggregator")

    async def scenario() -> None:
        broker = AmqttBroker()
        await broker.start()
        try:
            parts = shards(2)
            # Enough clocks that the job is still running when the device comes back.
            config = job(broker.url, job__staleness_bound="inf", job__rounds=30, job__min_devices=2)
            aggregator = asyncio.create_task(run_aggregator(config, resume=False))
            steady = asyncio.create_task(run_device(device_config(broker.url, 0), dataset=parts[0],
                                                    exit_when_finished=True, pace=SlowdownPace(2.0)))
            first = await start_process(tmp_path, broker.url, 1, parts[1])
            back: asyncio.subprocess.Process | None = None
            try:
                async with asyncio.timeout(180):
                    await kill_when(first, ssp_log, 0, aggregator)
                    await ssp_log.reached("dev-0", 3)
                    back = await start_process(tmp_path, broker.url, 1, parts[1])
                    await follow(back, ssp_log)
                    ssp_log.result = await aggregator
                    await steady
            finally:
                reap(first, *([back] if back else []))
        finally:
            await broker.stop()

    asyncio.run(scenario())
    assert ssp_log.result is not None
    assert ssp_log.result.state == "finished"
    check_invariant(ssp_log)
    rejoined = [(clock, c_min) for device, clock, c_min, _ in ssp_log.starts if device == "dev-1"][1:]
    assert rejoined, "the rejoining device never started"
    first_clock, first_c_min = rejoined[0]
    placed = [int(m.group(1)) for r in caplog.records if (m := REJOIN.search(r.getMessage()))]
    assert len(placed) == 1, placed
    assert first_clock >= 3  # it did not start over at 0 ...
    assert first_clock == placed[0]  # ... but at the aggregator's c_min when it came back.
    # Its own view of c_min comes from the retained clock, which may still be in flight when the
    # registration reply (with the clock) arrives: a view that lags is safe (the gate only gets
    # stricter), one ahead of the aggregator's would not be.
    assert first_c_min <= first_clock
