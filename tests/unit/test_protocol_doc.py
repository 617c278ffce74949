"""docs/protocol.md and the code agree: every message kind and field is documented, and back."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from tests.brokers import REPO
from unus_edge import messages as m
from unus_edge.codec import DTYPES
from unus_edge.topics import TOPIC_SPECS, Channel

DOC = (REPO / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("cls", sorted({c for kinds in m.CHANNEL_KINDS.values() for c in kinds} | {m.DeviceFacts},
                                       key=lambda c: c.KIND))
def test_every_message_field_is_documented(cls: type[m.Message]) -> None:
    assert f"`{cls.KIND}`" in DOC, cls.KIND
    for field in fields(cls):  # type: ignore[arg-type]
        if field.name != "tensors":
            assert f"`{field.name}`" in DOC, f"{cls.KIND}.{field.name}"


def test_topic_table_matches_the_specs() -> None:
    rows = {
        Channel.STATUS: "devices/{device_id}/status",
        Channel.HEARTBEAT: "devices/{device_id}/heartbeat",
        Channel.REGISTER: "devices/{device_id}/register",
        Channel.UPDATE: "devices/{device_id}/update",
        Channel.TASKS: "devices/{device_id}/tasks",
        Channel.MODEL: "model",
        Channel.CLOCK: "clock",
        Channel.RELEASE: "release",
        Channel.AGGREGATOR_STATUS: "aggregator/status",
        Channel.METRICS: "metrics/{name}",
    }
    for channel, topic in rows.items():
        spec = TOPIC_SPECS[channel]
        retain = "yes" if spec.retain else "no"
        pattern = rf"\| `{re.escape(topic)}` \| {spec.format.upper()} \| {spec.qos} \| {retain} \|"
        assert re.search(pattern, DOC), topic


def test_dtype_allow_list_is_documented() -> None:
    for name in DTYPES:
        assert f"`{name}`" in DOC
