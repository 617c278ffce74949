"""The device registry: who registered, who is online, and what they did. Pure logic, no I/O.

Time is passed in (``now``), so the rules are testable without clocks:

* a registration is accepted when its model fingerprint equals the job's (the schema version
  is checked earlier, by the codec); an accepted device is online;
* a device is online from its registration, its retained ``status: online`` or a heartbeat,
  until its ``status: offline`` (graceful or last will) or until ``heartbeat_timeout`` passes
  without a heartbeat, which is what detects silent devices on brokers that never fire wills;
* a new ``session`` means the device process restarted;
* every session named on a device's ``status`` topic is remembered as *announced* (a bounded
  window): a device announces its session before it registers, and its last will outlives it,
  so presence of an announced session that is not the registered one is routine, not hostile.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

from unus_edge.messages import DeviceFacts, Registration
from unus_edge.strategies import DeviceInfo

__all__ = ["DeviceRecord", "Registry", "Verdict"]


@dataclass
class DeviceRecord:
    """What the aggregator knows about one registered device."""

    device_id: str
    session: str
    num_examples: int
    platform: str
    software_version: str
    registered_at: float
    online: bool = True
    last_seen: float = 0.0
    rounds_contributed: int = 0
    last_train_loss: float | None = None
    clock: int = 0

    def info(self) -> DeviceInfo:
        return DeviceInfo(self.device_id, self.num_examples, self.platform, self.rounds_contributed,
                          self.last_train_loss)

    def facts(self) -> DeviceFacts:
        return DeviceFacts(self.device_id, self.online, self.last_seen, self.rounds_contributed,
                           self.last_train_loss, self.num_examples, self.clock, self.platform)


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    reason: str = ""
    detail: str = ""


class Registry:
    """Registered devices and their presence."""

    def __init__(self, fingerprint: str, heartbeat_timeout: float, *, announced_capacity: int = 10_000) -> None:
        self.fingerprint = fingerprint
        self.heartbeat_timeout = heartbeat_timeout
        self._devices: dict[str, DeviceRecord] = {}
        self._announced: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._announced_capacity = announced_capacity

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __iter__(self) -> Iterator[DeviceRecord]:
        return iter(sorted(self._devices.values(), key=lambda record: record.device_id))

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)

    def register(self, registration: Registration, now: float) -> Verdict:
        if registration.model_fingerprint != self.fingerprint:
            return Verdict(False, "fingerprint_mismatch",
                           f"the job's model is {self.fingerprint}, the device runs {registration.model_fingerprint}")
        record = self._devices.get(registration.device_id)
        if record is None:
            record = DeviceRecord(registration.device_id, registration.session, registration.num_examples,
                                  registration.platform, registration.software_version, now)
            self._devices[registration.device_id] = record
        else:  # a re-registration (device or aggregator restart): keep its history
            record.session = registration.session
            record.num_examples = registration.num_examples
            record.platform = registration.platform
            record.software_version = registration.software_version
        record.online = True
        record.last_seen = now
        return Verdict(True)

    def restore(self, record: DeviceRecord) -> None:
        """Put back a record from a checkpoint (offline until the device shows up)."""
        record.online = False
        self._devices[record.device_id] = record

    def status(self, device_id: str, online: bool, session: str, now: float) -> bool:
        """A retained status or last will arrived. Returns whether presence changed."""
        record = self._devices.get(device_id)
        if record is None:
            return False
        if not online and session != record.session:
            return False  # the will of an older process of this device: it already came back
        if online:
            record.last_seen = now
        changed = record.online != online
        record.online = online
        return changed

    def announce(self, device_id: str, session: str) -> None:
        """A status named this session of the device (registered or not); remember the last ones."""
        key = (device_id, session)
        self._announced[key] = None
        self._announced.move_to_end(key)
        while len(self._announced) > self._announced_capacity:
            self._announced.popitem(last=False)

    def announced(self, device_id: str, session: str) -> bool:
        return (device_id, session) in self._announced

    def heartbeat(self, device_id: str, session: str, now: float) -> bool:
        """A heartbeat arrived. Returns whether the device came (back) online."""
        record = self._devices.get(device_id)
        if record is None or session != record.session:
            return False
        record.last_seen = now
        if not record.online:
            record.online = True
            return True
        return False

    def expire(self, now: float) -> list[str]:
        """Mark devices silent for longer than the heartbeat timeout offline; return their ids."""
        expired = []
        for record in self._devices.values():
            if record.online and now - record.last_seen > self.heartbeat_timeout:
                record.online = False
                expired.append(record.device_id)
        return expired

    def next_expiry(self) -> float | None:
        """When the next online device would time out (for the liveness timer)."""
        deadlines = [r.last_seen + self.heartbeat_timeout for r in self._devices.values() if r.online]
        return min(deadlines) if deadlines else None

    def online(self) -> list[DeviceInfo]:
        return [record.info() for record in self if record.online]
