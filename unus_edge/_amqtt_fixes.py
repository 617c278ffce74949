"""Four defects of amqtt 0.12's broker, fixed in a subclass for the embedded broker.

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

The fourth is a duplicate: **a client that subscribes and unsubscribes at once (a device
fetching the retained model, protocol.md "Model delivery") can get two models**, the retained copy
and the next publication (measured: 8 of 40 fetches racing a publication through amqtt, 0 through
Mosquitto; 1.32 models per update at s = inf in the staleness benchmark). Three windows cause it,
and each is closed:

* amqtt's SUBSCRIBE handler *awaits* the delivery of the retained copies (for QoS 1, the
  client's PUBACK) before the session reads its next packet, so the subscription outlives the
  client's UNSUBSCRIBE by a full model transfer and catches the next publication. Fixed by
  sending the retained copies from tasks (:meth:`FixedBroker._handle_subscription`).
* The retained copies are read after the SUBACK and an event hook, so a publication stored in
  between reaches the subscriber twice. Fixed by reading them in the same step that adds the
  subscription.
* A publication updates the retained store when it arrives, but its broadcast runs later, from a
  queue, and sends to whoever is subscribed *then*; a subscriber that came in between gets the
  new retained copy and the broadcast. Fixed by deciding a broadcast's recipients when it is
  queued, in the same step as the retained store's update (:meth:`FixedBroker._run_broadcast`
  sends to those still subscribed).

Each step above is one stretch of code without an ``await``, so the event loop cannot run a
SUBSCRIBE between them: a subscriber gets a publication either as the broadcast or as the
retained copy, never both.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import ItemsView, Iterator
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_1, QOS_2
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


_REFUSED = 0x80
"""A SUBACK return code: the subscription was refused."""


class FixedBroker(Broker):  # type: ignore[misc]
    """amqtt's ``Broker`` with the four defects above fixed."""

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

    def _retained_for(self, topic_filter: str, qos: int) -> list[tuple[str, bytes | bytearray, int]]:
        """The retained messages a new subscription to ``topic_filter`` gets, read now."""
        return [(retained.topic, retained.data, min(qos, retained.qos or qos))
                for topic, retained in self._retained_messages.items() if self._matches(topic, topic_filter)]

    async def _handle_subscription(self, client_session: Session, handler: Any,
                                   subscribe_waiter: asyncio.Future[Any]) -> None:
        subscriptions = subscribe_waiter.result()
        return_codes: list[int] = []
        retained: list[list[tuple[str, bytes | bytearray, int]]] = []
        for topic_filter, qos in subscriptions.topics:
            code = await self.add_subscription((topic_filter, qos), client_session)
            # no await between adding the subscription and reading the retained store
            retained.append(self._retained_for(topic_filter, code) if code != _REFUSED else [])
            return_codes.append(code)
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, return_codes)
        for (topic_filter, qos), code, messages in zip(subscriptions.topics, return_codes, retained, strict=True):
            if code == _REFUSED:
                continue
            await self.plugins_manager.fire_event(BrokerEvents.CLIENT_SUBSCRIBED, client_id=client_session.client_id,
                                                  topic=topic_filter, qos=qos)
            for topic, data, message_qos in messages:
                # a task, not an await: the session goes on to its next packet (an UNSUBSCRIBE)
                self._tasks_queue.append(asyncio.ensure_future(
                    handler.mqtt_publish(topic, data, message_qos, retain=True)))

    async def _broadcast_message(self, session: Session | None, topic: str | None, data: bytes | bytearray | None,
                                 force_qos: int | None = None) -> None:
        broadcast = QuietBroadcast(session=session, topic=topic, data=data)
        if force_qos is not None:
            broadcast["qos"] = force_qos
        # the recipients are decided now, with the retained store's update that follows
        broadcast["recipients"] = [(topic_filter, list(subscribers))
                                   for topic_filter, subscribers in self._subscriptions.items()
                                   if topic is not None and self._matches(topic, topic_filter)]
        await self._broadcast_queue.put(broadcast)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """amqtt's broadcast of one queued message, to its recipients that are still subscribed."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for topic_filter, recipients in broadcast.get("recipients", ()):
            current = {subscriber.client_id for subscriber, _qos in self._subscriptions.get(topic_filter, ())}
            for target_session, subscription_qos in recipients:
                if target_session.client_id not in current:
                    continue
                qos = broadcast.get("qos", subscription_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target_session.transitions.state == "connected"
                if (not connected and not target_session.clean_session and qos in (QOS_1, QOS_2)
                        and not target_session.is_anonymous):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session) if connected else None
                if handler is not None:
                    running_tasks.append(asyncio.ensure_future(
                        handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))
