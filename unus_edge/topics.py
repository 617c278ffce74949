"""The MQTT topic tree, in one place: pure builders and parsers, no I/O.

Everything lives under a versioned root, ``unus/v1/{job}/``. The ``v1`` segment changes only
with an incompatible change of the tree itself; payload changes bump the envelope ``schema``
(see :mod:`unus_edge.codec`).

========================================  ======  ====  ======  ===========================
topic (under ``unus/v1/{job}/``)          format  QoS   retain  publisher -> subscriber
========================================  ======  ====  ======  ===========================
``devices/{device_id}/status``            JSON    1     yes     device (and its last will)
                                                                -> aggregator, monitor
``devices/{device_id}/heartbeat``         JSON    0     no      device -> aggregator, monitor
``devices/{device_id}/register``          CBOR    1     no      device -> aggregator
``devices/{device_id}/update``            CBOR    1     no      device -> aggregator
``devices/{device_id}/tasks``             CBOR    1     no      aggregator -> that device
``model``                                 CBOR    1     yes     aggregator -> devices
``clock``                                 CBOR    1     yes     aggregator -> devices
``release``                               CBOR    1     yes     aggregator -> devices
``aggregator/status``                     JSON    1     yes     aggregator (and its will)
``metrics/{name}``                        JSON    1     yes     aggregator -> operators
``metrics/devices/{device_id}``           JSON    1     yes     aggregator -> operators
========================================  ======  ====  ======  ===========================

Why these QoS and retain flags
    * **status** is the presence of a device. It is *retained* so that an aggregator or monitor
      that starts later learns the fleet at once, and it is the *last-will* topic: the broker
      publishes ``offline`` for a device whose connection dies. QoS 1 because a lost
      ``offline`` would leave a ghost in the registry.
    * **heartbeat** proves liveness where the broker does not enforce keepalive (amqtt). It is
      periodic, so losing one is harmless: QoS 0, not retained (a retained heartbeat would make
      a dead device look alive to a late subscriber).
    * **register**, **update** and **tasks** are commands that must arrive exactly once at the
      application. QoS 1 with persistent sessions gives at-least-once delivery, also to a device
      that is offline when its task is published; duplicates are removed by ``msg_id``. Not
      retained: a retained task or update would be replayed to every future session. QoS 2 is
      not used: its extra round trip buys nothing that ``msg_id`` deduplication does not, and
      several brokers (amqtt among them) implement it poorly.
    * **model** and **clock** are *state*, not events: a device that (re)connects must get the
      latest global model and clock at once, so both are retained, QoS 1. The clock carries the
      model version, so a device can tell whether the retained model it holds is current.
      Devices *subscribe* to the model at QoS 0, so a persistent session never has models
      queued for it while its device is away (docs/protocol.md, section 2).
    * **release** is the trained model handed to the fleet for use (at the job's end): retained,
      so a device that comes later still gets it; QoS 1.
    * **aggregator/status** is retained with a last will, so devices notice an aggregator that
      restarts (its ``session`` changes) or dies.
    * **metrics** are for people: JSON that ``mosquitto_sub -t 'unus/v1/JOB/metrics/#' -v``
      prints as is. Retained, so a monitor that starts late shows the current state. The fleet
      is a summary in counts on ``metrics/devices`` plus one retained topic per device
      (``metrics/devices/{device_id}``), so no payload grows with the fleet and a registration
      republishes one device, not all of them.

Names
    ``job`` and ``device_id`` are 1-64 characters of ``[A-Za-z0-9_.-]`` that do not start with
    ``.``; this keeps them free of MQTT wildcards (``+``, ``#``), separators (``/``) and the
    ``$`` prefix that brokers reserve.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from unus_edge.errors import ProtocolError

__all__ = [
    "ROOT",
    "TOPIC_SPECS",
    "Channel",
    "ParsedTopic",
    "TopicSpec",
    "aggregator_status",
    "all_device_filter",
    "clock",
    "device_filter",
    "device_metrics",
    "device_topic",
    "job_filter",
    "metrics",
    "metrics_filter",
    "model",
    "parse",
    "release",
    "validate_name",
]

ROOT: Final = "unus/v1"

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


class Channel(StrEnum):
    """The kinds of topic in the tree."""

    STATUS = "status"
    HEARTBEAT = "heartbeat"
    REGISTER = "register"
    UPDATE = "update"
    TASKS = "tasks"
    MODEL = "model"
    CLOCK = "clock"
    AGGREGATOR_STATUS = "aggregator_status"
    METRICS = "metrics"
    RELEASE = "release"
    PREDICT_REQUEST = "predict/request"
    """A local application's inputs for the device's released model (``device.serve_predictions``)."""
    PREDICT_RESPONSE = "predict/response"
    """The device's predictions, one message per request."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How a channel is published: payload format, QoS and retain flag."""

    format: str
    qos: int
    retain: bool


