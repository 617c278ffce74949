"""Provisioning: certificates and credentials for a fleet (``unus-edge provision``).

Certificates are made with the ``openssl`` command-line tool, present on Raspberry Pi OS and
every Debian gateway, so that the core install needs no cryptography package. Keys are EC
P-256 (fast on a Pi), written with mode 0600.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from unus_edge.errors import ConfigError

__all__ = ["CertificatePair", "add_arguments", "make_ca", "make_certificate", "run", "write_secret"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """A PEM certificate and its private key on disk."""

    cert_file: Path
    key_file: Path


def write_secret(path: Path, content: str | bytes) -> None:
    """Write a secret readable only by its owner (mode 0600), atomically."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise ConfigError("tls", "the openssl command is needed to make certificates (apt-get install openssl)")
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ConfigError("tls", f"openssl {args[0]} failed: {result.stderr.strip()}")


def _key_args(key_file: Path) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key_file)]


def make_ca(directory: Path, *, common_name: str = "unus-edge CA", days: int = 3650) -> CertificatePair:
    """A self-signed certificate authority in ``directory`` (``ca.crt``, ``ca.key``)."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertificatePair(directory / "ca.crt", directory / "ca.key")
    _openssl("req", "-x509", *_key_args(pair.key_file), "-out", str(pair.cert_file), "-days", str(days),
             "-subj", f"/CN={common_name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    pair.key_file.chmod(0o600)
    return pair


def make_certificate(
    directory: Path, name: str, ca: CertificatePair, *, hosts: tuple[str, ...] = (), days: int = 825,
    client: bool = False,
) -> CertificatePair:
    """A certificate for ``name`` signed by ``ca``; ``hosts`` become subjectAltNames (DNS or IP)."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertificatePair(directory / f"{name}.crt", directory / f"{name}.key")
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
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
    _openssl("req", "-new", *_key_args(pair.key_file), "-out", str(request), "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca.cert_file), "-CAkey", str(ca.key_file),
             "-CAcreateserial", "-out", str(pair.cert_file), "-days", str(days), "-extfile", str(extensions),
             cwd=directory)
    request.unlink()
    extensions.unlink()
    pair.key_file.chmod(0o600)
    logger.info("made certificate %s for %s", pair.cert_file, ", ".join(hosts) or name)
    return pair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``unus-edge provision`` flags (to be completed with the provisioning itself)."""
    parser.add_argument("--job", required=True, help="job name")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    """``unus-edge provision`` (not implemented yet)."""
    raise ConfigError("provision", "not implemented yet")
