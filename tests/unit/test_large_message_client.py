"""LargeMessageClient's PUBLISH parsing against paho's own, on the same packets (no sockets)."""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as paho
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

from unus_edge.transport._pump import LargeMessageClient


class _Recorder:
    """What a client did with one inbound PUBLISH: its messages and the PUBACKs it sent."""

    def __init__(self, client: paho.Client) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.pubacks: list[int] = []
        client.on_message = lambda _client, _userdata, message: self.messages.append(message)
        client._send_puback = self._puback  # type: ignore[method-assign]  # no socket: record it instead

    def _puback(self, mid: int) -> MQTTErrorCode:
        self.pubacks.append(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def handle(client_class: type[paho.Client], command: int, body: bytes) -> tuple[Any, _Recorder]:
    client = client_class(CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv311)
    recorder = _Recorder(client)
    client._in_packet["command"] = command
    client._in_packet["packet"] = bytearray(body)
    try:
        result: Any = client._handle_publish()
    except MalformedPacket:  # paho 2.2's answer to an empty topic (2.1 returned MQTT_ERR_PROTOCOL)
        result = MQTTErrorCode.MQTT_ERR_PROTOCOL
    return result, recorder


def publish_packet(topic: bytes, payload: bytes, qos: int, mid: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    return body + payload


def fields(message: paho.MQTTMessage) -> tuple[object, ...]:
    return (message.topic, bytes(message.payload), message.qos, message.retain, message.dup, message.mid)


@settings(deadline=None, max_examples=300)
@given(topic=st.text(st.characters(min_codepoint=33, max_codepoint=0x10FFFF, exclude_categories=("Cs",)),
                     min_size=1, max_size=40).map(str.encode),
       payload=st.binary(max_size=3000), qos=st.integers(0, 1), mid=st.integers(1, 65535),
       retain=st.booleans(), dup=st.booleans())
def test_a_publish_is_taken_apart_as_paho_does(topic: bytes, payload: bytes, qos: int, mid: int, retain: bool,
                                                dup: bool) -> None:
    command = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = publish_packet(topic, payload, qos, mid)
    ours, our_calls = handle(LargeMessageClient, command, body)
    theirs, their_calls = handle(paho.Client, command, body)
    assert ours == theirs == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [fields(m) for m in our_calls.messages] == [fields(m) for m in their_calls.messages]
    assert our_calls.pubacks == their_calls.pubacks == ([mid] if qos else [])
    assert isinstance(our_calls.messages[0].payload, bytes)


def test_a_payload_is_copied_out_of_the_receive_buffer() -> None:
    # paho reuses nothing, but a view into its buffer would pin it: the payload must be bytes of its own.
    _, calls = handle(LargeMessageClient, 0x32, publish_packet(b"a/b", b"x" * 100, 1, 7))
    assert type(calls.messages[0].payload) is bytes and calls.messages[0].payload == b"x" * 100


def test_an_empty_topic_is_a_protocol_error_and_no_message() -> None:
    for client_class in (LargeMessageClient, paho.Client):  # the same verdict as paho's
        result, calls = handle(client_class, 0x30, publish_packet(b"", b"payload", 0, 0))
        assert result == MQTTErrorCode.MQTT_ERR_PROTOCOL, client_class
        assert calls.messages == [] and calls.pubacks == []


def test_a_truncated_packet_is_a_protocol_error() -> None:
    for body in (b"", b"\x00", b"\x00\x05ab", b"\x00\x01a\x00"):  # no length, short topic, QoS 1 without id
        result, calls = handle(LargeMessageClient, 0x32, body)
        assert result == MQTTErrorCode.MQTT_ERR_PROTOCOL, body
        assert calls.messages == []


def test_qos2_is_left_to_paho() -> None:
    command = 0x34  # QoS 2: paho answers PUBREC (here: no connection to send it on) and delivers on PUBREL
    ours, our_calls = handle(LargeMessageClient, command, publish_packet(b"t", b"p", 2, 9))
    theirs, _ = handle(paho.Client, command, publish_packet(b"t", b"p", 2, 9))
    assert ours == theirs == MQTTErrorCode.MQTT_ERR_NO_CONN
    assert our_calls.messages == []


def test_queued_packets_are_views_so_partial_sends_do_not_copy() -> None:
    client = LargeMessageClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv311)
    client._packet_queue(0x30, bytearray(b"abc"), 0, 0)
    queued = client._out_packet[-1]["packet"]
    assert isinstance(queued, memoryview) and bytes(queued[1:]) == b"bc"


def test_the_pump_survives_paho_unregistering_a_closed_socket_even_after_its_loop_closed() -> None:
    """Seen once in a full run: a client collected late called ``on_socket_unregister_write``
    from paho's ``__del__`` with a socket already closed (``fileno() == -1``), and the pump
    raised ``ValueError: Invalid file descriptor: -1`` out of ``__del__``."""
    import asyncio
    import socket

    from paho.mqtt.enums import CallbackAPIVersion

    from unus_edge.transport._pump import SocketPump

    loop = asyncio.new_event_loop()
    client = paho.Client(CallbackAPIVersion.VERSION2)
    pump = SocketPump(loop, client)
    left, right = socket.socketpair()
    try:
        pump._on_socket_register_write(client, None, left)  # watched for writes under its fd
        fd = left.fileno()
        assert pump._writer_fd == fd
        left.close()
        pump._on_socket_unregister_write(client, None, left)  # closed: fileno() is -1
        watched = {key.fd for key in loop._selector.get_map().values()}  # type: ignore[attr-defined]
        assert pump._writer_fd == -1 and fd not in watched
    finally:
        right.close()
        pump.close()
        loop.close()
    pump._on_socket_unregister_write(client, None, left)  # after the loop closed: nothing to do
