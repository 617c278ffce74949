"""The embedded broker: amqtt in-process, the zero-setup default for demos and simulations.

Defaults are chosen for safety and for unus-edge's protocol:

* binds ``127.0.0.1`` (amqtt's own default is ``0.0.0.0``);
* persistent sessions that really persist (see :mod:`unus_edge._amqtt_auth`);
* optional username/password table, or a Mosquitto password file (``unus-edge provision``
  writes one): with neither, anyone who reaches the port may publish, so binding anything but
  loopback without it logs a warning;
* amqtt's and ``transitions``' chatty INFO logging turned down to WARNING.

amqtt's known gaps and how unus-edge copes with each are in ``docs/brokers.md``. For
production use Mosquitto (configs in ``broker/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from unus_edge._passwords import read_password_file
from unus_edge.errors import BrokerError, ConfigError

__all__ = ["EmbeddedBroker", "load_users", "run_broker"]

logger = logging.getLogger(__name__)

_NOISY_LOGGERS = ("amqtt", "transitions", "amqtt.broker", "amqtt.mqtt.protocol.handler")


class EmbeddedBroker:
    """An amqtt broker running in this event loop. ``port=0`` picks a free port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        users: Mapping[str, str] | None = None,
        session_expiry_seconds: int | None = 7 * 24 * 3600,
        quiet: bool = True,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port = port
        self.users = dict(users or {})
        self.session_expiry_seconds = session_expiry_seconds
        self.quiet = quiet
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            from amqtt.errors import BrokerError as AmqttBrokerError

            from unus_edge._amqtt_fixes import FixedBroker
        except ImportError as error:
            raise BrokerError(
                "amqtt is not installed: pip install 'unus-edge[broker]'", host=self.host, port=self.requested_port
            ) from error
        if self.quiet:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR if name.startswith("amqtt") else logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.requested_port}"}},
            "session_expiry_interval": self.session_expiry_seconds,
            "plugins": {
                "unus_edge._amqtt_auth.SessionKeepingAuthPlugin": {"users": self.users},
            },
        }
        try:
            self._broker = FixedBroker(config)
            await self._broker.start()
        except (AmqttBrokerError, OSError) as error:
            raise BrokerError(str(error), host=self.host, port=self.requested_port) from error
        server = self._broker._servers["default"].instance
        self.port = int(server.sockets[0].getsockname()[1])
        logger.info("embedded amqtt broker listening on %s", self.url)

    async def stop(self) -> None:
        if self._broker is None:
            return
        broker, self._broker = self._broker, None
        await broker.shutdown()
        logger.info("embedded broker on %s stopped", self.url)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_users(password_file: str) -> dict[str, str]:
    """``{username: $7$ hash}`` from a Mosquitto password file, which must exist and name a user."""
    path = Path(password_file)
    if not path.is_file():
        raise ConfigError("--password-file", f"{path} does not exist")
    users = read_password_file(path)
    if not users:
        raise ConfigError("--password-file", f"{path} holds no user (lines 'name:$7$...')")
    return users


async def run_broker(host: str, port: int, *, users: Mapping[str, str] | None = None,
                     shutdown_trigger: asyncio.Event | None = None) -> None:
    """Run an embedded broker until ``shutdown_trigger`` is set (or the task is cancelled).

    ``users``: ``{username: password or $7$ hash}`` (:func:`load_users`); only they may connect.
    """
    if not users and not _loopback(host):
        logger.warning("the broker on %s has no password file: anyone who reaches port %d may publish a model "
                       "(use --password-file, or Mosquitto with TLS and ACLs in production)", host, port)
    trigger = shutdown_trigger or asyncio.Event()
    async with EmbeddedBroker(host, port, users=users) as broker:
        logger.info("broker ready on %s; stop with Ctrl-C", broker.url)
        with contextlib.suppress(asyncio.CancelledError):
            await trigger.wait()
