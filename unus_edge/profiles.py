"""Simulated device speeds: a profile paces a simulated device, whatever else the host runs.

A fleet of Raspberry Pis simulated on a 2-core host cannot take its speeds from the host: ten
devices sharing two cores are each five times slower than one alone, and a device made "5x
slower" by extra work is slowed as much again by the same contention. A :class:`DeviceProfile`
says how long a training step and a transfer *take on the device*; a :class:`ProfilePace`
makes a simulated device's computation last at least that long, by waiting after the real
computation (whose result is still computed for real). A 5x slower profile is then 5x slower
whatever the host runs, as long as the host computes faster than the profiles ask: every wait
that found the computation already longer than its profile is counted as an *overrun*, and
the benchmarks report them.

This is simulation code: :func:`unus_edge.simulation.simulate` and the benchmarks install a
pace on in-process devices (``Device.pace``); the device daemon itself only calls the hook,
which does nothing by default.

Profile speeds are given for a reference workload, a training step of McMahan's 2NN
(199,210 parameters) on a batch of 10; another model's step costs
``parameters x batch / (199,210 x 10)`` times as much (:func:`workload_cost`, which ignores
what convolutions add). The built-in profiles (:data:`PROFILES`) are nominal speeds with the
ratios of the boards they are named after; they were not measured on hardware.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from unus_edge.errors import ConfigError

__all__ = [
    "PROFILES", "REFERENCE_BATCH", "REFERENCE_PARAMETERS", "DeviceProfile", "ProfilePace", "SlowdownPace",
    "assign_profiles", "parse_profiles", "workload_cost",
]

REFERENCE_PARAMETERS = 199_210
"""The 2NN's parameters: profile speeds are for its training step."""
REFERENCE_BATCH = 10


@dataclass(frozen=True)
class DeviceProfile:
    """How fast a simulated device computes and talks."""

    name: str
    step_seconds: float
    """Wall seconds of one training step of the reference workload (the 2NN at B = 10)."""
    bandwidth_mbps: float | None = None
    """Link bandwidth in megabits per second, each way (None: the host's own)."""
    latency_ms: float = 0.0
    """One-way latency added to every model download and update upload."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.step_seconds) and self.step_seconds >= 0):
            raise ConfigError("--device-profiles", f"{self.name}: step seconds must be >= 0, got {self.step_seconds}")
        if self.bandwidth_mbps is not None and not (math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps > 0):
            raise ConfigError("--device-profiles", f"{self.name}: bandwidth must be > 0 Mbit/s")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ConfigError("--device-profiles", f"{self.name}: latency must be >= 0 ms")

    def train_seconds(self, steps: int, cost: float = 1.0) -> float:
        """How long ``steps`` training steps take on this device (``cost``: see :func:`workload_cost`)."""
        return steps * self.step_seconds * cost

    def transfer_seconds(self, num_bytes: int) -> float:
        """How long moving ``num_bytes`` over this device's link takes, latency included."""
        seconds = self.latency_ms / 1000.0
        if self.bandwidth_mbps is not None:
            seconds += num_bytes * 8 / (self.bandwidth_mbps * 1e6)
        return seconds

    def scaled(self, factor: float) -> DeviceProfile:
        """The same device ``factor`` times slower to compute (a straggler of this profile)."""
        return DeviceProfile(f"{self.name}x{factor:g}", self.step_seconds * factor, self.bandwidth_mbps,
                             self.latency_ms)


PROFILES: dict[str, DeviceProfile] = {
    profile.name: profile
    for profile in (
        DeviceProfile("pi-zero-2", step_seconds=0.030, bandwidth_mbps=20.0, latency_ms=5.0),
        DeviceProfile("pi-4", step_seconds=0.010, bandwidth_mbps=100.0, latency_ms=2.0),
        DeviceProfile("pi-5", step_seconds=0.004, bandwidth_mbps=300.0, latency_ms=1.0),
    )
}
"""Nominal profiles (2NN step at B = 10; Wi-Fi-like links). Not measured on hardware."""


def workload_cost(parameters: int, batch_size: int) -> float:
    """A model's training step against the reference step (the 2NN at B = 10)."""
    return parameters * batch_size / (REFERENCE_PARAMETERS * REFERENCE_BATCH)


