"""Federated evaluation: devices evaluate the global model on held-out examples (issue 16)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.unit.test_service_memory import config, make_aggregator, make_device, run, run_device, shards
from unus_edge import topics
from unus_edge.aggregator import JobResult
from unus_edge.data import holdout_split
from unus_edge.messages import EvaluateTask, FederatedMetrics, decode_message
from unus_edge.topics import Channel
from unus_edge.transport import MemoryBroker


class NeverBusy(asyncio.Event):
    """The deaf device's idle flag: it never has an evaluation to finish before it leaves."""

    def clear(self) -> None:
        return None


class Deaf(asyncio.Queue[EvaluateTask]):
    """A device that never answers evaluation requests (it still trains)."""

    def put_nowait(self, item: EvaluateTask) -> None:
        self.ignored = getattr(self, "ignored", 0) + 1


def federated_job(num_devices: int, *, deaf: int = -1, **extra: Any) -> tuple[JobResult, MemoryBroker, int]:
    async def scenario() -> tuple[JobResult, MemoryBroker, int]:
        broker = MemoryBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=num_devices, **extra))
        devices = []
        for index, shard in enumerate(shards(num_devices)):
            train, held_out = holdout_split(shard, 0.2, index)
            device = make_device(broker, f"d{index}", train)
            device.held_out = held_out
            if index == deaf:
                device.evaluations = Deaf()
                device.evaluations_idle = NeverBusy()
                device.evaluations_idle.set()
            devices.append(device)
        running = [asyncio.create_task(run_device(d)) for d in devices]
        async with aggregator.transport:
            result = await aggregator.run()
        await asyncio.gather(*running)
        ignored = getattr(devices[deaf].evaluations, "ignored", 0) if deaf >= 0 else 0
        return result, broker, ignored

    outcome: tuple[JobResult, MemoryBroker, int] = run(scenario, timeout=120)
    return outcome


def test_every_round_is_evaluated_on_the_devices_and_combined() -> None:
    result, broker, _ = federated_job(3, evaluation__mode="both", evaluation__federated_fraction=1.0)
    assert result.state == "finished"
    assert [m.server_round for m in result.federated] == [1, 2]
    assert [m.version for m in result.federated] == [m.version for m in result.history]  # the model just published
    for metrics in result.federated:
        assert (metrics.num_selected, metrics.num_answered, metrics.num_failures) == (3, 3, 0)
        assert metrics.num_examples == 120 and metrics.num_on_training_data == 0  # 3 x 20 % of 200 held out
        assert metrics.accuracy is not None and 0 <= metrics.accuracy_min <= metrics.accuracy <= metrics.accuracy_max  # type: ignore[operator]
    assert result.federated[-1].loss < result.federated[0].loss  # type: ignore[operator]
    retained = broker.retained[topics.metrics("memjob", "evaluation")]
    _, message = decode_message(retained.payload, Channel.METRICS)
    assert isinstance(message, FederatedMetrics) and message.server_round == 2
    assert result.history[-1].eval_accuracy is not None  # "both": the central evaluation too


def test_a_device_that_never_answers_is_counted_not_waited_for() -> None:
    result, _, ignored = federated_job(3, deaf=1, evaluation__mode="federated", evaluation__federated_fraction=1.0,
                                       evaluation__federated_timeout=1.5)
    assert result.state == "finished" and ignored == 2
    assert all((m.num_answered, m.num_failures) == (2, 1) for m in result.federated)
    assert all(m.duration_seconds >= 1.5 for m in result.federated)  # the answer waited for, until the timeout
    assert all(m.eval_accuracy is None for m in result.history)  # "federated": no central evaluation


def test_a_fraction_of_the_devices_is_asked_and_every_other_round_with_federated_every() -> None:
    result, _, _ = federated_job(4, evaluation__mode="federated", evaluation__federated_fraction=0.5,
                                 evaluation__federated_every=2, job__rounds=4)
    assert [m.server_round for m in result.federated] == [2, 4]
    assert all(m.num_selected == 2 and m.num_answered == 2 for m in result.federated)


def test_ssp_evaluates_on_the_devices_too() -> None:
    result, _, _ = federated_job(3, job__mode="ssp", job__staleness_bound="1", job__rounds=3,
                                 evaluation__mode="federated", evaluation__federated_fraction=1.0)
    assert result.state == "finished"
    assert result.federated, "no federated evaluation in SSP"
    assert all(m.num_answered + m.num_failures >= m.num_selected for m in result.federated)
    # the devices answer what they were asked before they leave (the last point may come too late)
    assert all(m.num_answered >= 1 and m.num_examples > 0 for m in result.federated[:-1])
    assert result.federated[0].num_answered == 3
