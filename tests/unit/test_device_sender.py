"""Messages to devices go through one queue in bounded batches, in order (issue 21)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from unus_edge.aggregator._sender import DeviceSender
from unus_edge.errors import PublishError
from unus_edge.messages import Ack, Message


class Wire:
    """A publish that records the order and the most messages awaiting their PUBACK at once."""

    def __init__(self, fail_on: str = "") -> None:
        self.order: list[tuple[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_on = fail_on

    async def publish(self, device_id: str, message: Message) -> None:
        assert isinstance(message, Ack)
        self.order.append((device_id, message.update_msg_id))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # the PUBACK comes later
        self.in_flight -= 1
        if message.update_msg_id == self.fail_on:
            raise PublishError(f"devices/{device_id}/tasks", "refused")


def ack(msg_id: str) -> Ack:
    return Ack("d", msg_id, "t", True)


def running(tasks: list[asyncio.Task[object]]) -> Any:
    def spawn(coroutine: Coroutine[Any, Any, object], name: str) -> bool:
        tasks.append(asyncio.get_running_loop().create_task(coroutine, name=name))
        return True

    return spawn


def test_a_burst_goes_out_in_order_in_bounded_batches() -> None:
    async def scenario() -> tuple[Wire, DeviceSender]:
        wire, tasks = Wire(), []
        sender = DeviceSender(wire.publish, running(tasks), in_flight=64)
        for index in range(1000):
            sender.post(f"d{index % 7}", ack(f"m{index:04d}"))
        await sender.send("d0", ack("task"))  # queued behind the burst: sent after it, and waited for
        await asyncio.gather(*tasks)
        return wire, sender

    wire, sender = asyncio.run(scenario())
    assert [msg_id for _, msg_id in wire.order] == [f"m{i:04d}" for i in range(1000)] + ["task"]
    assert wire.most_in_flight == 64
    assert sender.sent == 1001 and sender.batches == 16  # ceil(1001 / 64)
    assert len(sender) == 0


def test_a_failed_send_raises_to_its_caller_and_the_rest_still_go_out() -> None:
    async def scenario() -> Wire:
        wire, tasks = Wire(fail_on="bad"), []
        sender = DeviceSender(wire.publish, running(tasks))
        sender.post("d1", ack("first"))
        with pytest.raises(PublishError):
            await sender.send("d2", ack("bad"))
        await sender.send("d3", ack("after"))
        await asyncio.gather(*tasks)
        return wire

    assert [msg_id for _, msg_id in asyncio.run(scenario()).order] == ["first", "bad", "after"]


def test_a_failed_post_fails_the_drain_task() -> None:
    async def scenario() -> BaseException | None:
        wire, tasks = Wire(fail_on="bad"), []
        sender = DeviceSender(wire.publish, running(tasks))
        sender.post("d1", ack("bad"))
        outcome = await asyncio.gather(*tasks, return_exceptions=True)
        return outcome[0] if isinstance(outcome[0], BaseException) else None

    assert isinstance(asyncio.run(scenario()), PublishError)  # the service's task group sees it


def test_when_the_service_is_not_running_send_publishes_and_post_drops() -> None:
    async def scenario() -> Wire:
        wire = Wire()

        def refuse(coroutine: Coroutine[Any, Any, object], name: str) -> bool:
            coroutine.close()
            return False

        sender = DeviceSender(wire.publish, refuse)
        sender.post("d1", ack("dropped"))
        await sender.send("d1", ack("direct"))
        assert len(sender) == 0
        return wire

    assert [msg_id for _, msg_id in asyncio.run(scenario()).order] == ["direct"]


def test_a_cancelled_drain_cancels_the_waiting_senders() -> None:
    async def scenario() -> bool:
        tasks: list[asyncio.Task[object]] = []
        published, never = asyncio.Event(), asyncio.Event()

        async def stuck(device_id: str, message: Message) -> None:
            published.set()
            await never.wait()  # a PUBACK that never comes

        sender = DeviceSender(stuck, running(tasks))
        waiter = asyncio.create_task(sender.send("d1", ack("m")))
        await published.wait()
        tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return len(sender) == 0

    assert asyncio.run(scenario())
