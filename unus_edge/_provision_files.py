"""The configuration files ``unus-edge provision`` writes: a device's device.toml, a job's aggregator
<job>.toml, with the identities the ACL names (:mod:`unus_edge._acl`) and never a secret (the
passwords stay in their files; :func:`redacted` is what a log may show).

Private to :mod:`unus_edge.provision`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unus_edge._acl import app_user

__all__ = ["aggregator_config", "aggregator_user", "device_config", "redacted", "url_host", "write_toml"]

logger = logging.getLogger("unus_edge.provision")


def aggregator_user(job: str) -> str:
    """The username of job ``job``'s aggregator."""
    return f"aggregator-{job}"


def device_config(job: str, device: str, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    etc = settings["config_dir"]
    broker: dict[str, Any] = {"url": f"mqtts://{url_host(settings['gateway'])}:{settings['port']}",
                              "username": device, "password_file": f"{etc}/password", "ca_file": f"{etc}/ca.crt"}
    if settings["client_certs"]:
        broker.update(cert_file=f"{etc}/{device}.crt", key_file=f"{etc}/{device}.key")
    # The identity of the local applications (`unus-edge predict --mqtt`): not the daemon's.
    predict = {"username": app_user(device), "password_file": f"{etc}/app.password"}
    if settings["client_certs"]:
        predict.update(cert_file=f"{etc}/app.crt", key_file=f"{etc}/app.key")
    return {"device": {"id": device, "job": job, "data": settings["data"], "model": settings["model"],
                       "release_dir": f"{settings['state_dir']}/release"},  # the trained model, for local use
            "broker": broker, "predict": predict}


def aggregator_config(job: str, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    user = aggregator_user(job)
    # A quorum that fits the fleet (issue 14: with min_devices 1 and min_fraction 0 a round of
    # 0/4 updates counted): rounds start when half the fleet is online, and count when half of
    # the selected devices answered.
    quorum = {"min_devices": max(1, math.ceil(len(settings["devices"]) / 2)), "min_fraction": 0.5}
    return {"job": {"name": job, **quorum}, "model": {"source": settings["model"]},
            "checkpoint": {"dir": f"{settings['state_dir']}/{job}"},
            "broker": {"url": settings["aggregator_url"], "username": user,
                       "password_file": f"{settings['config_dir']}/{user}.password"}}


def url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def redacted(config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A configuration fit for a log: secret values replaced by ``***``."""
    from unus_edge.transport import redact_url  # here: the CLI builds its parser from this module, paho is heavy

    def shown(key: str, value: Any) -> Any:
        if key == "password":
            return "***"
        return redact_url(value) if key == "url" and isinstance(value, str) else value

    return {section: {key: shown(key, value) for key, value in table.items()} for section, table in config.items()}


def write_toml(path: Path, config: Mapping[str, Mapping[str, Any]]) -> None:
    lines = ["# Written by `unus-edge provision`. No secret here: the password is in password_file.\n"]
    for section, table in config.items():
        lines.append(f"\n[{section}]\n")
        lines += [f"{key} = {json.dumps(value)}\n" for key, value in table.items()]
    path.write_text("".join(lines))
    logger.debug("wrote %s: %s", path, redacted(config))
