"""A loopback TCP fault proxy, for chaos runs (``unus-edge chaos``) and tests.

It sits between MQTT clients and the broker and forwards bytes both ways, except when told
(or randomly scheduled) to break things:

* **cut**: close a connection abruptly (both sides see it die, as with a dropped Wi-Fi link);
* **hold**: keep a connection open but forward nothing, in either direction, for a while, so
  the peers see a silent, half-open link (a device whose network vanished without a FIN). Only
  keepalive, or the application's heartbeats on brokers that do not enforce keepalive,
  detects it.

Random cuts follow a Poisson process with mean interval ``cut_interval`` seconds over all
connections; a fraction ``hold_fraction`` of the random faults are holds instead of cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "ProxyStats"]

logger = logging.getLogger("unus_edge.faults")


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0
    holds: int = 0
    upstream_failures: int = 0
    bytes: int = 0


@dataclass(eq=False)  # identity semantics: links live in a set
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    held: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while the link forwards nothing."""
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``, breaking links on demand."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        cut_interval: float = 0.0,
        hold_fraction: float = 0.0,
        hold_seconds: float = 10.0,
        seed: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.cut_interval = cut_interval
        self.hold_fraction = hold_fraction
        self.hold_seconds = hold_seconds
        self.rng = random.Random(seed)
        self.port = 0
        self.stats = ProxyStats()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._chaos: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self.cut_interval > 0:
            self._chaos = asyncio.create_task(self._random_faults(), name="fault-proxy-chaos")
            self._chaos.add_done_callback(_report_end)
        logger.info("fault proxy 127.0.0.1:%d -> %s:%d (a fault every %.1f s on average)", self.port,
                    self.target_host, self.target_port, self.cut_interval)
        return self.port

    async def stop(self) -> None:
        if self._chaos is not None:
            self._chaos.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for link in list(self._links):
            self._close(link)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ faults on demand

    def cut(self, count: int = 1) -> int:
        """Close ``count`` random live links abruptly; returns how many were cut."""
        links = self.rng.sample(sorted(self._links, key=id), min(count, len(self._links)))
        for link in links:
            self._close(link)
            self.stats.cuts += 1
        return len(links)

    def cut_all(self) -> int:
        return self.cut(len(self._links))

    def hold(self, seconds: float | None = None) -> bool:
        """Silence one random link for ``seconds``, then cut it. Returns whether there was one."""
        candidates = [link for link in self._links if not link.held.is_set()]
        if not candidates:
            return False
        link = self.rng.choice(sorted(candidates, key=id))
        link.held.set()
        self.stats.holds += 1
        task = asyncio.create_task(self._release(link, self.hold_seconds if seconds is None else seconds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _release(self, link: _Link, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the length of the simulated outage
        self._close(link)

    async def _random_faults(self) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.cut_interval))  # Poisson fault arrivals
            if self.rng.random() < self.hold_fraction:
                self.hold()
            else:
                self.cut()

    # ------------------------------------------------------------------ forwarding

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:  # so that stop() can end it
            self._tasks.add(handler)
            handler.add_done_callback(self._tasks.discard)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self.stats.upstream_failures += 1
            client_writer.transport.abort()  # the broker is down: so is this connection
            return
        self.stats.connections += 1
        link = _Link(client_writer, upstream_writer)
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer, link)),
            asyncio.create_task(self._pump(upstream_reader, client_writer, link)),
        ]
        await asyncio.gather(*link.pumps, return_exceptions=True)
        self._close(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if link.held.is_set():
                    continue  # silently swallowed: the link is "half-open"
                self.stats.bytes += len(data)
                writer.write(data)
                await writer.drain()
        self._close(link)

    def _close(self, link: _Link) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for writer in (link.client, link.upstream):
            writer.transport.abort()  # RST, not a polite FIN: the peer learns it abruptly
        for pump in link.pumps:
            pump.cancel()


def _report_end(task: asyncio.Task[None]) -> None:
    """The random faults end only when the proxy stops: say so loudly if they end otherwise (a
    chaos run once reported 0 cuts and 0 holds in 60 s; docs/open-work.md)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("the fault proxy's random faults stopped: %r", task.exception())
