"""An asyncio MQTT 3.1.1 client over paho-mqtt 2, driven by the event loop.

Design (after aiomqtt v2):

* No network thread. paho's socket is registered with the event loop (``add_reader`` /
  ``add_writer``) and paho's keepalive housekeeping (``loop_misc``) runs on a one-second
  ``call_later`` timer, so every paho callback runs in the loop thread, except during
  ``connect()``, which blocks (DNS, TCP, TLS handshake) and therefore runs in the default
  executor. The socket callbacks paho makes from there are marshalled into the loop with
  ``call_soon_threadsafe``. That plumbing is :class:`~unus_edge.transport._pump.SocketPump`.
  Calls into paho are serialised with the connection attempt by an ``asyncio.Lock`` so that no
  PUBLISH can overtake a CONNECT.
* Requests are futures keyed by packet id: ``publish`` resolves on PUBACK/PUBCOMP (or on write
  for QoS 0), ``subscribe`` on SUBACK.
* Reconnection is automatic: a supervisor task waits for the connection to be lost, sleeps a
  jittered exponential backoff, reconnects, and re-subscribes every filter. QoS 1/2 messages
  published while the connection is down stay in paho's store and are sent after the
  reconnection; their ``publish`` calls complete then.
* The receive queue is bounded in messages and in bytes. When either bound is reached the
  transport stops reading the socket (TCP backpressure pushes the flow control to the broker)
  and logs it; it resumes at half of both. No message is dropped. The overshoot is what one
  ``loop_read`` takes from the kernel's socket buffer. A consumer must keep draining the
  queue: while reads are paused, acknowledgements and PINGRESPs wait too. The queue and its
  bounds are :class:`~unus_edge.transport._queue.ReceiveQueue`.
* A graceful ``close`` sends DISCONNECT, so the broker discards the last will; a process that
  dies (or a connection that goes silent past 1.5 keepalives on a broker that enforces it)
  triggers the will.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from unus_edge.errors import ConnectError, PublishError, SubscribeError, TransportError
from unus_edge.transport._base import Backoff, ConnectionListener, ConnectOptions, ReceivedMessage, Transport
from unus_edge.transport._pump import SocketPump, new_client
from unus_edge.transport._queue import ReceiveQueue

__all__ = ["MqttTransport"]

logger = logging.getLogger("unus_edge.transport")


class MqttTransport(Transport):
    """A :class:`Transport` over a real MQTT 3.1.1 broker (amqtt, mosquitto, EMQX...)."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self.client_id = options.client_id or f"unus-{secrets.token_hex(6)}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._pump: SocketPump | None = None
        self._paho_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._attempt: asyncio.Future[bool] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._subscriptions: dict[str, int] = {}
        self._subscribe_waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._subscribe_mids: dict[int, list[str]] = {}
        self._unsubscribe_waiters: dict[int, asyncio.Future[None]] = {}
        self._unsubscribed: set[str] = set()
        """Filters unsubscribed but not yet acknowledged: sent again after a reconnection, since a
        persistent session would otherwise keep them on the broker."""
        self._unsubscribe_mids: dict[int, str] = {}
        self._pending_publishes: dict[int, tuple[int, asyncio.Future[None]]] = {}
        self._queue = ReceiveQueue(options.max_queued_messages, options.max_queued_bytes)
        self._listeners: list[ConnectionListener] = []
        self.reconnections = 0
        """How many times the connection was re-established after a loss."""
        self._ever_connected = False

    # ---------------------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def _queued_bytes(self) -> int:
        """Payload bytes waiting in the receive queue."""
        return self._queue.nbytes

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    async def connect(self) -> None:
        if self._client is not None:
            raise TransportError("connect() called twice", host=self.options.host, port=self.options.port)
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        self._pump = SocketPump(self._loop, self._client)  # starts paho's housekeeping timer
        backoff = Backoff(self.options.reconnect_min_delay, self.options.reconnect_max_delay)
        while True:
            try:
                await self._open()
                break
            except ConnectError as error:
                if not self.options.retry_first_connect or self._closing or error.refused:
                    await self._teardown()
                    raise
                delay = backoff.next_delay()
                logger.warning("%s: %s; retrying in %.1f s", self.client_id, error, delay)
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:  # a shutdown while the broker is unreachable
                    await self._teardown()
                    raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt-reconnect[{self.client_id}]")

    async def close(self) -> None:
        if self._closing or self._client is None:
            return
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._connected.is_set():
            disconnected = self._lost
            self._lost.clear()
            self._client.disconnect()
            try:
                async with asyncio.timeout(5.0):  # a bounded goodbye; the socket is closed regardless
                    await disconnected.wait()
            except TimeoutError:
                logger.warning("%s: no clean DISCONNECT within 5 s", self.client_id)
        await self._teardown()

    async def _teardown(self) -> None:
        self._closing = True
        if self._pump is not None:
            self._pump.close()
        self._client = None
        for _, future in self._pending_publishes.values():
            if not future.done():
                future.set_exception(PublishError("*", "transport closed"))
        for futures in self._subscribe_waiters.values():
            for waiter in futures:
                if not waiter.done():
                    waiter.set_exception(SubscribeError("*", "transport closed"))
        self._pending_publishes.clear()
        self._subscribe_waiters.clear()
        self._queue.wake()
        # Let the futures' callbacks run before the loop may be closed.
        await asyncio.sleep(0)

    def _make_client(self) -> paho.Client:
        client = new_client(self.options, self.client_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    async def _open(self) -> bool:
        """One connection attempt: TCP/TLS in the executor, then wait for the CONNACK."""
        assert self._loop is not None
        assert self._client is not None
        client = self._client
        options = self.options
        attempt: asyncio.Future[bool] = self._loop.create_future()
        self._attempt = attempt
        async with self._paho_lock:
            try:
                await self._loop.run_in_executor(None, client.connect, options.host, options.port, options.keepalive)
            except OSError as error:
                self._attempt = None
                raise ConnectError(str(error) or type(error).__name__, host=options.host, port=options.port,
                                   tls=options.tls is not None) from error
        # The CONNACK may already have resolved ``attempt`` while the executor was returning.
        # paho closes a connection that gets no CONNACK within one keepalive (loop_misc).
        return await attempt

    async def _supervise(self) -> None:
        backoff = Backoff(self.options.reconnect_min_delay, self.options.reconnect_max_delay)
        while True:
            await self._lost.wait()
            delay = backoff.next_delay()
            logger.warning(
                "%s: connection to %s lost; reconnecting in %.2f s (attempt %d)",
                self.client_id, self.options.url, delay, backoff.attempts,
            )
            await asyncio.sleep(delay)
            try:
                await self._open()
            except ConnectError as error:
                logger.warning("%s: reconnection failed: %s", self.client_id, error)
                self._lost.set()
                continue
            backoff.reset()
            logger.info("%s: reconnected to %s", self.client_id, self.options.url)

    # ---------------------------------------------------------------------------- requests

    def _require_client(self) -> paho.Client:
        if self._client is None or self._closing:
            raise TransportError("the transport is not open", host=self.options.host, port=self.options.port)
        return self._client

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        assert self._loop is not None
        async with self._paho_lock:
            client = self._require_client()
            try:
                info = client.publish(topic, payload, qos=qos, retain=retain)
            except ValueError as error:  # wildcard in topic, payload too large...
                raise PublishError(topic, str(error)) from error
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise PublishError(topic, "not connected (QoS 0 messages are never queued)")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishError(topic, paho.error_string(info.rc))
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published():
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending_publishes[info.mid] = (qos, future)
        try:
            await future
        finally:
            self._pending_publishes.pop(info.mid, None)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> int:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        assert self._loop is not None
        future: asyncio.Future[int] = self._loop.create_future()
        async with self._paho_lock:
            self._require_client()
            self._subscriptions[topic_filter] = qos
            self._unsubscribed.discard(topic_filter)
            self._subscribe_waiters.setdefault(topic_filter, []).append(future)
            if self._connected.is_set():
                self._send_subscribe([(topic_filter, qos)])
        # Not connected: the filter goes out with the re-subscription after the reconnection.
        return await future

    async def unsubscribe(self, topic_filter: str) -> None:
        assert self._loop is not None
        async with self._paho_lock:
            self._require_client()
            self._subscriptions.pop(topic_filter, None)
            self._unsubscribed.add(topic_filter)
            if not self._connected.is_set():
                # A SUBSCRIBE of it waiting for the reconnection would never be sent: settle it.
                self._fail_subscription(topic_filter, "unsubscribed before the broker acknowledged it")
                return  # the UNSUBSCRIBE goes out after the reconnection
            mid = self._send_unsubscribe(topic_filter)
            if mid is None:
                return
            future: asyncio.Future[None] = self._loop.create_future()
            self._unsubscribe_waiters[mid] = future
        try:
            await future
        finally:
            self._unsubscribe_waiters.pop(mid, None)

    def _send_subscribe(self, pairs: list[tuple[str, int]]) -> None:
        assert self._client is not None
        try:
            result, mid = self._client.subscribe(pairs)
        except ValueError as error:  # an invalid filter
            for topic_filter, _ in pairs:
                self._subscriptions.pop(topic_filter, None)
                self._fail_subscription(topic_filter, str(error))
            return
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._subscribe_mids[mid] = [topic_filter for topic_filter, _ in pairs]

    def _send_unsubscribe(self, topic_filter: str) -> int | None:
        assert self._client is not None
        result, mid = self._client.unsubscribe(topic_filter)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        self._unsubscribe_mids[mid] = topic_filter
        return mid

    def _fail_subscription(self, topic_filter: str, reason: str) -> None:
        for waiter in self._subscribe_waiters.pop(topic_filter, []):
            if not waiter.done():
                waiter.set_exception(SubscribeError(topic_filter, reason))

    # ---------------------------------------------------------------------------- receiving

    async def messages(self) -> AsyncIterator[ReceivedMessage]:
        assert self._loop is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                await self._queue.wait()
            message = self._queue.pop()
            if self._pump is not None and self._pump.paused and self._queue.drained:
                self._resume_reading()
            yield message

    def _pause_reading(self) -> None:
        if self._pump is not None and self._pump.pause():
            logger.warning(
                "%s: receive queue full (%d messages, %d bytes); pausing socket reads until the consumer catches up",
                self.client_id, len(self._queue), self._queue.nbytes,
            )

    def _resume_reading(self) -> None:
        if self._pump is not None and self._pump.resume():
            logger.info("%s: receive queue drained to %d; reading again", self.client_id, len(self._queue))

    # ---------------------------------------------------------------------------- paho callbacks

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason_code: ReasonCode, properties: Any
    ) -> None:
        attempt, self._attempt = self._attempt, None
        if reason_code.is_failure:
            host, port = self.options.host, self.options.port
            error = ConnectError(f"refused by the broker: {reason_code}", host=host, port=port, refused=True,
                                 tls=self.options.tls is not None)
            if attempt is not None and not attempt.done():
                attempt.set_exception(error)
            return
        self._lost.clear()
        self._connected.set()
        if self._ever_connected:
            self.reconnections += 1
        self._ever_connected = True
        if self._subscriptions:
            self._send_subscribe(list(self._subscriptions.items()))
        for topic_filter in sorted(self._unsubscribed):
            self._send_unsubscribe(topic_filter)
        if attempt is not None and not attempt.done():
            attempt.set_result(flags.session_present)
        assert self._loop is not None
        for listener in self._listeners:
            self._loop.call_soon(listener, flags.session_present)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done():
            hint = ("; is this a TLS port? use mqtts:// (or broker.ca_file)" if self.options.tls is None
                    else "; is this a plain (non-TLS) port, or does the broker refuse this certificate?")
            attempt.set_exception(
                ConnectError(f"connection closed before CONNACK ({reason_code}){hint}", host=self.options.host,
                             port=self.options.port, tls=self.options.tls is not None)
            )
        # QoS 0 messages not yet written are lost with the socket: fail their publish calls.
        for mid, (qos, future) in list(self._pending_publishes.items()):
            if qos == 0 and not future.done():
                future.set_exception(PublishError("*", "connection lost before a QoS 0 message was sent"))
                self._pending_publishes.pop(mid, None)
        self._subscribe_mids.clear()
        self._unsubscribe_mids.clear()
        # paho forgets its packets in flight: an UNSUBSCRIBE is sent again after the reconnection
        # (the filter is still in _unsubscribed), so nobody waits for this one's UNSUBACK; and a
        # SUBSCRIBE of a filter unsubscribed since will not be sent again.
        for future in self._unsubscribe_waiters.values():
            if not future.done():
                future.set_result(None)
        self._unsubscribe_waiters.clear()
        for topic_filter in [f for f in self._subscribe_waiters if f not in self._subscriptions]:
            self._fail_subscription(topic_filter, "connection lost; unsubscribed before the broker acknowledged it")
        if self._pump is not None:
            self._pump.paused = False
        if was_connected and not self._closing:
            logger.warning("%s: disconnected from %s (%s)", self.client_id, self.options.url, reason_code)
        self._lost.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            logger.warning("%s: discarding a message whose topic is not UTF-8: %r", self.client_id, message._topic)
            return
        payload = bytes(message.payload)
        self._queue.put(ReceivedMessage(topic, payload, message.qos, bool(message.retain)))
        if self._queue.full:
            self._pause_reading()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        entry = self._pending_publishes.pop(mid, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(None)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        filters = self._subscribe_mids.pop(mid, [])
        for topic_filter, code in zip(filters, reason_codes, strict=False):
            if code.is_failure:
                self._subscriptions.pop(topic_filter, None)
                self._fail_subscription(topic_filter, f"refused by the broker ({code})")
                continue
            for waiter in self._subscribe_waiters.pop(topic_filter, []):
                if not waiter.done():
                    waiter.set_result(int(code.value))

    def _on_unsubscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        topic_filter = self._unsubscribe_mids.pop(mid, None)
        if topic_filter is not None and topic_filter not in self._subscriptions:
            self._unsubscribed.discard(topic_filter)
        future = self._unsubscribe_waiters.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)
