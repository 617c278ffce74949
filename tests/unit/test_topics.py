"""The topic tree: builders, parser, names, and filter matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unus_edge import topics
from unus_edge.errors import ProtocolError
from unus_edge.topics import Channel, ParsedTopic
from unus_edge.transport import topic_matches

names = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,20}", fullmatch=True)
device_channels = st.sampled_from(
    [Channel.STATUS, Channel.HEARTBEAT, Channel.REGISTER, Channel.UPDATE, Channel.TASKS]
)


@given(job=names, device_id=names, channel=device_channels)
def test_device_topics_round_trip(job: str, device_id: str, channel: Channel) -> None:
    topic = topics.device_topic(job, device_id, channel)
    assert topic == f"unus/v1/{job}/devices/{device_id}/{channel.value}"
    assert topics.parse(topic) == ParsedTopic(job, channel, device_id=device_id)
    assert topic_matches(topics.device_filter(job, channel), topic)
    assert topic_matches(topics.all_device_filter(job), topic)
    assert topic_matches(topics.job_filter(job), topic)
    assert not topic_matches(topics.device_filter(job + "x", channel), topic)


def test_job_level_topics() -> None:
    assert topics.parse(topics.model("mnist")) == ParsedTopic("mnist", Channel.MODEL)
    assert topics.parse(topics.clock("mnist")) == ParsedTopic("mnist", Channel.CLOCK)
    assert topics.parse(topics.aggregator_status("mnist")) == ParsedTopic("mnist", Channel.AGGREGATOR_STATUS)
    assert topics.parse(topics.metrics("mnist", "round")) == ParsedTopic("mnist", Channel.METRICS, name="round")
    assert topics.model("mnist") == "unus/v1/mnist/model"
    assert topics.parse(topics.release("mnist")) == ParsedTopic("mnist", Channel.RELEASE)
    facts = topics.device_metrics("mnist", "pi-7")
    assert facts == "unus/v1/mnist/metrics/devices/pi-7"
    assert topics.parse(facts) == ParsedTopic("mnist", Channel.METRICS, device_id="pi-7", name="devices")
    assert topic_matches(topics.metrics_filter("mnist"), facts)
    assert topic_matches(topics.metrics_filter("mnist"), topics.metrics("mnist", "devices"))


def test_every_channel_has_a_spec_and_retain_matches_the_design() -> None:
    retained = {channel for channel, spec in topics.TOPIC_SPECS.items() if spec.retain}
    assert retained == {Channel.STATUS, Channel.MODEL, Channel.CLOCK, Channel.AGGREGATOR_STATUS, Channel.METRICS,
                        Channel.RELEASE}
    assert set(topics.TOPIC_SPECS) == set(Channel)
    assert topics.TOPIC_SPECS[Channel.HEARTBEAT].qos == 0
    assert {topics.TOPIC_SPECS[c].format for c in (Channel.STATUS, Channel.HEARTBEAT, Channel.METRICS)} == {"json"}


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "$SYS", ".hidden", "x" * 65, "spa ce", "é"])
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        topics.device_topic("job", bad, Channel.UPDATE)
    assert caught.value.reason == "bad_name"


@pytest.mark.parametrize(
    "topic",
    [
        "unus/v2/job/model",
        "other/v1/job/model",
        "unus/v1/job",
        "unus/v1/job/devices/d1",
        "unus/v1/job/devices/d1/unknown",
        "unus/v1/job/devices/d1/update/extra",
        "unus/v1/job/devices/+/update",
        "unus/v1/job/metrics",
        "unus/v1/job/metrics/round/d1",
        "unus/v1/job/metrics/devices/d1/x",
        "unus/v1/job/metrics/devices/+",
        "unus/v1/j$b/model",
    ],
)
def test_foreign_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(ProtocolError):
        topics.parse(topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+", "a/b/c", False),
        ("a/b", "a/b", True),
        ("+/+", "a/b", True),
        ("a/+/+", "a/b", False),
    ],
)
def test_topic_filter_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected
