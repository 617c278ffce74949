"""The Mosquitto ACL model of unus-edge: ``broker/acl.template``, built in, and its rendering.

The template is kept here as well so that ``unus-edge provision`` works from an installed
package; ``tests/integration/test_security.py`` checks that both copies are identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ACL_TEMPLATE", "JobIdentities", "app_user", "render_acl", "users_of"]

ACL_TEMPLATE = """\
# unus-edge: the Mosquitto ACL of a job (broker/acl.template).
#
# `unus-edge provision` fills this template in for each job and its devices and writes
# mosquitto.acl: this header once, then the [job] part once per job and the [device] part
# once per device of that job. (The same text is built into unus_edge/_acl.py; a test keeps
# the two identical.) Placeholders: {job}; {aggregator}, the aggregator's username
# (aggregator-<job>); {monitor}, the read-only operators' username (monitor); {device}, a
# device's username, which is its device id; {app}, its local applications' username
# (app@<device>).
#
# Mosquitto denies whatever no line grants. Anonymous clients are refused by the broker
# configuration (allow_anonymous false) and are granted nothing here either. Mosquitto 2.0
# acknowledges a denied PUBLISH and drops it, and grants every SUBSCRIBE but delivers only
# the messages the subscriber may read: a denied client sees no error, only silence.
#
# After a change: systemctl reload mosquitto (the ACL and password files are re-read).
# [job]

# ---- job {job} ----
# The aggregator of job {job}: reads what the devices send, and alone writes what they read.
user {aggregator}
topic read unus/v1/{job}/devices/+/status
topic read unus/v1/{job}/devices/+/heartbeat
topic read unus/v1/{job}/devices/+/register
topic read unus/v1/{job}/devices/+/update
topic write unus/v1/{job}/devices/+/tasks
topic write unus/v1/{job}/model
topic write unus/v1/{job}/clock
topic write unus/v1/{job}/release
topic write unus/v1/{job}/aggregator/status
topic write unus/v1/{job}/metrics/#

# Operators and dashboards (unus-edge monitor, mosquitto_sub): read-only, and never the
# model, the updates, the registrations or the tasks.
user {monitor}
topic read unus/v1/{job}/metrics/#
topic read unus/v1/{job}/devices/+/status
topic read unus/v1/{job}/devices/+/heartbeat
topic read unus/v1/{job}/aggregator/status
topic read unus/v1/{job}/clock
# [device]

# Device {device} of job {job}: writes only its own topics (its status is also its last
# will), reads only its own tasks and the job's shared state.
user {device}
topic write unus/v1/{job}/devices/{device}/status
topic write unus/v1/{job}/devices/{device}/heartbeat
topic write unus/v1/{job}/devices/{device}/register
topic write unus/v1/{job}/devices/{device}/update
topic read unus/v1/{job}/devices/{device}/tasks
topic read unus/v1/{job}/model
topic read unus/v1/{job}/release
topic read unus/v1/{job}/clock
topic read unus/v1/{job}/aggregator/status
topic read unus/v1/{job}/devices/{device}/predict/request
topic write unus/v1/{job}/devices/{device}/predict/response

# The local applications of device {device} ({app}, its own password, and certificate with
# --client-certs): they ask its daemon for predictions with the release (device.serve_predictions)
# and read the answers, and nothing else. Their own identity, since the broker takes a
# username as the client id and one identity holds one connection.
user {app}
topic write unus/v1/{job}/devices/{device}/predict/request
topic read unus/v1/{job}/devices/{device}/predict/response
"""

_JOB_MARK = "# [job]\n"
_DEVICE_MARK = "# [device]\n"


@dataclass(frozen=True, slots=True)
class JobIdentities:
    """The usernames of one job: its aggregator, the monitor, and its devices (usernames = ids)."""

    job: str
    aggregator: str
    monitor: str
    devices: Sequence[str]


def app_user(device_id: str) -> str:
    """The username of device ``device_id``'s local applications (``predict --mqtt``).

    ``@`` is not allowed in a device id, so it never collides with one."""
    return f"app@{device_id}"


def _parts() -> tuple[str, str, str]:
    header, _, rest = ACL_TEMPLATE.partition(_JOB_MARK)
    job_part, _, device_part = rest.partition(_DEVICE_MARK)
    return header, job_part, device_part


def render_acl(jobs: Mapping[str, JobIdentities], *, banner: str = "") -> str:
    """The ACL file for every job in ``jobs`` (sorted by name, devices sorted by id)."""
    header, job_part, device_part = _parts()
    chunks = [banner, header]
    for name in sorted(jobs):
        identities = jobs[name]
        values = {"{job}": name, "{aggregator}": identities.aggregator, "{monitor}": identities.monitor}
        chunks.append(_fill(job_part, values))
        chunks += [_fill(device_part, {**values, "{device}": device, "{app}": app_user(device)})
                   for device in sorted(identities.devices)]
    return "".join(chunks)


def users_of(jobs: Mapping[str, JobIdentities]) -> set[str]:
    """Every username the ACL of ``jobs`` grants something to."""
    users: set[str] = set()
    for identities in jobs.values():
        users.update((identities.aggregator, identities.monitor, *identities.devices))
        users.update(app_user(device) for device in identities.devices)
    return users


def _fill(text: str, values: Mapping[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text
