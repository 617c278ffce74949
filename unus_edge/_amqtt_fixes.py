"""Three defects of amqtt 0.12's broker, fixed in a subclass for the embedded broker.

The first two are in the code a CONNECT runs (``Broker._handle_client_session``), which loops over the
broker-wide subscription table, ``for topic in self._subscriptions``, and for every topic filter
*any* client subscribed to awaits ``_publish_retained_messages_for_subscription(filter,
connecting_session)``:

* **A connecting client gets retained messages it never subscribed to**, without the
  ``_topic_filtering`` (ACL) check a subscription runs. Fixed by publishing a filter's retained
  messages only to a session that holds that subscription (:meth:`FixedBroker.
  _publish_retained_messages_for_subscription`); a SUBSCRIBE adds the subscription before it
  calls this, so subscriptions keep getting their retained messages.
* **Connections die when clients connect together.** The loop awaits while iterating the live
  dict, so a subscription made meanwhile by another client raises ``RuntimeError: dictionary
  changed size during iteration`` and kills the connecting client's session handler (seen with
  10 device processes connecting at once; docs/open-work.md). The same pattern is in the
  broadcast loop (``for k_filter, subscriptions in self._subscriptions.items()`` around
  awaits). Fixed by a table whose iteration walks a snapshot (:class:`SnapshotDict`).

The third is a cost: **every message is formatted into a debug string, payload and all**.
``Broker._run_broadcast`` starts with ``logger.debug(f"Processing broadcast message:
{broadcast}")``; the f-string is built whether or not debug logging is on, and the repr of a
40 MB payload takes 0.13 s and a 40 MB string (measured; docs/brokers.md, gap 9). Fixed by
queueing broadcasts as a :class:`QuietBroadcast`, a dict whose repr leaves the payload out
(:meth:`FixedBroker._broadcast_message`).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator
from typing import Any

from amqtt.broker import Broker
from amqtt.session import Session

__all__ = ["FixedBroker", "QuietBroadcast", "SnapshotDict"]


class SnapshotDict(dict[str, Any]):
    """A dict whose iteration (``for k in d``, ``d.items()``) walks a copy taken when it starts."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        return dict(super().items()).items()


class QuietBroadcast(dict[str, Any]):
    """amqtt's broadcast record, whose repr names the payload's size instead of spelling it out."""

    def __repr__(self) -> str:
        data = self.get("data")
        size = len(data) if data is not None else 0
        return f"{{topic: {self.get('topic')!r}, qos: {self.get('qos')!r}, data: {size} bytes}}"

    __str__ = __repr__


class FixedBroker(Broker):  # type: ignore[misc]
    """amqtt's ``Broker`` with the three defects above fixed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions: dict[str, Any] = SnapshotDict(self._subscriptions)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter = subscription[0]
        subscribers = self._subscriptions.get(topic_filter, ())
        if not any(subscriber.client_id == session.client_id for subscriber, _qos in subscribers):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _broadcast_message(self, session: Session | None, topic: str | None, data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        broadcast = QuietBroadcast(session=session, topic=topic, data=data)
        if force_qos is not None:
            broadcast["qos"] = force_qos
        await self._broadcast_queue.put(broadcast)
