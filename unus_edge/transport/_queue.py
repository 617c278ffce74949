"""The receive queue of :class:`~unus_edge.transport.MqttTransport`: bounded, with hysteresis.

Private to :mod:`unus_edge.transport._mqtt`. The queue holds received messages in arrival order
and counts their payload bytes; it decides, the transport acts:

* :attr:`ReceiveQueue.full` when either bound (messages or bytes) is reached: the transport
  stops reading its socket, so TCP backpressure reaches the broker; nothing is ever dropped;
* :attr:`ReceiveQueue.drained` when it is back to half of both bounds: reading resumes.

A single consumer waits for messages with :meth:`ReceiveQueue.wait`; :meth:`ReceiveQueue.wake`
also releases it without a message (the transport is closing).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator

from unus_edge.transport._base import ReceivedMessage

__all__ = ["ReceiveQueue"]


class ReceiveQueue:
    """Received messages, first in first out, bounded in count and in payload bytes."""

    __slots__ = ("_messages", "_waiter", "max_bytes", "max_messages", "nbytes")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.nbytes = 0
        """Payload bytes held now."""
        self._messages: collections.deque[ReceivedMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[ReceivedMessage]:
        return iter(self._messages)

    @property
    def full(self) -> bool:
        """Either bound is reached: stop reading the socket."""
        return len(self._messages) >= self.max_messages or self.nbytes >= self.max_bytes

    @property
    def drained(self) -> bool:
        """Down to half of both bounds: read the socket again."""
        return len(self._messages) <= self.max_messages // 2 and self.nbytes <= self.max_bytes // 2

    def put(self, message: ReceivedMessage) -> None:
        """Append ``message`` (never refused: the bounds are the caller's to enforce) and wake the consumer."""
        self._messages.append(message)
        self.nbytes += len(message.payload)
        self.wake()

    def pop(self) -> ReceivedMessage:
        """The oldest message; the queue must not be empty."""
        message = self._messages.popleft()
        self.nbytes -= len(message.payload)
        return message

    async def wait(self) -> None:
        """Until the next :meth:`put` or :meth:`wake`; the caller checks what changed."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def wake(self) -> None:
        """Release the waiting consumer, if any."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
