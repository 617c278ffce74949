"""The paho plumbing of :class:`~unus_edge.transport.MqttTransport`: the client and its socket I/O.

Private to :mod:`unus_edge.transport._mqtt`, which keeps the MQTT semantics (connection and
reconnection, requests, subscriptions, the receive queue) and wires paho's protocol callbacks.
:func:`new_client` configures a paho client from :class:`~unus_edge.transport.ConnectOptions`
(MQTT 3.1.1, no automatic reconnection, credentials, last will, TLS).

There is no network thread: a :class:`SocketPump` registers paho's socket with the event loop
(``add_reader`` / ``add_writer``, through paho's socket callbacks) and runs paho's keepalive
housekeeping (``loop_misc``) on a one-second ``call_later`` timer, so paho's callbacks run in
the loop thread. The socket callbacks paho makes from another thread (``connect()`` runs in
the default executor) are marshalled into the loop with ``call_soon_threadsafe``. Reading can
be paused and resumed (receive-queue backpressure): the pump does it, the transport decides
when and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from unus_edge.transport._base import ConnectOptions

__all__ = ["LargeMessageClient", "SocketPump", "new_client"]

_MISC_INTERVAL = 1.0
_READ_BATCH = 256
"""Packets read per readiness event at most (see ``SocketPump._on_readable``)."""
_RECV_CHUNK = 1 << 20
"""Bytes asked of the socket per ``recv`` at most (see :class:`LargeMessageClient`)."""


class LargeMessageClient(paho.Client):
    """paho's client without the copies that make it slow on multi-megabyte messages.

    paho 2.x does three things that cost little on small messages and a lot on a 40 MB model
    (measured in ``bench/bench_large_model.py``; docs/design.md, "Transport"):

    * every partial ``send`` slices the rest of the queued packet, a copy of up to the whole
      packet each time: here the queued packet is a ``memoryview``, whose slices are free;
    * every ``recv`` asks for the whole rest of the packet, so each call allocates (and the
      kernel zero-fills) a buffer of that size: here a call asks for at most 1 MiB;
    * a received PUBLISH is taken apart with ``struct.unpack``, three copies of the payload:
      here one (MQTT 3.1.1, QoS 0 and 1; anything else is paho's own code).

    Only these private methods of paho are replaced; the wire behaviour is paho's.
    """

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: paho.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        return super()._packet_queue(command, memoryview(packet), mid, qos, info)  # type: ignore[arg-type]

    def _sock_recv(self, bufsize: int) -> bytes:
        return super()._sock_recv(min(bufsize, _RECV_CHUNK))

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol != paho.MQTTv311 or qos > 1:
            return super()._handle_publish()
        view = memoryview(self._in_packet["packet"])
        if len(view) < 2:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        (length,) = struct.unpack_from("!H", view)
        offset = 2 + length
        if length == 0 or len(view) < offset + 2 * qos:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL  # MQTT 3.1.1 forbids an empty topic
        topic = bytes(view[2:offset])
        mid = struct.unpack_from("!H", view, offset)[0] if qos else 0
        message = paho.MQTTMessage(mid=mid, topic=topic)
        offset += 2 * qos
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.payload = bytes(view[offset:])
        message.timestamp = paho.time_func()
        self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), %r, ...  (%d bytes)",
                       message.dup, qos, message.retain, mid, topic, len(message.payload))
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(message.mid)


def new_client(options: ConnectOptions, client_id: str) -> paho.Client:
    """A paho client configured from ``options``; protocol callbacks are the caller's to set."""
    client = LargeMessageClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
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
    return client


class SocketPump:
    """Drives one paho client's socket from the running event loop, from construction to :meth:`close`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: paho.Client) -> None:
        self.loop = loop
        self.client: paho.Client | None = client
        """``None`` once closed."""
        self.paused = False
        """Socket reads are paused (the receive queue is full)."""
        self._loop_thread = threading.get_ident()
        self._reader_fd = -1
        self._writer_fd = -1
        self._misc_handle: asyncio.TimerHandle | None = None
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        self._tick()

    def close(self) -> None:
        """Stop the housekeeping, unregister the socket and close it."""
        if self._misc_handle is not None:
            self._misc_handle.cancel()
            self._misc_handle = None
        client, self.client = self.client, None
        if client is not None:
            sock = client.socket()
            if sock is not None:
                self._drop_socket(sock.fileno())
                sock.close()

    def pause(self) -> bool:
        """Stop reading the socket; False (and nothing done) if already paused or without a socket."""
        if self.paused or self._reader_fd < 0:
            return False
        self.paused = True
        self.loop.remove_reader(self._reader_fd)
        return True

    def resume(self) -> bool:
        """Read the socket again; False if there is no socket to read (the flag is cleared anyway)."""
        self.paused = False
        if self._reader_fd < 0:
            return False
        self.loop.add_reader(self._reader_fd, self._on_readable)
        return True

    # ---------------------------------------------------------------------------- paho socket callbacks

    def _in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` in the loop thread: now if we are in it, else thread-safely soon."""
        if self.loop.is_closed():
            return  # paho's __del__ after the loop ended (a client collected late): nothing to unwatch
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            self.loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_socket, sock.fileno())

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._drop_socket, sock.fileno())

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_writes, sock.fileno())

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_writes, sock.fileno())

    # ---------------------------------------------------------------------------- event loop side

    def _watch_socket(self, fd: int) -> None:
        self._reader_fd = fd
        self.paused = False
        self.loop.add_reader(fd, self._on_readable)

    def _drop_socket(self, fd: int) -> None:
        if fd < 0:
            return
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        if self._reader_fd == fd:
            self._reader_fd = -1

    def _watch_writes(self, fd: int) -> None:
        if self.client is not None:
            self.loop.add_writer(fd, self._on_writable)
            self._writer_fd = fd

    def _unwatch_writes(self, fd: int) -> None:
        # paho may unregister a socket it already closed (fileno() -1, seen from its __del__):
        # the descriptor it was watched under is the one to remove.
        fd = fd if fd >= 0 else self._writer_fd
        if fd >= 0:
            self.loop.remove_writer(fd)
        self._writer_fd = -1

    def _on_readable(self) -> None:
        """Read whole packets, one at a time, until the socket is drained or reads are paused.

        paho's ``loop_read`` ignores its ``max_packets`` argument and reads up to as many packets
        as there are messages in flight (hundreds for an aggregator acknowledging a fleet), so a
        pause decided in ``on_message`` would only take effect after megabytes more. Reading
        packet by packet (paho's own ``_packet_read``, which ``loop_read`` loops over) keeps the
        receive queue's bound to within one packet. The batch is bounded so that one busy
        socket cannot starve the event loop; level-triggered readiness brings us back.
        """
        client = self.client
        if client is None:
            return
        for _ in range(_READ_BATCH):
            if self.paused or client.socket() is None:
                return
            result = client._packet_read()
            if result == MQTTErrorCode.MQTT_ERR_AGAIN:
                sock = client.socket()
                # An SSL socket may hold decrypted bytes that select() will not report again.
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    return
            elif result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                client._loop_rc_handle(result)  # the connection is lost: paho closes and reports it
                return

    def _on_writable(self) -> None:
        if self.client is not None:
            self.client.loop_write()

    def _tick(self) -> None:
        """paho's keepalive housekeeping (PINGREQ, timeouts), once a second."""
        if self.client is None:
            return
        self.client.loop_misc()
        self._misc_handle = self.loop.call_later(_MISC_INTERVAL, self._tick)
