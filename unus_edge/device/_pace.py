"""The device's pacing hook: how a simulator makes a device as slow as the one it stands for.

The daemon calls the hook around its computations and transfers; in production it is
:data:`NO_PACE` and does nothing. :class:`unus_edge.profiles.ProfilePace` is the simulator's.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NO_PACE", "NoPace", "Pace"]


class Pace(Protocol):
    def now(self) -> float:
        """The pace's clock; :meth:`training` is given a reading of it."""

    async def training(self, started: float, steps: int, cpu_seconds: float = 0.0) -> None:
        """After a real training that began at ``started`` (``steps`` steps, ``cpu_seconds`` of its
        thread's CPU time): wait until the device would be done."""

    async def transfer(self, num_bytes: int) -> None:
        """After a model download, or before an update upload, of ``num_bytes``."""


class NoPace:
    """The device's own speed: no waits."""

    def now(self) -> float:
        return 0.0

    async def training(self, started: float, steps: int, cpu_seconds: float = 0.0) -> None:
        return None

    async def transfer(self, num_bytes: int) -> None:
        return None


NO_PACE = NoPace()
