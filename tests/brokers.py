"""Real brokers for the integration tests: amqtt in the test's event loop, mosquitto as a process.

Both are started on a free loopback port and expose the same small interface (``start``,
``stop``, ``restart``, ``port``, ``url``). Start-up is synchronised on the broker's own signal
(amqtt's ``start()`` returning, mosquitto's "running" log line), never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from unus_edge.broker import EmbeddedBroker

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


STDBUF = shutil.which("stdbuf")
# Started as root, mosquitto switches to the "mosquitto" user, which cannot read the tests'
# private temporary files: keep it as the user running the tests.
RUN_AS = f"user {getpass.getuser()}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_mosquitto() -> str:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (make test installs it with apt-get when run as root)")
    return MOSQUITTO


class AmqttBroker:
    kind = "amqtt"

    def __init__(self) -> None:
        self.port = 0
        self._broker: EmbeddedBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._broker = EmbeddedBroker("127.0.0.1", self.port)
        await self._broker.start()
        self.port = self._broker.port

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


class MosquittoBroker:
    kind = "mosquitto"

    def __init__(self, workdir: Path, *, extra_config: str = "", persistence: bool = False) -> None:
        self.binary = require_mosquitto()
        self.workdir = workdir
        self.port = free_port()
        self.extra_config = extra_config
        self.persistence = persistence
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [
            RUN_AS,
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_queued_messages 100000",
            self.extra_config,
        ]
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def start(self) -> None:
        config = self._config()
        # mosquitto block-buffers stdout on a pipe: stdbuf makes its log line-buffered, so the
        # "running" line arrives when it is written.
        launcher = [STDBUF, "-oL"] if STDBUF else []
        self.process = await asyncio.create_subprocess_exec(
            *launcher, self.binary, "-c", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(10):
            while True:
                line = (await self.process.stdout.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError(f"mosquitto exited during start-up: {''.join(self.log)}")
                self.log.append(line)
                if "running" in line:
                    break
        self._drain = asyncio.create_task(self._drain_output(self.process.stdout), name="mosquitto-log")

    async def _drain_output(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            self.log.append(line.decode(errors="replace"))

    async def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain

    async def restart(self) -> None:
        await self.stop()
        await self.start()


Broker = AmqttBroker | MosquittoBroker


@contextlib.asynccontextmanager
async def running_broker(kind: str, workdir: Path, **kwargs: object) -> AsyncIterator[Broker]:
    broker: Broker = AmqttBroker() if kind == "amqtt" else MosquittoBroker(workdir, **kwargs)  # type: ignore[arg-type]
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def python_env() -> dict[str, str]:
    """Environment for child Python processes: this interpreter's path, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
