"""A device refuses a task it cannot carry out, with a reason, and keeps running.

Before, a bad ``config["client"]`` raised out of ``do_task`` and killed the daemon, and a
``package.module:Class`` in a task made the device import that module. Now the device half must
be a registered name (built in, or allowed by the device's own ``device.client_strategies``);
anything else is refused before training and the daemon takes the next task.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

import pytest

from tests.unit.test_service_memory import config, make_aggregator, make_device, run, run_device, shards
from unus_edge.aggregator import JobResult
from unus_edge.errors import ConfigError
from unus_edge.strategies import (
    CLIENT_STRATEGIES,
    Assignment,
    DeviceInfo,
    FedAvg,
    RoundContext,
    load_client_strategies,
)
from unus_edge.transport import MemoryBroker

BAD_CONFIGS = {
    "a module in the task": {"client": "this:ClientStrategy"},  # `import this` prints to stdout
    "an unknown name": {"client": "no-such-half"},
    "a setting of the wrong type": {"client": "fedprox", "proximal_mu": "lots"},
    "a momentum in text": {"momentum": "0.9"},  # was trained without momentum, silently
    "a seed that is not an integer": {"seed": 1.5},
    "a boolean weight decay": {"weight_decay": True},
}
REASONS = {"a module in the task": "unknown_client", "an unknown name": "unknown_client"}  # else bad_config


class BadFirstRound(FedAvg):
    """Round 1's tasks carry ``bad``; round 2's are FedAvg's own."""

    def __init__(self, bad: dict[str, object]) -> None:
        super().__init__()
        self.bad = bad

    def configure_round(self, context: RoundContext, devices: Sequence[DeviceInfo]) -> list[Assignment]:
        assignments = super().configure_round(context, devices)
        if context.server_round == 1:
            return [replace(a, config={**a.config, **self.bad}) for a in assignments]  # type: ignore[dict-item]
        return assignments


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_task_the_device_cannot_carry_out_is_refused_and_the_next_one_runs(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    already = "this" in sys.modules

    async def scenario() -> tuple[JobResult, int]:
        broker = MemoryBroker()
        aggregator = make_aggregator(broker, config(job__min_devices=1, job__round_deadline=1, job__min_fraction=0,
                                             job__allow_empty_rounds="true"),
                                     strategy=BadFirstRound(BAD_CONFIGS[case]))
        device = make_device(broker, "d0", shards(1)[0])
        task = asyncio.create_task(run_device(device))
        async with aggregator.transport:
            result = await aggregator.run()
        await task
        return result, device.updates_sent

    with caplog.at_level(logging.WARNING, logger="unus_edge.device"):
        result, sent = run(scenario)
    assert result.state == "finished"
    assert [m.num_updates for m in result.history] == [0, 1]  # refused in round 1, trained in round 2
    assert sent == 1
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    reason = REASONS.get(case, "bad_config")
    assert refusals and all(f"({reason})" in line for line in refusals), refusals
    assert ("this" in sys.modules) == already  # nothing was imported on the task's word


def test_the_devices_own_configuration_allows_more_halves() -> None:
    names = load_client_strategies("unus_edge.strategies._client:ClientStrategy")
    assert names == ["default", "unus_edge.strategies._client:ClientStrategy"]
    assert CLIENT_STRATEGIES["unus_edge.strategies._client:ClientStrategy"].name == "default"
    assert load_client_strategies("") == []


@pytest.mark.parametrize(("specs", "detail"), [
    ("just-a-name", "package.module:Class"),
    ("unus_edge.no_such_module:Half", "cannot import"),
    ("unus_edge.strategies._fedavg:FedAvg", "is not a ClientStrategy"),
])
def test_a_bad_allowed_half_fails_at_start(specs: str, detail: str) -> None:
    with pytest.raises(ConfigError, match=detail) as raised:
        load_client_strategies(specs)
    assert raised.value.key == "device.client_strategies"


def test_registration_retries_back_off_with_jitter_up_to_the_maximum() -> None:
    import random

    from unus_edge.config import DeviceSettings
    from unus_edge.device._register import registration_backoff

    settings = DeviceSettings(id="d0", job="j", registration_retry=15.0, registration_retry_max=240.0)
    for seed in range(20):
        backoff = registration_backoff(settings, rng=random.Random(seed))
        waits = [backoff.next_delay() for _ in range(8)]
        ceilings = [30.0, 60.0, 120.0, 240.0, 240.0, 240.0, 240.0, 240.0]
        assert all(ceiling / 2 <= wait <= ceiling for wait, ceiling in zip(waits, ceilings, strict=True)), waits
    first = {round(registration_backoff(settings, rng=random.Random(seed)).next_delay(), 3) for seed in range(20)}
    assert len(first) == 20  # a fleet's first retries do not fall on the same instant