def _parse_one(text: str) -> DeviceProfile:
    """``pi-4`` (built in) or ``NAME=STEP_SECONDS[/MBPS[/LATENCY_MS]]``."""
    if "=" not in text:
        profile = PROFILES.get(text)
        if profile is None:
            raise ConfigError("--device-profiles", f"unknown profile {text!r}: built in are {', '.join(PROFILES)}, "
                                                   "or define one as NAME=STEP_SECONDS[/MBPS[/LATENCY_MS]]")
        return profile
    name, _, numbers = text.partition("=")
    parts = numbers.split("/")
    if not name or not 1 <= len(parts) <= 3:
        raise ConfigError("--device-profiles", f"expected NAME=STEP_SECONDS[/MBPS[/LATENCY_MS]], got {text!r}")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ConfigError("--device-profiles", f"{text!r}: not a number") from None
    return DeviceProfile(name, values[0], values[1] if len(values) > 1 else None, values[2] if len(values) > 2 else 0.0)


def parse_profiles(spec: str) -> list[tuple[DeviceProfile, float]]:
    """``pi-zero-2:0.2,pi-4:0.6,pi-5:0.2``: profiles and the share of the fleet each takes."""
    mix: list[tuple[DeviceProfile, float]] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        text, _, share = item.rpartition(":")
        if not text:
            raise ConfigError("--device-profiles", f"expected PROFILE:SHARE, got {item!r}")
        try:
            fraction = float(share)
        except ValueError:
            raise ConfigError("--device-profiles", f"{item!r}: the share is not a number") from None
        if not (math.isfinite(fraction) and fraction > 0):
            raise ConfigError("--device-profiles", f"{item!r}: the share must be > 0")
        mix.append((_parse_one(text), fraction))
    if not mix:
        raise ConfigError("--device-profiles", "no profile given")
    total = sum(share for _, share in mix)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError("--device-profiles", f"the shares add up to {total:g}, not 1")
    return mix


def assign_profiles(mix: list[tuple[DeviceProfile, float]], num_devices: int, seed: int) -> list[DeviceProfile]:
    """A profile per device: each gets its share of the fleet (largest remainders), seeded order."""
    counts = [math.floor(share * num_devices) for _, share in mix]
    remainders = sorted(range(len(mix)), key=lambda i: (-(mix[i][1] * num_devices - counts[i]), i))
    for index in remainders[: num_devices - sum(counts)]:
        counts[index] += 1
    profiles = [profile for (profile, _), count in zip(mix, counts, strict=True) for _ in range(count)]
    random.Random(seed).shuffle(profiles)
    return profiles


class ProfilePace:
    """Paces one simulated device by its profile (``Device.pace``); clock and sleep are injectable."""

    def __init__(self, profile: DeviceProfile, cost: float = 1.0, *,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.profile = profile
        self.cost = cost
        self.clock = clock
        self.sleep = sleep
        self.trainings = 0
        self.overruns = 0
        """Trainings the host computed more slowly than the profile asked (no wait was possible)."""
        self.waited_seconds = 0.0

    def now(self) -> float:
        return self.clock()

    async def training(self, started: float, steps: int, cpu_seconds: float = 0.0) -> None:
        """Called after a real training that began at ``started`` (this pace's clock): wait out the rest."""
        self.trainings += 1
        remaining = started + self.profile.train_seconds(steps, self.cost) - self.clock()
        if remaining <= 0:
            self.overruns += 1
            return
        self.waited_seconds += remaining
        await self.sleep(remaining)

    async def transfer(self, num_bytes: int) -> None:
        """Called after a model download or before an update upload of ``num_bytes``."""
        seconds = self.profile.transfer_seconds(num_bytes)
        if seconds > 0:
            self.waited_seconds += seconds
            await self.sleep(seconds)


class SlowdownPace:
    """A straggler without a profile: after each training it stays busy ``factor - 1`` times
    that training's own CPU time (``simulate --stragglers`` without ``--device-profiles``).

    CPU time rather than wall time, so that waiting for a core does not count, but the host's
    load still decides how long the training itself took; profiles (:class:`ProfilePace`) do not
    have that flaw and are what the benchmarks use.
    """

    def __init__(self, factor: float, *, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        if not (math.isfinite(factor) and factor >= 1):
            raise ConfigError("--stragglers", f"a slowdown factor must be >= 1, got {factor}")
        self.factor = factor
        self.sleep = sleep

    def now(self) -> float:
        return 0.0

    async def training(self, started: float, steps: int, cpu_seconds: float = 0.0) -> None:
        if self.factor > 1 and cpu_seconds > 0:
            await self.sleep((self.factor - 1) * cpu_seconds)

    async def transfer(self, num_bytes: int) -> None:
        return None
