"""A device venv with only the core dependencies (numpy, paho-mqtt) trains and evaluates.

This is a 32-bit Raspberry Pi's situation: onnxruntime has no armhf wheels, so devices (and a
gateway there) run and evaluate with the NumPy engine alone. The venv is the one install.sh
made (tests/e2e/_install.py); nothing from this checkout is on its path.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from tests.brokers import MosquittoBroker, require_mosquitto
from tests.e2e._install import Installed, installed_device, venv_python


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return installed_device(tmp_path_factory)


@pytest.mark.slow
def test_the_venv_holds_the_core_dependencies_only(installed: Installed) -> None:
    listing = venv_python(installed, "import importlib.metadata as m, json; "
                                     "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == ["numpy", "paho-mqtt", "unus-edge"]
    probe = venv_python(installed, "import importlib.util as u, unus_edge; "
                                   "print([n for n in ('onnx', 'onnxruntime', 'amqtt', 'torch') if u.find_spec(n)]); "
                                   "print(unus_edge.__file__)")
    assert probe.returncode == 0, probe.stderr
    missing, location = probe.stdout.splitlines()
    assert missing == "[]"
    assert location.startswith(str(installed.prefix))  # the installed package, not this checkout


@pytest.mark.slow
@pytest.mark.mosquitto
def test_core_only_venv_trains_and_evaluates(installed: Installed, tmp_path: Path) -> None:
    """A whole federation from the core venv: device processes train, the aggregator evaluates."""
    require_mosquitto()
    broker = MosquittoBroker(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    async def scenario() -> tuple[int, str, str]:
        await broker.start()
        try:
            process = await asyncio.create_subprocess_exec(
                str(installed.unus_edge), "-v", "simulate", "--broker", broker.url, "--processes",
                "--dataset", "synthetic", "--devices", "3", "--rounds", "2", "--train-examples", "1500",
                "--eval-examples", "500", "--job", "core", "--out", str(tmp_path / "run"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path)
            async with asyncio.timeout(240):
                out, err = await process.communicate()
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()
        finally:
            await broker.stop()

    status, out, err = asyncio.run(scenario())
    assert status == 0, err[-3000:]
    assert "(numpy backend)" in err  # the central evaluation ran on the NumPy engine
    accuracy = re.search(r"accuracy (0\.\d+)", out)
    assert accuracy is not None, out
    assert float(accuracy.group(1)) > 0.5
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics  # written by the core venv (no matplotlib: no PNG, and no failure either)
