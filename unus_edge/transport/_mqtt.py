"""An asyncio MQTT 3.1.1 client over paho-mqtt 2, driven by the event loop.

Design (after aiomqtt v2):

* No network thread. paho's socket is registered with the event loop (``add_reader`` /
  ``add_writer``) and paho's keepalive housekeeping (``loop_misc``) runs on a one-second
  ``call_later`` timer, so every paho callback runs in the loop thread, except during
  ``connect()``, which blocks (DNS, TCP, TLS handshake) and therefore runs in the default
  executor. The socket callbacks paho makes from there are marshalled into the loop with
  ``call_soon_threadsafe``. Calls into paho are serialised with the connection attempt by an
  ``asyncio.Lock`` so that no PUBLISH can overtake a CONNECT.
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
  queue: while reads are paused, acknowledgements and PINGRESPs wait too.
* A graceful ``close`` sends DISCONNECT, so the broker discards the last will; a process that
  dies (or a connection that goes silent past 1.5 keepalives on a broker that enforces it)
  triggers the will.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from unus_edge.errors import ConnectError, PublishError, SubscribeError, TransportError
from unus_edge.transport._base import Backoff, ConnectionListener, ConnectOptions, ReceivedMessage, Transport

__all__ = ["MqttTransport"]

logger = logging.getLogger("unus_edge.transport")

_MISC_INTERVAL = 1.0


class MqttTransport(Transport):
    """A :class:`Transport` over a real MQTT 3.1.1 broker (amqtt, mosquitto, EMQX...)."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self.client_id = options.client_id or f"unus-{secrets.token_hex(6)}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client: paho.Client | None = None
        self._paho_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._attempt: asyncio.Future[bool] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._misc_handle: asyncio.TimerHandle | None = None
        self._subscriptions: dict[str, int] = {}
        self._subscribe_waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._subscribe_mids: dict[int, list[str]] = {}
        self._unsubscribe_waiters: dict[int, asyncio.Future[None]] = {}
        self._pending_publishes: dict[int, tuple[int, asyncio.Future[None]]] = {}
        self._queue: collections.deque[ReceivedMessage] = collections.deque()
        self._queued_bytes = 0
        self._queue_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._reader_fd = -1
        self._listeners: list[ConnectionListener] = []
        self.reconnections = 0
        self._ever_connected = False
        """How many times the connection was re-established after a loss."""

    # ---------------------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    async def connect(self) -> None:
        if self._client is not None:
            raise TransportError("connect() called twice", host=self.options.host, port=self.options.port)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client = self._make_client()
        self._tick()
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
                await asyncio.sleep(delay)
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
        if self._misc_handle is not None:
            self._misc_handle.cancel()
            self._misc_handle = None
        client, self._client = self._client, None
        if client is not None:
            sock = client.socket()
            if sock is not None:
                self._drop_socket(sock.fileno())
                sock.close()
        for _, future in self._pending_publishes.values():
            if not future.done():
                future.set_exception(PublishError("*", "transport closed"))
        for futures in self._subscribe_waiters.values():
            for waiter in futures:
                if not waiter.done():
                    waiter.set_exception(SubscribeError("*", "transport closed"))
        self._pending_publishes.clear()
        self._subscribe_waiters.clear()
        self._wake_reader()
        # Let the futures' callbacks run before the loop may be closed.
        await asyncio.sleep(0)

    def _make_client(self) -> paho.Client:
        options = self.options
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=options.clean_session,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
        )
        client.enable_logger(logging.getLogger("unus_edge.transport.paho"))
        client.max_inflight_messages_set(options.max_inflight)
        client.max_queued_messages_set(0)
        if options.username is not None:
            client.username_pw_set(options.username, options.password)
        if options.will is not None:
            will = options.will
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if options.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.tls.ca_file)
            context.check_hostname = options.tls.check_hostname
            if options.tls.cert_file:
                context.load_cert_chain(options.tls.cert_file, options.tls.key_file)
            client.tls_set_context(context)
            client.tls_insecure_set(not options.tls.check_hostname)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
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
            self._subscribe_waiters.setdefault(topic_filter, []).append(future)
            if self._connected.is_set():
                self._send_subscribe([(topic_filter, qos)])
        # Not connected: the filter goes out with the re-subscription after the reconnection.
        return await future

    async def unsubscribe(self, topic_filter: str) -> None:
        assert self._loop is not None
        async with self._paho_lock:
            client = self._require_client()
            self._subscriptions.pop(topic_filter, None)
            if not self._connected.is_set():
                return
            result, mid = client.unsubscribe(topic_filter)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
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
                self._queue_waiter = self._loop.create_future()
                try:
                    await self._queue_waiter
                finally:
                    self._queue_waiter = None
            message = self._queue.popleft()
            self._queued_bytes -= len(message.payload)
            if self._reading_paused and self._below_resume_mark():
                self._resume_reading()
            yield message

    def _below_resume_mark(self) -> bool:
        options = self.options
        return (len(self._queue) <= options.max_queued_messages // 2
                and self._queued_bytes <= options.max_queued_bytes // 2)

    def _wake_reader(self) -> None:
        if self._queue_waiter is not None and not self._queue_waiter.done():
            self._queue_waiter.set_result(None)

    def _pause_reading(self) -> None:
        if self._reading_paused or self._reader_fd < 0 or self._loop is None:
            return
        self._reading_paused = True
        self._loop.remove_reader(self._reader_fd)
        logger.warning(
            "%s: receive queue full (%d messages, %d bytes); pausing socket reads until the consumer catches up",
            self.client_id, len(self._queue), self._queued_bytes,
        )

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._reader_fd >= 0 and self._loop is not None:
            self._loop.add_reader(self._reader_fd, self._on_readable)
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
            attempt.set_exception(
                ConnectError(f"connection closed before CONNACK ({reason_code})", host=self.options.host,
                             port=self.options.port, tls=self.options.tls is not None)
            )
        # QoS 0 messages not yet written are lost with the socket: fail their publish calls.
        for mid, (qos, future) in list(self._pending_publishes.items()):
            if qos == 0 and not future.done():
                future.set_exception(PublishError("*", "connection lost before a QoS 0 message was sent"))
                self._pending_publishes.pop(mid, None)
        self._subscribe_mids.clear()
        self._reading_paused = False
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
        self._queue.append(ReceivedMessage(topic, payload, message.qos, bool(message.retain)))
        self._queued_bytes += len(payload)
        self._wake_reader()
        options = self.options
        if len(self._queue) >= options.max_queued_messages or self._queued_bytes >= options.max_queued_bytes:
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
        future = self._unsubscribe_waiters.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    # ---------------------------------------------------------------------------- socket plumbing

    def _in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` in the loop thread: now if we are in it, else thread-safely soon."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_socket, sock.fileno())

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._drop_socket, sock.fileno())

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_writes, sock.fileno())

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_writes, sock.fileno())

    def _watch_socket(self, fd: int) -> None:
        assert self._loop is not None
        self._reader_fd = fd
        self._reading_paused = False
        self._loop.add_reader(fd, self._on_readable)

    def _drop_socket(self, fd: int) -> None:
        assert self._loop is not None
        if fd < 0:
            return
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        if self._reader_fd == fd:
            self._reader_fd = -1

    def _watch_writes(self, fd: int) -> None:
        assert self._loop is not None
        if self._client is not None:
            self._loop.add_writer(fd, self._on_writable)

    def _unwatch_writes(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_writer(fd)

    def _on_readable(self) -> None:
        client = self._client
        if client is None:
            return
        client.loop_read()
        # An SSL socket may hold decrypted bytes that select() will not report again.
        sock = client.socket()
        while sock is not None and not self._reading_paused and isinstance(sock, ssl.SSLSocket) and sock.pending():
            client.loop_read()
            sock = client.socket()

    def _on_writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    def _tick(self) -> None:
        """paho's keepalive housekeeping (PINGREQ, timeouts), once a second."""
        assert self._loop is not None
        if self._client is None:
            return
        self._client.loop_misc()
        self._misc_handle = self._loop.call_later(_MISC_INTERVAL, self._tick)
