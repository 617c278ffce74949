"""Provisioning: certificates, credentials, ACL and configurations for a fleet (``unus-edge provision``).

``unus-edge provision --job mnist --devices pi-001 pi-002 --gateway gw.local --out fleet/``
writes (secrets with mode 0600, and never logged)::

    fleet/manifest.json           what was provisioned (jobs, their devices and settings)
    fleet/ca.crt, ca.key          the CA (unless --ca-cert names one)
    fleet/gateway/                for the gateway: install.sh --role gateway --bundle fleet/gateway
        ca.crt server.crt server.key mosquitto.passwd mosquitto.acl
        <job>.toml                the aggregator's configuration (broker and identity; complete it)
        aggregator-<job>.password monitor.password
    fleet/devices/<id>/           for one device: install.sh --role device --bundle fleet/devices/<id>
        device.toml password app.password ca.crt [<id>.crt <id>.key app.crt app.key with --client-certs]

Identities: each device's username is its device id; the aggregator of job J is
``aggregator-J``; ``monitor`` reads metrics and statuses; ``app@<id>``, a device's local
applications, asks its daemon for predictions (``[predict]`` in device.toml). The ACL follows
``broker/acl.template``. Running it again is safe: it adds the devices named, keeps every
existing password (``--rotate USER`` replaces one), removes the devices named by ``--revoke``,
and rewrites the password file and the ACL for every job in the folder.

Certificates are made with the ``openssl`` command-line tool, present on Raspberry Pi OS and
every Debian gateway, so that the core install needs no cryptography package. Keys are EC
P-256 (fast on a Pi), written with mode 0600.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unus_edge._acl import JobIdentities, app_user, render_acl, users_of
from unus_edge._passwords import sync_password_file, write_secret
from unus_edge._provision_files import (
    aggregator_config,
    aggregator_user,
    device_config,
    redacted,
    url_host,
    write_toml,
)
from unus_edge.errors import ConfigError, ProtocolError, UnusError
from unus_edge.topics import validate_name

__all__ = ["CertificatePair", "add_arguments", "aggregator_user", "make_ca", "make_certificate", "redacted", "run",
           "write_secret"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """A PEM certificate and its private key on disk."""

    cert_file: Path
    key_file: Path | None


def _openssl(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("openssl")
    if binary is None:
        raise ConfigError("tls", "the openssl command is needed to make certificates (apt-get install openssl)")
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ConfigError("tls", f"openssl {args[0]} failed: {result.stderr.strip()}")
    return result


def _key_args(key_file: Path) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key_file)]


def make_ca(directory: Path, *, common_name: str = "unus-edge CA", days: int = 3650) -> CertificatePair:
    """A self-signed certificate authority in ``directory`` (``ca.crt``, ``ca.key``)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertificatePair(directory / "ca.crt", directory / "ca.key")
    _openssl("req", "-x509", *_key_args(directory / "ca.key"), "-out", str(pair.cert_file), "-days", str(days),
             "-subj", f"/CN={common_name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    (directory / "ca.key").chmod(0o600)
    return pair


def make_certificate(
    directory: Path, name: str, ca: CertificatePair, *, hosts: tuple[str, ...] = (), days: int = 825,
    client: bool = False, stem: str = "",
) -> CertificatePair:
    """A certificate for ``name`` signed by ``ca``, in ``<stem or name>.crt`` and ``.key``;
    ``hosts`` become subjectAltNames (DNS or IP)."""
    if ca.key_file is None:
        raise ConfigError("--ca-key", f"the key of {ca.cert_file} is needed to sign a certificate for {name}")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    stem = stem or name
    key_file = directory / f"{stem}.key"
    pair = CertificatePair(directory / f"{stem}.crt", key_file)
    request = directory / f"{stem}.csr"
    extensions = directory / f"{stem}.ext"
    alt_names = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            alt_names.append(f"IP:{host}")
        except ValueError:
            alt_names.append(f"DNS:{host}")
    lines = [f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
    if alt_names:
        lines.append(f"subjectAltName={','.join(alt_names)}")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl("req", "-new", *_key_args(key_file), "-out", str(request), "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca.cert_file), "-CAkey", str(ca.key_file),
             "-set_serial", f"0x{secrets.token_hex(16)}", "-out", str(pair.cert_file), "-days", str(days),
             "-extfile", str(extensions), cwd=directory)
    request.unlink()
    extensions.unlink()
    key_file.chmod(0o600)
    logger.info("made certificate %s for %s", pair.cert_file, ", ".join(hosts) or name)
    return pair


# ---------------------------------------------------------------------------------- provisioning

MONITOR = "monitor"
_DEFAULTS: dict[str, Any] = {
    "port": 8883, "san": [], "model": "mnist_2nn", "data": "/var/lib/unus-edge/data.npz",
    "config_dir": "/etc/unus-edge", "state_dir": "/var/lib/unus-edge", "aggregator_url": "mqtt://127.0.0.1:1883",
    "client_certs": False, "bind": "",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``unus-edge provision`` flags. Settings not given are taken from an earlier run."""
    parser.add_argument("--job", required=True, help="job name")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (kept: run again to add devices)")
    parser.add_argument("--devices", nargs="+", default=[], metavar="ID", help="device ids to provision")
    parser.add_argument("--devices-file", metavar="FILE", help="more device ids, one per line")
    parser.add_argument("--revoke", nargs="+", default=[], metavar="ID", help="remove these devices from the job")
    parser.add_argument("--rotate", nargs="+", default=[], metavar="USER", help="new passwords for these usernames")
    parser.add_argument("--gateway", metavar="HOST", help="the broker's host name as devices reach it "
                        "(default: this machine's FQDN); also in the server certificate")
    parser.add_argument("--port", type=int, help="the broker's TLS port (default 8883)")
    parser.add_argument("--bind", metavar="ADDRESS", help="the IP address the broker's TLS listener binds "
                        "(default: every interface; the plain listener is always loopback only)")
    parser.add_argument("--san", action="append", metavar="HOST", help="another name or IP for the server certificate")
    parser.add_argument("--ca-cert", metavar="PEM", help="use this CA instead of making one")
    parser.add_argument("--ca-key", metavar="PEM", help="its key (to sign the server certificate)")
    parser.add_argument("--server-cert", metavar="PEM", help="use this server certificate instead of making one")
    parser.add_argument("--server-key", metavar="PEM", help="its key")
    parser.add_argument("--client-certs", action="store_true", default=None, help="a client certificate per device too")
    parser.add_argument("--model", help="the job's model: zoo name or ONNX path (default mnist_2nn)")
    parser.add_argument("--data", metavar="PATH", help="device.data in device.toml "
                        "(default /var/lib/unus-edge/data.npz)")
    parser.add_argument("--config-dir", metavar="DIR", help="where the files are installed (default /etc/unus-edge)")
    parser.add_argument("--state-dir", metavar="DIR", help="the gateway's state folder (default /var/lib/unus-edge)")
    parser.add_argument("--aggregator-url", metavar="URL", help="how the aggregator reaches the broker "
                        "(default mqtt://127.0.0.1:1883, the gateway's loopback listener)")


def run(args: argparse.Namespace) -> int:
    """``unus-edge provision``: see the module docstring."""
    out = Path(args.out).resolve()
    for folder in (out, out / "gateway", out / "devices"):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    manifest = _load_manifest(out / "manifest.json")
    job = _name(args.job, "--job")
    settings = _settings(args, manifest["jobs"].get(job, {}))
    wanted = [_name(device, "--devices") for device in _device_ids(args)]
    revoked = {_name(device, "--revoke") for device in args.revoke}
    devices = sorted((set(settings.get("devices", [])) | set(wanted)) - revoked)
    for device in devices:
        if device == MONITOR or device.startswith("aggregator-"):
            raise ConfigError("--devices", f"{device!r} is reserved for the monitor or an aggregator")
    settings["devices"] = devices
    manifest["jobs"][job] = settings
    jobs = {name: JobIdentities(name, aggregator_user(name), MONITOR, tuple(entry["devices"]))
            for name, entry in manifest["jobs"].items()}
    users = users_of(jobs)
    unknown = set(args.rotate) - users
    if unknown:
        raise ConfigError("--rotate", f"unknown username(s): {', '.join(sorted(unknown))}")
    for device in wanted:
        others = [name for name, entry in jobs.items() if name != job and device in entry.devices]
        if others:
            logger.warning("%s is also in job(s) %s: its device.toml is now for job %s", device, ", ".join(others), job)

    ca = _certificate_authority(args, out, manifest)
    # One broker serves every job of the folder: its certificate names every job's gateway.
    names = [name for entry in manifest["jobs"].values() for name in (entry["gateway"], *entry["san"])]
    hosts = tuple(dict.fromkeys([*names, "localhost", "127.0.0.1"]))
    _server_certificate(args, out / "gateway", ca, hosts)
    shutil.copyfile(ca.cert_file, out / "gateway" / "ca.crt")
    secret_files = {user: _secret_file(out, user) for user in users}
    created = sync_password_file(out / "gateway" / "mosquitto.passwd", secret_files, rotate=set(args.rotate))
    banner = "# Generated by `unus-edge provision` from broker/acl.template: edit the template, not this file.\n"
    (out / "gateway" / "mosquitto.acl").write_text(render_acl(jobs, banner=banner))
    write_toml(out / "gateway" / f"{job}.toml", aggregator_config(job, settings))
    # The listeners install.sh writes into Mosquitto's drop-in (it shipped 8883 on every interface).
    (out / "gateway" / "listeners.env").write_text(
        "# Written by `unus-edge provision`: the Mosquitto listeners install.sh configures.\n"
        f"TLS_PORT={int(settings['port'])}\nTLS_BIND={settings['bind']}\n"
        # With client certificates the certificate is the identity: its CN (the device id) is
        # the username, whatever the client sends (issue 14: device 1's certificate with device
        # 2's password logged in as device 2).
        f"CLIENT_CERTS={1 if settings['client_certs'] else 0}\n")
    for device in devices:
        folder = out / "devices" / device
        shutil.copyfile(ca.cert_file, folder / "ca.crt")
        if settings["client_certs"] and (device in args.rotate or not (folder / f"{device}.key").exists()):
            make_certificate(folder, device, ca, client=True)
        if settings["client_certs"] and (app_user(device) in args.rotate or not (folder / "app.key").exists()):
            make_certificate(folder, app_user(device), ca, client=True, stem="app")
        write_toml(folder / "device.toml", device_config(job, device, settings))
    for folder in sorted((out / "devices").iterdir()):
        if folder.name not in users and (folder / "device.toml").exists():
            shutil.rmtree(folder)
            logger.info("removed the bundle of %s (revoked)", folder.name)
    _save_manifest(out / "manifest.json", manifest)
    _summary(out, job, settings, hosts, created, revoked)
    return 0


def _name(value: str, flag: str) -> str:
    try:
        return validate_name(value, "device id" if flag != "--job" else "job name")
    except ProtocolError as error:
        raise ConfigError(flag, str(error)) from error


def _device_ids(args: argparse.Namespace) -> list[str]:
    ids = list(args.devices)
    if args.devices_file:
        try:
            lines = Path(args.devices_file).read_text().splitlines()
        except OSError as error:
            raise ConfigError("--devices-file", f"cannot read it: {error.strerror}") from error
        ids += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return ids


def _settings(args: argparse.Namespace, previous: Mapping[str, Any]) -> dict[str, Any]:
    """Flags, else the job's settings from an earlier run, else the defaults."""
    settings = {**_DEFAULTS, **previous}
    for key in ("gateway", "port", "bind", "model", "data", "config_dir", "state_dir", "aggregator_url",
                "client_certs"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if args.san:
        settings["san"] = list(dict.fromkeys([*settings["san"], *args.san]))
    settings.setdefault("gateway", socket.getfqdn())
    if not 0 < int(settings["port"]) < 65536:
        raise ConfigError("--port", f"{settings['port']} is not a TCP port")
    if settings["bind"]:
        try:
            ipaddress.ip_address(settings["bind"])
        except ValueError as error:
            raise ConfigError("--bind", f"{settings['bind']!r} is not an IP address") from error
    return settings


def _load_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": 1, "jobs": {}, "ca_key": ""}
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError("--out", f"{path} is unreadable ({error}); use a fresh folder") from error
    return manifest


def _save_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------- TLS


def _certificate_authority(args: argparse.Namespace, out: Path, manifest: dict[str, Any]) -> CertificatePair:
    cert, key = out / "ca.crt", out / "ca.key"
    if args.ca_cert:
        given = Path(args.ca_cert)
        if not given.is_file():
            raise ConfigError("--ca-cert", f"{given} does not exist")
        if key.exists():
            raise ConfigError("--ca-cert", f"{out} already holds a CA made by an earlier run; use another --out")
        if args.ca_key and not Path(args.ca_key).is_file():
            raise ConfigError("--ca-key", f"{args.ca_key} does not exist")
        shutil.copyfile(given, cert)
        manifest["ca_key"] = str(Path(args.ca_key).resolve()) if args.ca_key else ""
    elif not cert.exists():
        make_ca(out)
        logger.info("made a new CA: %s", cert)
    if key.exists():
        return CertificatePair(cert, key)
    return CertificatePair(cert, Path(manifest["ca_key"]) if manifest.get("ca_key") else None)


def _server_certificate(args: argparse.Namespace, gateway: Path, ca: CertificatePair, hosts: Sequence[str]) -> None:
    cert, key = gateway / "server.crt", gateway / "server.key"
    if args.server_cert:
        if not args.server_key:
            raise ConfigError("--server-key", "is required with --server-cert")
        try:
            shutil.copyfile(args.server_cert, cert)
            write_secret(key, Path(args.server_key).read_bytes())
        except OSError as error:
            raise ConfigError("--server-cert", f"cannot copy it: {error}") from error
        return
    if cert.exists() and key.exists() and _still_good(cert, ca.cert_file, hosts):
        return
    make_certificate(gateway, "server", ca, hosts=tuple(hosts))


def _still_good(cert: Path, ca_file: Path, hosts: Sequence[str]) -> bool:
    """Signed by this CA, valid for 30 more days, and for every host name."""
    if _openssl("verify", "-CAfile", str(ca_file), str(cert), cwd=cert.parent, check=False).returncode != 0:
        return False
    if _openssl("x509", "-in", str(cert), "-noout", "-checkend", "2592000", cwd=cert.parent, check=False).returncode:
        return False
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            flag = "-checkip"
        except ValueError:
            flag = "-checkhost"
        output = _openssl("x509", "-in", str(cert), "-noout", flag, host, cwd=cert.parent).stdout
        if "does match" not in output:
            return False
    return True


# ---------------------------------------------------------------------------------- credentials


def _secret_file(out: Path, user: str) -> Path:
    if user == MONITOR or user.startswith("aggregator-"):
        return out / "gateway" / f"{user}.password"
    if user.startswith("app@"):  # a device's local applications (app_user)
        return out / "devices" / user.removeprefix("app@") / "app.password"
    return out / "devices" / user / "password"


def _summary(out: Path, job: str, settings: Mapping[str, Any], hosts: Sequence[str], created: Sequence[str],
             revoked: set[str]) -> None:
    devices = settings["devices"]
    lines = [f"job {job}: {len(devices)} device(s), {len(created)} new password(s)"
             + (f", revoked {', '.join(sorted(revoked))}" if revoked else ""),
             f"  server certificate for {', '.join(hosts)}; devices connect to "
             f"mqtts://{url_host(settings['gateway'])}:{settings['port']}",
             f"  gateway: install.sh --role gateway --bundle {out / 'gateway'} --job {job}"
             "   (then: systemctl reload mosquitto)",
             f"  devices: install.sh --role device --bundle {out / 'devices'}/<id>   ({len(devices)} bundle(s))"]
    hint = _packet_hint(settings["model"])
    sys.stdout.write("\n".join([*lines, *([f"  {hint}"] if hint else [])]) + "\n")


def _packet_hint(model: str) -> str:
    """The smallest Mosquitto max_packet_size for the job's model (the drop-in sets 16 MiB)."""
    try:
        from unus_edge.zoo import resolve_model

        resolved = resolve_model(model)
    except (UnusError, OSError):
        return ""
    size = sum(int(resolved.initializers[name].nbytes) for name in resolved.parameter_names)
    needed = 2 * size + 65_536  # the codec limit: a sparse (DSSGD) update may be twice the dense model
    verdict = "fits in" if needed <= 16 << 20 else "EXCEEDS"
    return f"mosquitto max_packet_size for {model}: at least {needed} bytes ({verdict} the drop-in's 16 MiB)"
