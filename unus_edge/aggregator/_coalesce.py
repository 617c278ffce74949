"""At most one run of an expensive publication per interval, however often its input changes.

The fleet summary (``metrics/devices``) once listed every registered device, so publishing it
on every registry change cost work proportional to the fleet for every registration, heartbeat
expiry or status: quadratic in the fleet while it registers (issue 21: 89.6 % of a 1,000-device
aggregator's samples). It is now a few counts plus the facts of the devices that changed
(:mod:`._fleet`), and a :class:`Coalescer` bounds how often it goes out: ``mark()`` only
schedules a flush, on the loop's timer, no earlier than ``interval`` after the previous one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Coalescer"]


class Coalescer:
    """Call ``flush`` soon after :meth:`mark`, at most once per ``interval`` seconds.

    The first change after a quiet spell is flushed on the next loop iteration (leading edge);
    changes within ``interval`` of a flush share one later flush (trailing edge), so the last
    change is never lost. Runs on the event loop that calls :meth:`mark`; no task, no polling.
    """

    def __init__(self, flush: Callable[[], None], interval: float) -> None:
        if interval < 0:
            raise ValueError(f"interval must be 0 or more seconds, not {interval}")
        self._flush = flush
        self.interval = interval
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last: float | None = None
        self.flushes = 0

    @property
    def pending(self) -> bool:
        return self._handle is not None

    def mark(self) -> None:
        """Something changed: schedule a flush unless one is already scheduled."""
        if self._handle is not None:
            return
        loop = asyncio.get_running_loop()
        delay = 0.0 if self._last is None else self._last + self.interval - loop.time()
        if delay <= 0:
            self._handle = loop.call_soon(self._run)
        else:
            self._handle = loop.call_later(delay, self._run)

    def cancel(self) -> None:
        """Drop a scheduled flush (the service is stopping and publishes its final state itself)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        self._handle = None
        self._last = asyncio.get_running_loop().time()
        self.flushes += 1
        self._flush()
