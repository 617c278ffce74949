"""An in-memory broker and transport with MQTT 3.1.1 semantics, for unit tests.

It implements what unus-edge relies on: QoS downgrade to ``min(publish, subscription)``,
retained messages (an empty retained payload deletes), last wills on an abrupt disconnect
(:meth:`MemoryTransport.kill`), persistent sessions that queue QoS 1/2 messages for an absent
client, and ``+``/``#`` filters. Delivery is synchronous, so tests are deterministic, and
nothing touches a socket.

One difference from :class:`~unus_edge.transport.MqttTransport`: the receive queue has no
bound. Delivery is a synchronous call from the publisher, which cannot be made to wait, so
reaching ``max_queued_messages`` only logs a warning, where the MQTT transport stops reading
its socket (backpressure up to the broker). Test memory bounds against a real broker.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from unus_edge.errors import ConnectError, PublishError, TransportError
from unus_edge.transport._base import ConnectionListener, ConnectOptions, ReceivedMessage, Transport, topic_matches

__all__ = ["MemoryBroker", "MemoryTransport"]

logger = logging.getLogger("unus_edge.transport")


@dataclass
class _Session:
    client_id: str
    clean: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    pending: list[ReceivedMessage] = field(default_factory=list)
    transport: MemoryTransport | None = None


class MemoryBroker:
    """A broker living in the test process. Share one between several :class:`MemoryTransport`."""

    def __init__(self) -> None:
        self.retained: dict[str, ReceivedMessage] = {}
        self._sessions: dict[str, _Session] = {}
        self.published: list[ReceivedMessage] = []
        """Every message published through the broker, in order (for assertions)."""
        self.refuse_connections = False
        """Set to make every new connection fail (a broker that is down)."""

    def _attach(self, transport: MemoryTransport) -> bool:
        options = transport.options
        if self.refuse_connections:
            raise ConnectError("connection refused (memory broker is down)", host="memory", port=0)
        session = self._sessions.get(transport.client_id)
        if session is not None and session.transport is not None:
            # MQTT: a second connection with the same client id takes over the session.
            session.transport._lose_connection(fire_will=False)
        session_present = session is not None and not options.clean_session and not session.clean
        if session is None or options.clean_session or session.clean:
            session = _Session(transport.client_id, options.clean_session)
            self._sessions[transport.client_id] = session
        session.transport = transport
        for message in session.pending:
            transport._deliver(message)
        session.pending.clear()
        return session_present

    def _detach(self, transport: MemoryTransport, *, fire_will: bool) -> None:
        session = self._sessions.get(transport.client_id)
        if session is None or session.transport is not transport:
            return
        session.transport = None
        if session.clean:
            del self._sessions[transport.client_id]
        will = transport.options.will
        if fire_will and will is not None:
            self.route(will.topic, will.payload, will.qos, will.retain)

    def _subscribe(self, transport: MemoryTransport, topic_filter: str, qos: int) -> int:
        session = self._sessions[transport.client_id]
        session.subscriptions[topic_filter] = qos
        for topic, message in self.retained.items():
            if topic_matches(topic_filter, topic):
                transport._deliver(ReceivedMessage(topic, message.payload, min(qos, message.qos), True))
        return qos

    def _unsubscribe(self, transport: MemoryTransport, topic_filter: str) -> None:
        self._sessions[transport.client_id].subscriptions.pop(topic_filter, None)

    def route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish as the broker would: store if retained, deliver to matching sessions."""
        if "+" in topic or "#" in topic:
            raise PublishError(topic, "wildcards are not allowed in a topic name")
        message = ReceivedMessage(topic, bytes(payload), qos, False)
        self.published.append(message)
        if retain:
            if payload:
                self.retained[topic] = ReceivedMessage(topic, bytes(payload), qos, True)
            else:
                self.retained.pop(topic, None)
        for session in list(self._sessions.values()):
            granted = max((q for f, q in session.subscriptions.items() if topic_matches(f, topic)), default=None)
            if granted is None:
                continue
            delivered = ReceivedMessage(topic, message.payload, min(qos, granted), False)
            if session.transport is not None:
                session.transport._deliver(delivered)
            elif delivered.qos > 0 and not session.clean:
                session.pending.append(delivered)


class MemoryTransport(Transport):
    """A :class:`Transport` connected to a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, options: ConnectOptions | None = None) -> None:
        self.broker = broker
        self.options = options or ConnectOptions()
        self.client_id = self.options.client_id or f"memory-{secrets.token_hex(6)}"
        self._connected = False
        self._closed = False
        self._queue: collections.deque[ReceivedMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._subscriptions: dict[str, int] = {}
        self._listeners: list[ConnectionListener] = []

    @property
    def connected(self) -> bool:
        return self._connected

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    async def connect(self) -> None:
        if self._closed:
            raise TransportError("the transport is closed")
        session_present = self.broker._attach(self)
        self._connected = True
        for topic_filter, qos in self._subscriptions.items():
            self.broker._subscribe(self, topic_filter, qos)
        for listener in self._listeners:
            asyncio.get_running_loop().call_soon(listener, session_present)
        await asyncio.sleep(0)

    async def close(self) -> None:
        if self._connected:
            self.broker._detach(self, fire_will=False)
        self._connected = False
        self._closed = True
        self._wake()

    def kill(self) -> None:
        """Die abruptly, as a process killed with SIGKILL: the broker publishes the will."""
        self._lose_connection(fire_will=True)
        self._closed = True
        self._wake()

    def _lose_connection(self, *, fire_will: bool) -> None:
        if self._connected:
            self._connected = False
            self.broker._detach(self, fire_will=fire_will)

    async def reconnect(self) -> None:
        """Drop the connection (the will fires) and connect again, as after a network cut."""
        self._lose_connection(fire_will=True)
        await self.connect()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        if not self._connected:
            raise PublishError(topic, "not connected")
        self.broker.route(topic, payload, qos, retain)
        await asyncio.sleep(0)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> int:
        if not self._connected:
            raise TransportError("not connected")
        self._subscriptions[topic_filter] = qos
        granted = self.broker._subscribe(self, topic_filter, qos)
        await asyncio.sleep(0)
        return granted

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)
        if self._connected:
            self.broker._unsubscribe(self, topic_filter)
        await asyncio.sleep(0)

    def _deliver(self, message: ReceivedMessage) -> None:
        self._queue.append(message)
        if len(self._queue) == self.options.max_queued_messages:
            logger.warning("%s: receive queue reached %d messages", self.client_id, len(self._queue))
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def messages(self) -> AsyncIterator[ReceivedMessage]:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            yield self._queue.popleft()
