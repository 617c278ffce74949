"""The device's registration: the message, the retries, and the answer (``device-registration``).

A device registers whenever an aggregator session appears (at start, and after the aggregator
restarted), and again, backing off with jitter (:func:`registration_backoff`), until an answer
comes; heartbeats go on meanwhile, in their own task, so a device that waits never looks dead.
An answer for another registration (another session of this device) is ignored, and so is a
refusal that names no session: someone else's registration on our topic must not stop us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import random
from typing import TYPE_CHECKING

from unus_edge import __version__
from unus_edge.config import DeviceSettings
from unus_edge.errors import RejectedError
from unus_edge.messages import Registration, RegistrationReply
from unus_edge.topics import Channel
from unus_edge.transport import Backoff

if TYPE_CHECKING:
    from unus_edge.device._daemon import Device

__all__ = ["keep_registered", "on_registration_reply", "registration_backoff"]

logger = logging.getLogger("unus_edge.device")


async def keep_registered(device: Device) -> None:
    """Register whenever an aggregator session appears; retry, backing off, until it answers."""
    while True:
        await device.registration_wanted.wait()
        device.registration_wanted.clear()
        device.registered.clear()
        backoff = registration_backoff(device.settings)
        while not device.registered.is_set() and not device.registration_wanted.is_set():
            await _register(device)
            wait = backoff.next_delay()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await device.registered.wait()
            if not device.registered.is_set():
                logger.warning("no answer to the registration within %.0f s: registering again", wait)


async def _register(device: Device) -> None:
    capabilities = []
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401

        capabilities.append("onnxruntime")
    registration = Registration(
        device.device_id, device.session, len(device.dataset), device.fingerprint, __version__,
        platform.platform(), platform.machine(), platform.python_version(), os.cpu_count() or 0,
        _memory_bytes(), tuple(capabilities),
    )
    await device.publish_on(Channel.REGISTER, registration)
    device.registrations_sent += 1
    logger.info("device %s registering with %d examples", device.device_id, len(device.dataset))


def on_registration_reply(device: Device, reply: RegistrationReply) -> None:
    """Apply the aggregator's answer; a refusal addressed to this session raises ``RejectedError``."""
    if reply.session and reply.session != device.session:
        logger.debug("ignoring an answer to another registration (session %s)", reply.session)
        return
    if not reply.accepted and reply.session != device.session:
        # An aggregator refuses by schema only what it cannot decode, and then we could not
        # decode its answer either: a refusal without our session is not about us.
        logger.warning("ignoring a refusal (%s) that is not addressed to this device's session", reply.reason)
        return
    if not reply.accepted:
        detail = f" ({reply.detail})" if reply.detail else ""
        logger.error("device %s refused by the aggregator: %s%s", device.device_id, reply.reason, detail)
        raise RejectedError(device.device_id, reply.reason, reply.detail)
    device.follow(reply.aggregator_session)
    device.view.registered(reply.aggregator_session, reply.clock)
    device.gate.set()
    if not device.registered.is_set():
        logger.info("device %s registered with aggregator session %s", device.device_id, reply.aggregator_session)
    device.registered.set()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def registration_backoff(settings: DeviceSettings, *, rng: random.Random | None = None) -> Backoff:
    """The waits between registrations: the n-th uniform in ``[d/2, d]``, ``d = min(max, 2 x retry
    x 2**n)``, so the first is 1-2 times ``device.registration_retry`` and a fleet that registers
    at once (an aggregator restart) spreads its retries instead of repeating them in lockstep."""
    return Backoff(2 * settings.registration_retry, settings.registration_retry_max, rng=rng)
