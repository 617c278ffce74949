"""The subscription table of the embedded broker can change while amqtt iterates it."""

from __future__ import annotations

import asyncio

from unus_edge._amqtt_fixes import FixedBroker, SnapshotDict


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
