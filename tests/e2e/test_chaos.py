"""The short chaos run: a federated job survives cut connections, killed devices, a killed
aggregator and a restarted broker, with nothing lost and nothing applied twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.brokers import require_mosquitto
from unus_edge.chaos import ChaosOptions, ChaosReport, run_chaos

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


def short(out: Path, *, faults: bool, mode: str) -> ChaosReport:
    options = ChaosOptions(
        out_dir=out, devices=5, rounds=6, mode=mode, staleness_bound=2,  # type: ignore[arg-type]
        # Faults every 0.5 s on average: an SSP run now finishes in about 4 s, and with one every 2 s the
        # seeded schedule once fell entirely outside live links (0 cuts, 0 holds; 2026-12-04).
        train_examples=3000, eval_examples=500, faults=faults, cut_interval=0.5, hold_fraction=0.1,
        device_kill_fraction=0.2, aggregator_kills=1, broker_restarts=1, round_deadline=20.0, timeout=400,
    )
    return asyncio.run(run_chaos(options))


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_short_chaos_run(tmp_path: Path, mode: str) -> None:
    require_mosquitto()
    reference = short(tmp_path / "reference", faults=False, mode=mode)
    chaos = short(tmp_path / "chaos", faults=True, mode=mode)
    assert reference.passed, reference.as_dict()
    assert chaos.state == "finished", chaos.as_dict()
    assert chaos.duplicates == []  # every applied update is unique
    assert chaos.acknowledged_not_applied == []  # every update a device saw acknowledged was applied
    assert chaos.acknowledged > 0
    assert chaos.faults["aggregator_kills"] == 1
    assert chaos.faults["broker_restarts"] == 1
    assert chaos.faults["cuts"] + chaos.faults["holds"] > 0
    assert chaos.final_accuracy is not None
    assert reference.final_accuracy is not None
    assert abs(chaos.final_accuracy - reference.final_accuracy) <= 0.01, (chaos.history, reference.history)
