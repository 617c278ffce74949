"""The embedded broker's amqtt fixes: a subscription table that may change mid-iteration, quiet broadcasts."""

from __future__ import annotations

import asyncio

from unus_edge._amqtt_fixes import FixedBroker, QuietBroadcast, SnapshotDict


def test_iterating_walks_a_snapshot_while_the_table_changes() -> None:
    table = SnapshotDict({"a/#": [], "b/#": []})
    seen = []
    for topic in table:  # a plain dict raises RuntimeError at the next step
        seen.append(topic)
        table[f"new/{topic}"] = []
    for topic, subscribers in table.items():
        del table[topic]
        table[f"{topic}/again"] = subscribers
    assert seen == ["a/#", "b/#"]
    assert sorted(table) == ["a/#/again", "b/#/again", "new/a/#/again", "new/b/#/again"]


def test_the_broker_keeps_its_table_in_a_snapshot_dict() -> None:
    async def build() -> FixedBroker:  # amqtt's Broker wants a running loop; it is not started
        return FixedBroker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}})

    broker = asyncio.run(build())
    assert isinstance(broker._subscriptions, SnapshotDict)


def test_a_broadcast_is_formatted_without_its_payload() -> None:
    async def queued() -> object:
        broker = FixedBroker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}})
        await broker._broadcast_message(None, "job/model", b"\x00" * 5_000_000, force_qos=1)
        return broker._broadcast_queue.get_nowait()

    broadcast = asyncio.run(queued())
    assert isinstance(broadcast, QuietBroadcast)
    assert dict(broadcast) == {"session": None, "topic": "job/model", "data": b"\x00" * 5_000_000, "qos": 1,
                               "recipients": []}  # nobody subscribed when it was queued
    text = f"Processing broadcast message: {broadcast}"  # what amqtt builds for every message
    assert "5000000 bytes" in text and "job/model" in text and len(text) < 200