TOPIC_SPECS: Final[dict[Channel, TopicSpec]] = {
    Channel.STATUS: TopicSpec("json", 1, True),
    Channel.HEARTBEAT: TopicSpec("json", 0, False),
    Channel.REGISTER: TopicSpec("cbor", 1, False),
    Channel.UPDATE: TopicSpec("cbor", 1, False),
    Channel.TASKS: TopicSpec("cbor", 1, False),
    Channel.MODEL: TopicSpec("cbor", 1, True),
    Channel.CLOCK: TopicSpec("cbor", 1, True),
    Channel.AGGREGATOR_STATUS: TopicSpec("json", 1, True),
    Channel.METRICS: TopicSpec("json", 1, True),
    Channel.RELEASE: TopicSpec("cbor", 1, True),
    Channel.PREDICT_REQUEST: TopicSpec("cbor", 1, False),
    Channel.PREDICT_RESPONSE: TopicSpec("cbor", 1, False),
}

_DEVICE_CHANNELS: Final = {
    Channel.STATUS,
    Channel.HEARTBEAT,
    Channel.REGISTER,
    Channel.UPDATE,
    Channel.TASKS,
    Channel.PREDICT_REQUEST,
    Channel.PREDICT_RESPONSE,
}


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid job name or device id; raise ``ProtocolError`` if not."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        rule = "1-64 characters of [A-Za-z0-9_.-], not starting with '.'"
        raise ProtocolError("bad_name", f"{what} {value!r} must be {rule}")
    return value


def _job_root(job: str) -> str:
    return f"{ROOT}/{validate_name(job, 'job')}"


def device_topic(job: str, device_id: str, channel: Channel) -> str:
    """``unus/v1/{job}/devices/{device_id}/{channel}`` for the per-device channels."""
    if channel not in _DEVICE_CHANNELS:
        raise ValueError(f"{channel} is not a per-device channel")
    return f"{_job_root(job)}/devices/{validate_name(device_id, 'device id')}/{channel.value}"


def device_filter(job: str, channel: Channel) -> str:
    """Subscription filter for one channel of every device: ``.../devices/+/{channel}``."""
    if channel not in _DEVICE_CHANNELS:
        raise ValueError(f"{channel} is not a per-device channel")
    return f"{_job_root(job)}/devices/+/{channel.value}"


def all_device_filter(job: str) -> str:
    """Every per-device topic of the job: ``.../devices/#``."""
    return f"{_job_root(job)}/devices/#"


def model(job: str) -> str:
    """The retained global model."""
    return f"{_job_root(job)}/model"


def clock(job: str) -> str:
    """The retained clock: global model version and SSP clock state."""
    return f"{_job_root(job)}/clock"


def release(job: str) -> str:
    """The retained release: the trained model for the fleet to use."""
    return f"{_job_root(job)}/release"


def aggregator_status(job: str) -> str:
    """The retained aggregator presence (with its last will)."""
    return f"{_job_root(job)}/aggregator/status"


def metrics(job: str, name: str) -> str:
    """A retained human-readable metrics topic, e.g. ``metrics/round``."""
    return f"{_job_root(job)}/metrics/{validate_name(name, 'metrics name')}"


def device_metrics(job: str, device_id: str) -> str:
    """The retained facts of one device: ``.../metrics/devices/{device_id}``."""
    return f"{_job_root(job)}/metrics/devices/{validate_name(device_id, 'device_id')}"


def metrics_filter(job: str) -> str:
    """Every metrics topic of a job, the per-device facts included: ``.../metrics/#``."""
    return f"{_job_root(job)}/metrics/#"


def job_filter(job: str) -> str:
    """Everything of a job: ``unus/v1/{job}/#``."""
    return f"{_job_root(job)}/#"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a topic names: the job, the channel, and the device or metrics name if any."""

    job: str
    channel: Channel
    device_id: str = ""
    name: str = ""

    @property
    def spec(self) -> TopicSpec:
        return TOPIC_SPECS[self.channel]


def parse(topic: str) -> ParsedTopic:
    """Parse a concrete topic of the tree; ``ProtocolError("bad_topic")`` for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != ROOT or _NAME.fullmatch(parts[2]) is None:
        raise ProtocolError("bad_topic", topic)
    job, rest = parts[2], parts[3:]
    if rest == ["model"]:
        return ParsedTopic(job, Channel.MODEL)
    if rest == ["clock"]:
        return ParsedTopic(job, Channel.CLOCK)
    if rest == ["release"]:
        return ParsedTopic(job, Channel.RELEASE)
    if rest == ["aggregator", "status"]:
        return ParsedTopic(job, Channel.AGGREGATOR_STATUS)
    if len(rest) == 2 and rest[0] == "metrics" and _NAME.fullmatch(rest[1]):
        return ParsedTopic(job, Channel.METRICS, name=rest[1])
    if len(rest) == 3 and rest[:2] == ["metrics", "devices"] and _NAME.fullmatch(rest[2]):
        return ParsedTopic(job, Channel.METRICS, device_id=rest[2], name="devices")
    if len(rest) == 3 and rest[0] == "devices" and _NAME.fullmatch(rest[1]):
        try:
            channel = Channel(rest[2])
        except ValueError:
            raise ProtocolError("bad_topic", topic) from None
        if channel in _DEVICE_CHANNELS:
            return ParsedTopic(job, channel, device_id=rest[1])
    if len(rest) == 4 and rest[0] == "devices" and _NAME.fullmatch(rest[1]) and rest[2] == "predict" \
            and rest[3] in ("request", "response"):
        channel = Channel.PREDICT_REQUEST if rest[3] == "request" else Channel.PREDICT_RESPONSE
        return ParsedTopic(job, channel, device_id=rest[1])
    raise ProtocolError("bad_topic", topic)
