"""Asyncio MQTT transports behind one seam.

* :class:`MqttTransport`: a real MQTT 3.1.1 client (paho-mqtt, driven by the event loop), with
  QoS 0/1/2, last will, persistent sessions, TLS, automatic reconnection with jittered backoff,
  and a bounded receive queue with backpressure.
* :class:`MemoryTransport` + :class:`MemoryBroker`: the same interface in memory, for unit tests.
"""

from __future__ import annotations

from unus_edge.transport._base import (
    Backoff,
    ConnectionListener,
    ConnectOptions,
    ReceivedMessage,
    TLSOptions,
    Transport,
    Will,
    connect_unless_stopped,
    options_from_url,
    redact_url,
    topic_matches,
)
from unus_edge.transport._memory import MemoryBroker, MemoryTransport
from unus_edge.transport._mqtt import MqttTransport

__all__ = [
    "Backoff",
    "ConnectOptions",
    "ConnectionListener",
    "MemoryBroker",
    "MemoryTransport",
    "MqttTransport",
    "ReceivedMessage",
    "TLSOptions",
    "Transport",
    "Will",
    "connect_unless_stopped",
    "options_from_url",
    "redact_url",
    "topic_matches",
]
