"""The in-memory broker keeps the MQTT semantics the services rely on."""

from __future__ import annotations

import asyncio

from unus_edge.transport import ConnectOptions, MemoryBroker, MemoryTransport, ReceivedMessage, Will


async def next_message(transport: MemoryTransport) -> ReceivedMessage:
    async for message in transport.messages():
        return message
    raise AssertionError("closed")


def test_retained_will_persistent_session_and_qos_downgrade() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker) as publisher:
            await publisher.publish("j/model", b"v1", retain=True)
            late = MemoryTransport(broker)
            await late.connect()
            await late.subscribe("j/#", qos=0)
            message = await next_message(late)
            assert (message.payload, message.retain, message.qos) == (b"v1", True, 0)

            device = MemoryTransport(broker, ConnectOptions(client_id="d1", clean_session=False,
                                                            will=Will("j/d1/status", b"offline")))
            await device.connect()
            await device.subscribe("j/d1/tasks")
            await device.close()
            await publisher.publish("j/d1/tasks", b"task-1", qos=1)
            await publisher.publish("j/d1/tasks", b"lost-at-qos0", qos=0)
            again = MemoryTransport(broker, ConnectOptions(client_id="d1", clean_session=False,
                                                           will=Will("j/d1/status", b"offline")))
            await again.connect()
            assert (await next_message(again)).payload == b"task-1"
            again.kill()
            will = await next_message(late)
            assert will.topic == "j/d1/tasks"  # live traffic first (QoS 0 copy) ...
            assert (await next_message(late)).topic == "j/d1/tasks"
            assert (await next_message(late)).payload == b"offline"  # ... then the will

    asyncio.run(scenario())


def test_empty_retained_payload_clears() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker) as client:
            await client.publish("a", b"x", retain=True)
            await client.publish("a", b"", retain=True)
        assert broker.retained == {}

    asyncio.run(scenario())
