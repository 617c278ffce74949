"""A provisioned fleet and the gateway's Mosquitto drop-in, for the security and installer tests."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.brokers import REPO, RUN_AS, MosquittoBroker, free_port
from unus_edge.cli import build_parser
from unus_edge.provision import run as provision_run

DROP_IN = REPO / "deploy" / "raspberry-pi" / "mosquitto-unus-edge.conf"


def provision(out: Path, job: str, devices: Sequence[str], *extra: str) -> Fleet:
    """``unus-edge provision`` in this process (gateway name: localhost)."""
    args = build_parser().parse_args(["provision", "--out", str(out), "--job", job, "--devices", *devices,
                                      "--gateway", "localhost", "--state-dir", str(out / "state"), *extra])
    assert provision_run(args) == 0
    return Fleet(out)


@dataclass(frozen=True)
class Fleet:
    out: Path

    @property
    def gateway(self) -> Path:
        return self.out / "gateway"

    @property
    def ca_file(self) -> str:
        return str(self.gateway / "ca.crt")

    def password(self, user: str) -> str:
        if user.startswith("app@"):  # a device's local applications
            return (self.out / "devices" / user.removeprefix("app@") / "app.password").read_text().strip()
        device = self.out / "devices" / user / "password"
        if device.exists():
            return device.read_text().strip()
        return (self.gateway / f"{user}.password").read_text().strip()


class SecureBroker:
    """The drop-in as shipped, included from a Debian-like main file, on free loopback ports."""

    def __init__(self, workdir: Path, gateway: Path, *, client_certs: bool = False) -> None:
        """``client_certs``: the drop-in as install.sh writes it for ``provision --client-certs``."""
        self.plain_port, self.tls_port = free_port(), free_port()
        text = DROP_IN.read_text()
        identity = "require_certificate true\nuse_identity_as_username true" if client_certs else None
        for old, new in (("/etc/unus-edge/broker/", f"{gateway}/"),
                         ("listener 1883 127.0.0.1\n", f"listener {self.plain_port} 127.0.0.1\n"),
                         ("listener 8883\n", f"listener {self.tls_port} 127.0.0.1\n"),
                         ("\nrequire_certificate false\n", f"\n{identity or 'require_certificate false'}\n")):
            assert old in text, old
            text = text.replace(old, new)
        conf_d = workdir / "conf.d"
        conf_d.mkdir()
        (conf_d / "unus-edge.conf").write_text(text)
        main = workdir / "mosquitto-main.conf"
        main.write_text("\n".join([
            RUN_AS, f"pid_file {workdir}/mosquitto.pid", "persistence true", f"persistence_location {workdir}/",
            "log_dest stdout", "log_type all", f"include_dir {conf_d}", "",
        ]))
        self.broker = MosquittoBroker(workdir)
        self.broker.port = self.plain_port
        self.broker._config = lambda: main  # type: ignore[method-assign]

    @property
    def log(self) -> str:
        return "".join(self.broker.log)

    async def wait_for_log(self, pattern: str) -> str:
        """The first broker log line matching ``pattern`` (the log is read as it is written)."""
        regex = re.compile(pattern)
        while True:
            for line in self.broker.log:
                if regex.search(line):
                    return line
            await asyncio.sleep(0.01)


