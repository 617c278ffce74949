"""The conformance kit (``unus-edge conformance``): the stock device passes it on both brokers,
and devices broken on purpose fail it at the step that checks what they break."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.brokers import PYTHON, MosquittoBroker, python_env, require_mosquitto
from unus_edge.conformance import STEPS, STOCK_DEVICE, CheckResult, run_conformance

STEP_NAMES = [name for name, _ in STEPS]

# Each broken device is the stock one with one rule switched off, started through a small script.
BROKEN = {
    "redelivered task": """
from unus_edge.device._daemon import Device
dispatch = Device._dispatch
def forgetful(self, message):
    self.done_tasks.clear()  # forgets which tasks it did: a redelivery is trained again
    dispatch(self, message)
Device._dispatch = forgetful
""",
    "SSP clock rule": """
from unus_edge.device import _worker
async def no_gate(device):  # starts whatever the clock says
    return None
_worker.wait_gate = no_gate
""",
    "re-publication until acknowledged": """
from unus_edge.device._daemon import Device
async def never(self):  # an unacknowledged update is never sent again
    return None
Device._republish = never
""",
}


def _broken_device(tmp_path: Path, rule: str) -> str:
    script = tmp_path / "broken_device.py"
    script.write_text(BROKEN[rule] + "\nimport sys\nfrom unus_edge.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return STOCK_DEVICE.replace("{python} -m unus_edge.cli", "{python} " + str(script))


def _run(device_cmd: str, broker_url: str | None = None) -> list[CheckResult]:
    return asyncio.run(run_conformance(device_cmd, broker_url=broker_url, wait_seconds=30))


@pytest.mark.mosquitto
def test_the_stock_device_passes_every_step_on_mosquitto(tmp_path: Path) -> None:
    require_mosquitto()
    broker = MosquittoBroker(tmp_path)

    async def scenario() -> list[CheckResult]:
        await broker.start()
        try:
            return await run_conformance(STOCK_DEVICE, broker_url=broker.url, wait_seconds=30)
        finally:
            await broker.stop()

    results = asyncio.run(scenario())
    assert [(r.name, r.passed) for r in results] == [(name, True) for name in STEP_NAMES], results


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_a_device_that_breaks_a_rule_fails_the_step_that_checks_it(tmp_path: Path, rule: str) -> None:
    results = _run(_broken_device(tmp_path, rule))
    verdicts = {r.name: r.passed for r in results}
    failed_at = STEP_NAMES.index(rule)
    assert all(verdicts[name] is True for name in STEP_NAMES[:failed_at]), results
    assert verdicts[rule] is False, results
    assert all(verdicts[name] is None for name in STEP_NAMES[failed_at + 1:])  # not run after a failure
    assert results[-1].name == "device log (last lines)"


def test_the_stock_device_passes_every_step_through_the_command_line_on_the_embedded_broker() -> None:
    done = subprocess.run([PYTHON, "-m", "unus_edge.cli", "conformance", "--quiet-window", "2"], capture_output=True,
                          text=True, timeout=180, env=python_env(), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == len(STEP_NAMES) and all(line.startswith("PASS") for line in lines)
    assert f"{len(STEP_NAMES)} of {len(STEP_NAMES)} steps passed" in done.stdout
