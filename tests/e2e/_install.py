"""One real ``install.sh --role device --no-systemd`` into a temporary prefix, shared by the tests.

The installer runs as it would on a Pi (provisioning bundle, venv, configuration files), with
every path moved into a temporary folder and the package taken from a wheel built from this
checkout (built in a copy, so the checkout gets no ``build/`` folder). The venv it makes holds
the core dependencies only: that is what the core-only tests use. Installing takes a few
seconds (pip resolves numpy and paho-mqtt from the configured index or its cache), once per
test session.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.brokers import REPO
from tests.secure_gateway import Fleet, provision

INSTALL = REPO / "deploy" / "raspberry-pi" / "install.sh"
UNINSTALL = REPO / "deploy" / "raspberry-pi" / "uninstall.sh"
JOB = "pi"
DEVICE = "pi-1"


@dataclass(frozen=True)
class Installed:
    root: Path
    prefix: Path
    etc: Path
    state: Path
    fleet: Fleet
    env: dict[str, str]
    output: str

    @property
    def unus_edge(self) -> Path:
        return self.prefix / "bin" / "unus-edge"

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(INSTALL), *args], env=self.env, capture_output=True, text=True,
                              timeout=600, check=False)


_installed: Installed | None = None


def build_wheel(directory: Path) -> Path:
    source = directory / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "unus_edge", source / "unus_edge", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = directory / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)
    return next(wheels.glob("unus_edge-*.whl"))


def installed_device(factory: pytest.TempPathFactory) -> Installed:
    """The shared installation (made on first use)."""
    global _installed
    if _installed is not None:
        return _installed
    if shutil.which("bash") is None or shutil.which("openssl") is None:
        pytest.skip("needs bash and openssl")
    probe = subprocess.run([sys.executable, "-c", "import ensurepip, venv"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("this Python cannot create virtual environments (apt-get install python3-venv)")
    root = factory.mktemp("install")
    prefix, etc, state = root / "opt" / "unus-edge", root / "etc" / "unus-edge", root / "var" / "unus-edge"
    fleet = provision(root / "fleet", JOB, [DEVICE], "--config-dir", str(etc), "--data", str(state / "data.npz"),
                      "--state-dir", str(state))
    env = dict(os.environ)
    env.update(UNUS_PREFIX=str(prefix), UNUS_ETC=str(etc), UNUS_STATE=str(state), UNUS_USER=getpass.getuser(),
               UNUS_PYTHON=sys.executable, UNUS_SOURCE=str(build_wheel(root)),
               UNUS_MOSQUITTO_CONF_D=str(root / "conf.d"), UNUS_SYSTEMD_DIR=str(root / "systemd"))
    env.pop("PYTHONPATH", None)
    first = subprocess.run(["bash", str(INSTALL), "--role", "device", "--no-systemd", "--no-apt", "--bundle",
                            str(fleet.out / "devices" / DEVICE)], env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    _installed = Installed(root, prefix, etc, state, fleet, env, first.stdout + first.stderr)
    return _installed


def venv_python(installed: Installed, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the installed venv's interpreter, outside this checkout."""
    return subprocess.run([str(installed.prefix / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=installed.root,
                          timeout=120, check=False)
