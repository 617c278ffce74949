"""``unus-edge monitor``: a live view of a job, built only from MQTT topics.

It reads exactly what ``mosquitto_sub -t 'unus/v1/JOB/#' -v`` shows as JSON: the job, round and
fleet metrics published by the aggregator (the fleet in counts, and each device's facts on its own
retained topic), and the devices' own status and heartbeats. The device table shows the first
``max_rows`` devices by id; the counts cover the whole fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from unus_edge import topics
from unus_edge.errors import ProtocolError
from unus_edge.messages import (
    DeviceFacts,
    FederatedMetrics,
    FleetMetrics,
    Heartbeat,
    JobMetrics,
    RoundMetrics,
    Status,
    decode_message,
)
from unus_edge.topics import Channel
from unus_edge.transport import Transport

__all__ = ["MonitorState", "monitor", "render"]

logger = logging.getLogger("unus_edge.monitor")


@dataclass
class MonitorState:
    job: JobMetrics | None = None
    last_round: RoundMetrics | None = None
    fleet: FleetMetrics | None = None
    federated: FederatedMetrics | None = None
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    activity: dict[str, str] = field(default_factory=dict)
    aggregator: Status | None = None
    """The aggregator's retained presence (``aggregator/status``), when subscribed to."""
    updated: float = 0.0

    def apply(self, topic: str, payload: bytes) -> bool:
        """Fold one message into the state; returns whether it was understood."""
        try:
            parsed = topics.parse(topic)
            _, message = decode_message(payload, parsed.channel)
        except ProtocolError:
            return False
        if isinstance(message, JobMetrics):
            self.job = message
        elif isinstance(message, RoundMetrics):
            self.last_round = message
        elif isinstance(message, FleetMetrics):
            self.fleet = message
        elif isinstance(message, FederatedMetrics):
            self.federated = message
        elif isinstance(message, DeviceFacts):
            self.devices.setdefault(message.device_id, {}).update(message.body())
        elif isinstance(message, Heartbeat):
            self.activity[message.device_id] = message.state
            self.devices.setdefault(message.device_id, {"device_id": message.device_id})["last_seen"] = time.time()
        elif isinstance(message, Status) and message.role == "device":
            entry = self.devices.setdefault(message.device_id, {"device_id": message.device_id})
            entry["online"] = message.state == "online"
        elif isinstance(message, Status) and message.role == "aggregator":
            self.aggregator = message
        else:
            return False
        self.updated = time.time()
        return True


def render(state: MonitorState, job: str, now: float | None = None, *, max_rows: int = 50) -> str:
    now = time.time() if now is None else now
    lines = []
    if state.job is None:
        lines.append(f"job {job}: no metrics yet (is the aggregator running?)")
    else:
        j = state.job
        accuracy = f"{j.eval_accuracy:.4f}" if j.eval_accuracy is not None else "-"
        loss = f"{j.eval_loss:.4f}" if j.eval_loss is not None else "-"
        rounds = (f"round {j.current_round}/{j.total_rounds} in progress ({j.server_round} done)"
                  if j.current_round else f"round {j.server_round}/{j.total_rounds}")
        lines.append(f"job {job}: {j.state}  strategy {j.strategy}  {rounds}  "
                     f"model v{j.version}  accuracy {accuracy}  loss {loss}")
        if j.reason:
            lines.append(f"  reason: {j.reason}")
        if j.staleness and set(j.staleness) != {"0"}:
            def low(bucket: str) -> int:
                head = bucket.split("-")[0]
                return int(head) if head.isdigit() else 1 << 62  # a bucket we do not know goes last

            buckets = sorted(j.staleness.items(), key=lambda item: low(item[0]))
            lines.append("  staleness of applied updates: " + "  ".join(f"{k}: {v}" for k, v in buckets))
    if state.last_round is not None:
        r = state.last_round
        lines.append(f"last round {r.server_round}: {r.num_updates}/{r.num_selected} updates, "
                     f"{r.num_failures} failed, {r.duration_seconds:.2f} s")
    if state.federated is not None and state.federated.accuracy is not None:
        e = state.federated
        spread = (f" (devices {e.accuracy_min:.4f}-{e.accuracy_max:.4f})"
                  if e.accuracy_min is not None and e.accuracy_max is not None else "")
        lines.append(f"federated evaluation, round {e.server_round}: accuracy {e.accuracy:.4f}{spread}, "
                     f"{e.num_answered}/{e.num_selected} devices, {e.num_failures} failed")
    if state.fleet is not None:
        f = state.fleet
        platforms = "  ".join(f"{name}: {count}" for name, count in f.platforms.items())
        lines.append(f"fleet: {f.registered} registered, {f.online} online" + (f"  ({platforms})" if platforms else ""))
    lines.append("")
    lines.append(f"{'device':<20} {'state':<8} {'activity':<10} {'last seen':>10} {'rounds':>7} {'train loss':>11}")
    shown = sorted(state.devices)
    for device_id in shown[:max_rows]:
        entry: dict[str, Any] = state.devices[device_id]
        online = entry.get("online")
        seen = entry.get("last_seen")
        ago = f"{now - float(seen):.0f} s ago" if isinstance(seen, int | float) and seen else "-"
        train_loss = entry.get("last_train_loss")
        lines.append(f"{device_id:<20} {'online' if online else 'offline' if online is not None else '?':<8} "
                     f"{state.activity.get(device_id, '-'):<10} {ago:>10} {entry.get('rounds_contributed', 0):>7} "
                     f"{(f'{train_loss:.4f}' if isinstance(train_loss, int | float) else '-'):>11}")
    if len(shown) > max_rows:
        lines.append(f"... and {len(shown) - max_rows} more device(s)")
    return "\n".join(lines)


async def monitor(transport: Transport, job: str, stream: TextIO | None, *, once_after: float | None = None,
                  refresh: float = 1.0, state: MonitorState | None = None) -> MonitorState:
    """Show the job until cancelled (or, with ``once_after``, print one snapshot after that many seconds).

    ``stream`` None: only keep ``state`` up to date (for the Prometheus endpoint), draw nothing."""
    state = MonitorState() if state is None else state
    for topic_filter, qos in ((topics.metrics_filter(job), 1),
                              (topics.device_filter(job, Channel.STATUS), 1),
                              (topics.aggregator_status(job), 1),
                              (topics.device_filter(job, Channel.HEARTBEAT), 0)):
        await transport.subscribe(topic_filter, qos=qos)

    async def consume() -> None:
        async for message in transport.messages():
            known = state.job is not None
            state.apply(message.topic, message.payload)
            if not known and state.job is not None:
                logger.info("job %s: metrics received (round %d, %s)", job, state.job.server_round, state.job.state)

    consumer = asyncio.create_task(consume(), name="monitor-receive")
    try:
        if stream is None:
            await consumer
            return state
        if once_after is not None:
            await asyncio.sleep(once_after)
            stream.write(render(state, job) + "\n")
            return state
        interactive = stream.isatty()
        while True:
            text = render(state, job)
            stream.write(("\x1b[H\x1b[2J" + text + "\n") if interactive else text + "\n\n")
            stream.flush()
            await asyncio.sleep(refresh)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
