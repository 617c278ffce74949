"""In-process devices share compute slots: at most K of them train at once.

In one interpreter the trainings share the GIL, so more concurrent trainings than cores cost
switching and cache misses, not speed (docs/engine.md, "Training under contention"). The
simulator hands its in-process devices one ``asyncio.Semaphore``; each holds it while training.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tests.unit.test_service_memory import config, make_aggregator, make_device, run, run_device, shards
from unus_edge.device import _worker
from unus_edge.errors import ConfigError
from unus_edge.simulation import SimulationOptions, simulate, usable_cores
from unus_edge.transport import MemoryBroker


async def run_job(num_devices: int, *, rounds: int, slots: asyncio.Semaphore | None = None) -> None:
    """A FedAvg job in memory; the devices share ``slots`` when given."""
    broker = MemoryBroker()
    aggregator = make_aggregator(broker, config(job__min_devices=num_devices, job__rounds=rounds))
    devices = [make_device(broker, f"d{i}", shard) for i, shard in enumerate(shards(num_devices))]
    if slots is not None:
        for device in devices:
            device.compute_slots = slots
    tasks = [asyncio.create_task(run_device(d)) for d in devices]
    async with aggregator.transport:
        result = await aggregator.run()
    await asyncio.gather(*tasks)
    assert result.state == "finished"


def test_devices_sharing_one_slot_never_train_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    slots = asyncio.Semaphore(1)
    lock = threading.Lock()
    inside = 0
    seen: list[tuple[int, bool]] = []  # (trainings inside at entry, slot held)
    original = _worker.train_task

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside
        with lock:
            inside += 1
            seen.append((inside, slots.locked()))
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(_worker, "train_task", counted)

    run(lambda: run_job(4, rounds=2, slots=slots))
    assert len(seen) == 8  # 4 devices x 2 rounds
    assert all(count == 1 and held for count, held in seen), seen


def test_without_slots_in_process_devices_train_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: with no slots shared, two devices are inside a training at the same moment."""
    both = threading.Barrier(2, timeout=30)
    original = _worker.train_task
    met: list[bool] = []

    def meet(*args: Any, **kwargs: Any) -> Any:
        if not met:
            both.wait()  # raises BrokenBarrierError if the other device never came
            met.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(_worker, "train_task", meet)

    run(lambda: run_job(2, rounds=1))
    assert met


def test_a_negative_slot_count_is_refused() -> None:
    options = SimulationOptions(config=config(), dataset="synthetic", compute_slots=-1)
    with pytest.raises(ConfigError, match="compute-slots"):
        asyncio.run(simulate(options))


def test_usable_cores_is_at_least_one() -> None:
    assert usable_cores() >= 1
