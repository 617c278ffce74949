"""What every transport shares: options, received messages, backoff, and the abstract seam.

The seam (:class:`Transport`) is what the aggregator and the device daemon program against.
:class:`~unus_edge.transport.MqttTransport` implements it over paho-mqtt and a real broker;
:class:`~unus_edge.transport.MemoryTransport` implements it in memory for unit tests.
"""

from __future__ import annotations

import abc
import asyncio
import random
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Self

from unus_edge.errors import ConfigError

__all__ = [
    "Backoff",
    "ConnectOptions",
    "ConnectionListener",
    "ReceivedMessage",
    "TLSOptions",
    "Transport",
    "Will",
    "connect_unless_stopped",
    "options_from_url",
    "redact_url",
    "topic_matches",
]


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message delivered by the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Will:
    """The last will: published by the broker when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS for the broker connection. Hostname checking is on unless switched off explicitly."""

    ca_file: str | None = None
    """CA bundle that signed the broker's certificate; ``None`` uses the system store."""
    cert_file: str | None = None
    """Client certificate (optional, for brokers that require one)."""
    key_file: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach the broker and how the session behaves.

    A persistent session needs a stable ``client_id`` and ``clean_session=False``: the broker
    then keeps the subscriptions and queues QoS 1/2 messages while the client is away.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    clean_session: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    tls: TLSOptions | None = None
    will: Will | None = None
    max_queued_messages: int = 10_000
    """Bound of the receive queue in messages. When it (or ``max_queued_bytes``) is reached,
    the transport stops reading the socket (TCP backpressure to the broker) and logs it;
    nothing is dropped. Reading resumes when the queue is down to half of both bounds."""
    max_queued_bytes: int = 64 * 1024 * 1024
    """Bound of the receive queue in payload bytes (see ``max_queued_messages``)."""
    max_inflight: int = 100
    """Outgoing QoS 1/2 messages in flight before paho queues further ones locally."""
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    retry_first_connect: bool = False
    """Keep retrying the first connection (with backoff) instead of raising at once."""

    def __post_init__(self) -> None:
        if not self.clean_session and not self.client_id:
            raise ConfigError("broker.client_id", "a persistent session (clean_session=False) needs a client id")
        if not 0 < self.port < 65536:
            raise ConfigError("broker.port", f"{self.port} is not a TCP port")
        if self.keepalive < 1:
            raise ConfigError("broker.keepalive", "must be at least 1 second")
        if self.max_queued_messages < 1:
            raise ConfigError("broker.max_queued_messages", "must be at least 1")
        if self.max_queued_bytes < 1:
            raise ConfigError("broker.max_queued_bytes", "must be at least 1")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ConfigError("broker.reconnect_min_delay", "must be positive and <= reconnect_max_delay")

    @property
    def url(self) -> str:
        """The broker as a URL, without credentials (safe to log)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log and to put in an error)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    user, _, host = parsed.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"{name}:***@{host}"))


def options_from_url(url: str, **overrides: object) -> ConnectOptions:
    """Build options from ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``.

    The default port is 1883 for ``mqtt`` and 8883 for ``mqtts``; ``mqtts`` turns TLS on with
    the system CA store unless ``tls=TLSOptions(...)`` is passed in ``overrides``.
    """
    parsed = urllib.parse.urlsplit(url)
    shown = redact_url(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError("broker.url", f"{shown!r}: the scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise ConfigError("broker.url", f"{shown!r} names no host")
    secure = parsed.scheme in ("mqtts", "ssl")
    try:
        port = parsed.port or (8883 if secure else 1883)
    except ValueError as error:
        raise ConfigError("broker.url", f"{shown!r}: {error}") from error
    options = ConnectOptions(
        host=parsed.hostname,
        port=port,
        username=urllib.parse.unquote(parsed.username) if parsed.username else None,
        password=urllib.parse.unquote(parsed.password) if parsed.password else None,
        tls=TLSOptions() if secure else None,
    )
    return replace(options, **overrides)  # type: ignore[arg-type]


class Backoff:
    """Exponential backoff with jitter ("equal jitter"): half fixed, half random.

    The n-th delay is uniform in ``[d/2, d]`` with ``d = min(max_delay, min_delay * 2**n)``,
    so a fleet that lost its broker at the same instant does not reconnect in lockstep.
    """

    def __init__(self, min_delay: float, max_delay: float, *, rng: random.Random | None = None) -> None:
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_delay, self.min_delay * 2.0 ** min(self.attempts, 32))
        self.attempts += 1
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def reset(self) -> None:
        self.attempts = 0


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 filter matching (``+`` one level, ``#`` the rest; ``$`` topics need a literal)."""
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


ConnectionListener = Callable[[bool], None]
"""Called in the event loop after every successful (re)connection with ``session_present``."""


class Transport(abc.ABC):
    """An asyncio publish/subscribe client. Use as ``async with transport: ...``.

    Timeouts are the caller's: wrap calls in ``asyncio.timeout()``. A QoS 1/2 ``publish`` made
    while the connection is down is kept and completes after the reconnection.
    """

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the transport holds a live, acknowledged connection right now."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection (and start reconnecting automatically after losses)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect gracefully: the broker discards the last will."""

    @abc.abstractmethod
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish; returns once the broker acknowledged it (QoS 1/2) or it was written (QoS 0)."""

    @abc.abstractmethod
    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> int:
        """Subscribe (kept across reconnections); returns the granted QoS."""

    @abc.abstractmethod
    async def unsubscribe(self, topic_filter: str) -> None:
        """Remove a subscription."""

    @abc.abstractmethod
    def messages(self) -> AsyncIterator[ReceivedMessage]:
        """Received messages in arrival order; one consumer at a time."""

    @abc.abstractmethod
    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(session_present)`` after every successful (re)connection."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def connect_unless_stopped(transport: Transport, stop: asyncio.Event) -> bool:
    """Connect ``transport`` (retrying as its options say) unless ``stop`` is set first.

    Returns True once connected; False, with nothing left open, when ``stop`` came first (a
    daemon asked to stop while its broker is unreachable). A refusal raises as ``connect`` does.
    """
    connecting = asyncio.create_task(transport.connect(), name="transport-connect")
    stopping = asyncio.create_task(stop.wait(), name="transport-connect-stop")
    try:
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled from outside: leave nothing running
        connecting.cancel()
        raise
    finally:
        stopping.cancel()
    if not connecting.done():
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await transport.close()
        return False
    connecting.result()
    return True
