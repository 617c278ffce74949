"""Messages: every kind round-trips on its channel; invalid bodies are refused with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unus_edge import messages as m
from unus_edge.codec import Envelope, dumps, encode
from unus_edge.errors import MessageError, ProtocolError
from unus_edge.topics import TOPIC_SPECS, Channel

SAMPLES: list[tuple[m.Message, Channel]] = [
    (m.Status("d1", "online", "s1", software_version="0.1.0"), Channel.STATUS),
    (m.Status("aggregator", "offline", "s2", role="aggregator", reason="will"), Channel.AGGREGATOR_STATUS),
    (m.Heartbeat("d1", "s1", 7, "training", clock=3, uptime_seconds=12.5), Channel.HEARTBEAT),
    (m.Registration("d1", "s1", 600, "sha256:ab", "0.1.0", "Linux", "aarch64", "3.11.2", 4, 8 << 30,
                    ("onnxruntime",)), Channel.REGISTER),
    (m.RegistrationReply("d1", False, "agg", "fingerprint_mismatch", "expected sha256:cd"), Channel.TASKS),
    (m.Task("d1", "t1", 4, 4, 1, 10, 0.1, config={"proximal_mu": 0.01, "note": "x", "flag": True}), Channel.TASKS),
    (m.Update("d1", "s1", "t1", 4, 4, 600, 0.25, {"w": np.ones((2, 2), np.float32)}, clock=3,
              metrics={"accuracy": 0.9}), Channel.UPDATE),
    (m.Ack("d1", "u1", "t1", True, clock=4), Channel.TASKS),
    (m.EvaluateTask("d1", "e1.x.d1", 3, 3, 30.0), Channel.TASKS),
    (m.EvaluationResult("d1", "s1", "e1.x.d1", 3, 60, 0.4, 0.9, "held_out"), Channel.UPDATE),
    (m.EvaluationResult("d1", "s1", "e1.x.d1", 3, 0, error="no model"), Channel.UPDATE),
    (m.FederatedMetrics(3, 3, 5, 4, 1, 240, 0.4, 0.9, 0.02, 0.87, 0.93, 0.05, 0, 1.2), Channel.METRICS),
    (m.GlobalModel(5, 5, "sha256:ab", "agg", {"w": np.zeros(3, np.float32)}), Channel.MODEL),
    (m.Clock(5, 5, "agg", c_min=2, staleness_bound=None, live_devices=3, clocks={"d1": 2}), Channel.CLOCK),
    (m.RoundMetrics(5, 5, 10, 9, 1, 5400, 3.2, 0.3, 0.28, 0.91, 100, 200, {"nan_or_inf": 1}), Channel.METRICS),
    (m.FleetMetrics(3, 2, {"Linux-aarch64": 2, "other": 1}), Channel.METRICS),
    (m.DeviceFacts("d1", True, 1.5, 3, None, 600, 3, "Linux-aarch64"), Channel.METRICS),
    (m.JobMetrics("running", "FedAvg", 5, 100, 5, "agg", eval_accuracy=0.9), Channel.METRICS),
]


@pytest.mark.parametrize(("message", "channel"), SAMPLES, ids=[type(s[0]).__name__ for s in SAMPLES])
def test_every_kind_round_trips(message: m.Message, channel: Channel) -> None:
    payload = m.encode_message(message, "job", channel, msg_id="abc")
    envelope, decoded = m.decode_message(payload, channel)
    assert envelope.msg_id == "abc"
    assert envelope.job == "job"
    assert type(decoded) is type(message)
    for name in message.body():
        assert getattr(decoded, name) == getattr(message, name), name
    for name, array in message.tensors_or_empty().items():
        np.testing.assert_array_equal(decoded.tensors_or_empty()[name], array)  # type: ignore[arg-type]


def test_human_facing_channels_are_plain_json() -> None:
    payload = m.encode_message(m.Status("d1", "online", "s1"), "job", Channel.STATUS)
    document = json.loads(payload)
    assert document["body"]["state"] == "online"
    assert document["kind"] == "status"


def body_of(message: m.Message) -> dict[str, object]:
    return dict(message.body())


def decode_body(kind: str, body: dict[str, object], channel: Channel) -> m.Message:
    fmt = TOPIC_SPECS[channel].format
    return m.decode_message(encode(Envelope(kind, "job", body), format=fmt), channel)[1]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("num_examples", "600", "bad_field"),
        ("num_examples", True, "bad_field"),  # a boolean is not an integer
        ("num_examples", 0, "bad_field"),  # validate(): at least one example
        ("num_examples", 1.5, "bad_field"),
        ("capabilities", "onnxruntime", "bad_field"),
        ("capabilities", [1], "bad_field"),
        ("device_id", None, "bad_field"),
    ],
)
def test_invalid_fields_are_refused(field: str, value: object, reason: str) -> None:
    registration = m.Registration("d1", "s1", 600, "sha256:ab", "0.1.0")
    body = body_of(registration)
    body[field] = value
    with pytest.raises(MessageError) as caught:
        decode_body("register", body, Channel.REGISTER)
    assert caught.value.reason == reason
    assert caught.value.field == field


def test_missing_required_field_names_it() -> None:
    body = body_of(m.Registration("d1", "s1", 600, "sha256:ab", "0.1.0"))
    del body["model_fingerprint"]
    with pytest.raises(MessageError) as caught:
        decode_body("register", body, Channel.REGISTER)
    assert (caught.value.reason, caught.value.field) == ("missing_field", "model_fingerprint")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = body_of(m.Heartbeat("d1", "s1", 1))
    body["battery"] = 0.5
    assert decode_body("heartbeat", body, Channel.HEARTBEAT) == m.Heartbeat("d1", "s1", 1)


def test_literal_nan_and_wrong_kind_are_refused() -> None:
    body = body_of(m.Heartbeat("d1", "s1", 1))
    with pytest.raises(MessageError):
        decode_body("heartbeat", {**body, "state": "dancing"}, Channel.HEARTBEAT)
    task = body_of(m.Task("d1", "t1", 1, 1, 1, 10, 0.1))
    with pytest.raises(MessageError):
        m.decode_message(dumps({"schema": 1, "kind": "task", "job": "j", "msg_id": "x", "ts": 1.0,
                                "body": {**task, "learning_rate": float("nan")}}), Channel.TASKS)
    with pytest.raises(MessageError) as caught:
        m.decode_message(m.encode_message(m.Ack("d", "u", "t", True), "job", Channel.TASKS), Channel.UPDATE)
    assert caught.value.reason == "unexpected_kind"


def test_tensors_on_a_tensorless_kind_are_refused() -> None:
    payload = encode(Envelope("ack", "job", body_of(m.Ack("d", "u", "t", True)), {"w": np.zeros(1, np.float32)}))
    with pytest.raises(MessageError):
        m.decode_message(payload, Channel.TASKS)


def test_encode_refuses_a_kind_on_the_wrong_channel() -> None:
    with pytest.raises(MessageError):
        m.encode_message(m.Ack("d", "u", "t", True), "job", Channel.MODEL)


def test_decode_raises_only_protocol_errors_on_garbage() -> None:
    for payload in (b"", b"\xa0", b"{}", b"\x00" * 10, json.dumps({"schema": 1}).encode()):
        for channel in Channel:
            with pytest.raises(ProtocolError):
                m.decode_message(payload, channel)
