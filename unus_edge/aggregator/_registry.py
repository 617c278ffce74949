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

Every per-event operation costs the same whatever the fleet's size (issue 21): the online count is
a counter, silent devices are found through a heap of deadlines (refreshed lazily, so a heartbeat
only stores a time), and the devices whose published facts changed are collected in a set that
the fleet publication drains (:meth:`Registry.take_changed`).
"""

from __future__ import annotations

import collections
import heapq
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace

from unus_edge.messages import DeviceFacts, Registration
from unus_edge.strategies import DeviceInfo

__all__ = ["DeviceRecord", "Registry", "Verdict"]


@dataclass(slots=True)
class DeviceRecord:
    """What the aggregator knows about one registered device (slots: a fleet holds thousands)."""

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

    def as_dict(self) -> dict[str, object]:
        """The plain fields (what a checkpoint stores)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

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
        self._online = 0
        self._deadlines: list[tuple[float, str]] = []
        """A heap of (deadline, device id) of online devices; a deadline may be early (a heartbeat
        moved it later): :meth:`expire` then pushes the true one."""
        self._queued: set[str] = set()
        self._changed: set[str] = set()
        self._platforms: collections.Counter[str] = collections.Counter()

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __iter__(self) -> Iterator[DeviceRecord]:
        return iter(sorted(self._devices.values(), key=lambda record: record.device_id))

    def __len__(self) -> int:
        return len(self._devices)

    @property
    def online_count(self) -> int:
        return self._online

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)

    def register(self, registration: Registration, now: float) -> Verdict:
        if registration.model_fingerprint != self.fingerprint:
            return Verdict(False, "fingerprint_mismatch",
                           f"the job's model is {self.fingerprint}, the device runs {registration.model_fingerprint}")
        record = self._devices.get(registration.device_id)
        # A fleet has a few platforms and versions: one string each, not one per device.
        registration = replace(registration, platform=sys.intern(registration.platform),
                               software_version=sys.intern(registration.software_version))
        if record is None:
            record = DeviceRecord(registration.device_id, registration.session, registration.num_examples,
                                  registration.platform, registration.software_version, now, online=False)
            self._devices[registration.device_id] = record
            self._platforms[record.platform] += 1
        else:  # a re-registration (device or aggregator restart): keep its history
            self._platforms[record.platform] -= 1
            self._platforms[registration.platform] += 1
            old_session, record.session = record.session, registration.session
            if old_session != record.session:
                self.announce(record.device_id, old_session)  # the old session's will may still come
            record.num_examples = registration.num_examples
            record.platform = registration.platform
            record.software_version = registration.software_version
        record.last_seen = now
        self._announced.pop((record.device_id, record.session), None)  # the record holds it now
        self._set_online(record, True)
        self._changed.add(record.device_id)
        return Verdict(True)

    def restore(self, record: DeviceRecord) -> None:
        """Put back a record from a checkpoint (offline until the device shows up)."""
        previous = self._devices.get(record.device_id)
        if previous is not None:
            self._online -= previous.online
            self._platforms[previous.platform] -= 1
        self._platforms[record.platform] += 1
        record.online = False
        self._devices[record.device_id] = record
        self._changed.add(record.device_id)

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
        self._set_online(record, online)
        return changed

    def announce(self, device_id: str, session: str) -> None:
        """A status named this session of the device; remember the last ones. The registered
        session is not stored (its record answers for it: issue 21, about 290 bytes a device)."""
        record = self._devices.get(device_id)
        if record is not None and record.session == session:
            return
        key = (device_id, session)
        self._announced[key] = None
        self._announced.move_to_end(key)
        while len(self._announced) > self._announced_capacity:
            self._announced.popitem(last=False)

    @property
    def announced_size(self) -> int:
        """Sessions held in the announced window (not counting the registered ones)."""
        return len(self._announced)

    def announced(self, device_id: str, session: str) -> bool:
        record = self._devices.get(device_id)
        return (device_id, session) in self._announced or (record is not None and record.session == session)

    def heartbeat(self, device_id: str, session: str, now: float) -> bool:
        """A heartbeat arrived. Returns whether the device came (back) online."""
        record = self._devices.get(device_id)
        if record is None or session != record.session:
            return False
        record.last_seen = now  # its heap entry is refreshed when it comes due (expire)
        if not record.online:
            self._set_online(record, True)
            return True
        return False

    def contributed(self, device_id: str, train_loss: float | None) -> DeviceRecord:
        """An update of the device was accepted: count it; returns the record."""
        record = self._devices[device_id]
        record.rounds_contributed += 1
        record.last_train_loss = train_loss
        record.clock += 1
        self._changed.add(device_id)
        return record

    def expire(self, now: float) -> list[str]:
        """Mark devices silent for longer than the heartbeat timeout offline; return their ids.

        Costs O(log n) per device that came due, not a scan of the fleet."""
        expired = []
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, device_id = heapq.heappop(heap)
            record = self._devices.get(device_id)
            if record is None or not record.online:
                self._queued.discard(device_id)
                continue
            deadline = record.last_seen + self.heartbeat_timeout
            if deadline < now:
                self._queued.discard(device_id)
                self._set_online(record, False)
                expired.append(device_id)
            else:  # a heartbeat came since the entry was pushed
                heapq.heappush(heap, (deadline, device_id))
        return sorted(expired)

    def next_expiry(self) -> float | None:
        """When the next online device may time out (for the liveness timer; possibly early)."""
        return self._deadlines[0][0] if self._deadlines else None

    def online(self) -> list[DeviceInfo]:
        return [record.info() for record in self if record.online]

    def platforms(self, limit: int = 16) -> dict[str, int]:
        """Registered devices by platform: the ``limit`` most common, the rest under ``"other"``
        (a platform is what a device says, so the fleet, not the summary, bounds how many there are)."""
        ranked = [(name, count) for name, count in self._platforms.most_common() if count > 0]
        counts = dict(ranked[:limit])
        rest = sum(count for _, count in ranked[limit:])
        if rest:
            counts["other"] = counts.get("other", 0) + rest
        return counts

    def take_changed(self) -> list[DeviceRecord]:
        """The records whose published facts changed since the last call, by device id."""
        changed = [self._devices[device_id] for device_id in sorted(self._changed) if device_id in self._devices]
        self._changed.clear()
        return changed

    def mark_changed(self, device_ids: Iterable[str]) -> None:
        """Publish these devices' facts again with the next fleet publication (one failed)."""
        self._changed.update(device_ids)

    def _set_online(self, record: DeviceRecord, online: bool) -> None:
        if record.online != online:
            self._online += 1 if online else -1
            record.online = online
            self._changed.add(record.device_id)
        if online and record.device_id not in self._queued:
            self._queued.add(record.device_id)
            heapq.heappush(self._deadlines, (record.last_seen + self.heartbeat_timeout, record.device_id))
