"""``unus-edge status``: a one-shot view of a job and its fleet, for scripts and SSH sessions (issue 19).

It reads the job's retained topics, as :mod:`unus_edge.monitor` does (metrics, the per-device
facts, the devices' and the aggregator's statuses), and prints one table, or with ``--json`` one
JSON document. The monitor identity of the ACL is enough.

When is everything read? A broker sends the retained messages of a subscription right after its
SUBACK, in one burst; nothing marks the end of the burst, and the monitor identity may not
publish a marker of its own. So the collection ends when no *retained* message has come for
``settle`` seconds, a quiet period measured from the last one (not a fixed wait), and at the
latest after ``limit`` seconds, so a busy job's live traffic cannot keep it open. A broker
holding nothing for the job gives an empty state after one quiet period, and the command says
so and exits 1.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from unus_edge import topics
from unus_edge.monitor import MonitorState, render
from unus_edge.topics import Channel
from unus_edge.transport import Transport

__all__ = ["collect_status", "status_document", "status_table"]


async def collect_status(transport: Transport, job: str, *, settle: float = 0.5, limit: float = 10.0) -> MonitorState:
    """The job's state from its retained topics (see the module's docstring for when it ends)."""
    state = MonitorState()
    for topic_filter, qos in ((topics.metrics_filter(job), 1), (topics.device_filter(job, Channel.STATUS), 1),
                              (topics.aggregator_status(job), 1)):
        await transport.subscribe(topic_filter, qos=qos)
    messages = aiter(transport.messages())
    now = time.monotonic()
    deadline, quiet_until = now + limit, now + settle
    while (left := min(quiet_until, deadline) - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(left):
                message = await anext(messages)
        except (TimeoutError, StopAsyncIteration):
            break
        state.apply(message.topic, message.payload)
        if message.retain:  # live traffic (heartbeats, a new round) does not extend the quiet period
            quiet_until = time.monotonic() + settle
    return state


def status_document(state: MonitorState, job: str) -> dict[str, Any]:
    """The state as one JSON-able document (the ``--json`` output); ``job`` is null without metrics."""
    def body(message: Any) -> Any:
        return None if message is None else message.body()

    aggregator = state.aggregator
    return {
        "job_name": job,
        "job": body(state.job),
        "aggregator": None if aggregator is None else {"state": aggregator.state, "session": aggregator.session,
                                                       "reason": aggregator.reason,
                                                       "software_version": aggregator.software_version},
        "last_round": body(state.last_round),
        "federated": body(state.federated),
        "fleet": body(state.fleet),
        "devices": [state.devices[device_id] for device_id in sorted(state.devices)],
    }


def status_table(state: MonitorState, job: str, *, max_rows: int = 1000) -> str:
    """The monitor's rendering, with the aggregator's presence first."""
    aggregator = state.aggregator
    if aggregator is None:
        head = f"aggregator of {job}: never seen on this broker"
    else:
        reason = f" ({aggregator.reason})" if aggregator.reason else ""
        head = f"aggregator of {job}: {aggregator.state}{reason}, session {aggregator.session}"
    return head + "\n" + render(state, job, max_rows=max_rows)
