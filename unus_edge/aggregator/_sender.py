"""Messages to devices: one queue, sent in bounded batches (issue 21).

A fleet of thousands registers within seconds, and each registration, update and task is
answered on the device's own ``tasks`` topic. One task per answer (what the aggregator did
before) held a coroutine, a task object and a payload per device, all at once, and a round's
tasks went out as one ``gather`` of the whole fleet. Here every message to a device joins one
queue that a drain task empties, ``in_flight`` at a time (each QoS 1 publish waits for its
PUBACK): the memory of a burst is a queue entry per device, and whatever arrives while a batch
is under way goes out with the next one.

Two ways in: :meth:`DeviceSender.post` queues and returns (registration replies, acks), and
:meth:`DeviceSender.send` queues and waits until the message is published, raising what the
publish raised (tasks). Because both go through the one queue, the messages to a device keep
the order they were given in: a registration reply is never overtaken by the task that the
same registration started (a batch is published in queue order, and paho sends in the order
it is called).

No I/O of its own: ``publish`` (the aggregator's) sends one message, and ``spawn`` starts the
drain task in the service's task group and says whether it could. When the service is not
running, ``send`` publishes directly (the shutdown path) and ``post`` drops the message, as the
service drops what it would spawn.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from unus_edge.messages import Message

__all__ = ["IN_FLIGHT", "DeviceSender", "send_in_batches"]

Publish = Callable[[str, Message], Awaitable[None]]
_Entry = tuple[str, Message, "asyncio.Future[None] | None"]

IN_FLIGHT = 256
"""Messages published concurrently, by default."""


async def send_in_batches(send: Publish, messages: Sequence[tuple[str, Message]], in_flight: int = IN_FLIGHT) -> None:
    """Send ``(device_id, message)`` pairs, at most ``in_flight`` awaited at a time."""
    for start in range(0, len(messages), in_flight):
        await asyncio.gather(*(send(device_id, message) for device_id, message in messages[start:start + in_flight]))


class DeviceSender:
    """The queue of messages to devices and the task that drains it in batches."""

    def __init__(self, publish: Publish, spawn: Callable[[Coroutine[Any, Any, object], str], bool], *,
                 in_flight: int = IN_FLIGHT) -> None:
        self._publish = publish
        self._spawn = spawn
        self.in_flight = in_flight
        self._queue: collections.deque[_Entry] = collections.deque()
        self._batch: list[_Entry] = []
        self._draining = False
        self.batches = 0
        """Batches published so far (for tests and benchmarks)."""
        self.sent = 0

    def __len__(self) -> int:
        return len(self._queue)

    def post(self, device_id: str, message: Message) -> None:
        """Queue a message for ``device_id``; it goes out with the next batch."""
        if self._ensure_draining():
            self._queue.append((device_id, message, None))

    async def send(self, device_id: str, message: Message) -> None:
        """Queue a message and wait until it is published (raises what publishing raised)."""
        if not self._ensure_draining():
            await self._publish(device_id, message)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((device_id, message, future))
        await future

    def _ensure_draining(self) -> bool:
        if not self._draining:
            self._draining = self._spawn(self._drain(), "aggregator-send")
        return self._draining

    async def _drain(self) -> None:
        try:
            while self._queue:
                self._batch = [self._queue.popleft() for _ in range(min(self.in_flight, len(self._queue)))]
                results = await asyncio.gather(*(self._publish(device_id, message)
                                                 for device_id, message, _ in self._batch), return_exceptions=True)
                failure: BaseException | None = None
                for (_, _, future), result in zip(self._batch, results, strict=True):
                    if future is None:
                        failure = failure or (result if isinstance(result, BaseException) else None)
                    elif not future.done():
                        if isinstance(result, BaseException):
                            future.set_exception(result)
                        else:
                            future.set_result(None)
                self.batches += 1
                self.sent += len(self._batch)
                self._batch = []
                if failure is not None:  # a posted message nobody waits for: the service's failure
                    raise failure
        finally:
            self._draining = False
            for _, _, future in (*self._batch, *self._queue):  # the service stopped: nobody sends them
                if future is not None and not future.done():
                    future.cancel()
            self._batch = []
            self._queue.clear()
