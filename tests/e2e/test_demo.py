"""``unus-edge demo`` on a machine without MNIST: real data, never the synthetic stand-in (issue 16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.brokers import python_env


def test_the_demo_without_mnist_trains_on_the_shipped_digits(tmp_path: Path) -> None:
    environment = {key: value for key, value in python_env().items() if key != "UNUS_DATA_DIR"}
    environment["XDG_CACHE_HOME"] = str(tmp_path / "no-cache")  # no fetched MNIST either
    run = subprocess.run([sys.executable, "-m", "unus_edge.cli", "demo", "--rounds", "3", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, env=environment, timeout=240,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "training on the 1,797 real 8x8 handwritten digits" in run.stderr
    assert "synthetic" not in run.stderr.lower()
    accuracy = float(run.stdout.split("final accuracy ")[1].split(",")[0])
    assert accuracy > 0.8, run.stdout  # chance is 0.1; the synthetic stand-in scored 0.999
