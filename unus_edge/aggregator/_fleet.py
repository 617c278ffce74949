"""The fleet on the metrics topics: a summary in counts, and each device's facts (issue 21).

``metrics/devices`` carries the fleet in counts (:class:`~unus_edge.messages.FleetMetrics`) and
``metrics/devices/{device_id}`` one device's facts, retained. A publication sends the facts of
the devices that changed since the previous one (the registry collects them,
:meth:`~unus_edge.aggregator._registry.Registry.take_changed`), ``in_flight`` at a time, then the
summary: its cost follows the changes, not the fleet. Changes are coalesced
(:class:`~unus_edge.aggregator._coalesce.Coalescer`): at most one publication per
``job.fleet_interval``, and the last change is never lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from unus_edge import topics
from unus_edge.aggregator._coalesce import Coalescer
from unus_edge.aggregator._registry import Registry
from unus_edge.messages import FleetMetrics, Message
from unus_edge.topics import Channel

__all__ = ["FleetPublisher"]

Publish = Callable[[str, Channel, Message], Awaitable[int]]


class FleetPublisher:
    """Publishes the registry's changes; :meth:`mark` after every change."""

    def __init__(self, job: str, registry: Registry, publish: Publish,
                 spawn: Callable[[Coroutine[Any, Any, object], str], None], interval: float, *,
                 in_flight: int = 256) -> None:
        self.job = job
        self.registry = registry
        self._publish = publish
        self.in_flight = in_flight
        self._coalescer = Coalescer(lambda: spawn(self.publish(), "aggregator-fleet-metrics"), interval)

    @property
    def pending(self) -> bool:
        return self._coalescer.pending

    def mark(self) -> None:
        """The registry changed: publish soon (coalesced)."""
        self._coalescer.mark()

    def cancel(self) -> None:
        """Drop a coalesced publication not yet started (the goodbye publishes itself)."""
        self._coalescer.cancel()

    async def publish(self) -> None:
        """The facts of the devices that changed, then the summary."""
        registry = self.registry
        changed = registry.take_changed()
        for start in range(0, len(changed), self.in_flight):
            batch = changed[start:start + self.in_flight]
            try:
                await asyncio.gather(*(self._publish(topics.device_metrics(self.job, record.device_id),
                                                     Channel.METRICS, record.facts()) for record in batch))
            except BaseException:
                registry.mark_changed(record.device_id for record in changed[start:])  # the next one sends them
                raise
        summary = FleetMetrics(len(registry), registry.online_count, registry.platforms())
        await self._publish(topics.metrics(self.job, "devices"), Channel.METRICS, summary)
