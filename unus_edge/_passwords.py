"""Mosquitto password files, written without ``mosquitto_passwd``.

A line is ``username:$7$<iterations>$<base64 salt>$<base64 hash>``: PBKDF2-HMAC-SHA512 over the
password with a 12-byte salt and a 64-byte result, standard base64 with padding. This is the
format of Mosquitto 2.0's ``mosquitto_passwd`` (which uses 101 iterations); Mosquitto reads the
iteration count from each line. The passwords unus-edge generates are 256-bit random tokens, so
the iteration count is not what protects them; 1000 keeps a Pi gateway's CONNECT cheap.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ITERATIONS", "hash_password", "new_password", "read_password_file", "render_password_file",
           "sync_password_file", "verify_password", "write_secret"]

ITERATIONS = 1000
_SALT_BYTES = 12
_HASH_BYTES = 64


def new_password() -> str:
    """A fresh random password: 43 URL-safe characters (256 bits)."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The ``$7$...`` hash of ``password`` (the part after ``username:``)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (as Mosquitto would check it)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def read_password_file(path: Path) -> dict[str, str]:
    """``{username: hash}`` from a Mosquitto password file (missing file: empty)."""
    entries: dict[str, str] = {}
    if not path.exists():
        return entries
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, separator, hashed = line.partition(":")
        if separator:
            entries[username] = hashed
    return entries


def render_password_file(entries: dict[str, str]) -> str:
    """The file's text, one ``username:hash`` line per entry, sorted by username."""
    return "".join(f"{username}:{entries[username]}\n" for username in sorted(entries))


def write_secret(path: Path, content: str | bytes) -> None:
    """Write a secret readable only by its owner (mode 0600), atomically."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a leftover temporary file keeps its mode otherwise
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def sync_password_file(
    path: Path, secret_files: Mapping[str, Path], *, rotate: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Make the password file at ``path`` hold exactly the users of ``secret_files``.

    Each user's plain password lives in its secret file (made, mode 0600, when missing or when
    the user is in ``rotate``); an existing hash that still matches it is kept as it is.
    Returns the users that got a new password.
    """
    hashes = {user: hashed for user, hashed in read_password_file(path).items() if user in secret_files}
    created = []
    for user in sorted(secret_files):
        secret = secret_files[user]
        secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        current = secret.read_text().strip() if secret.exists() else ""
        if user in rotate or not current:
            current = new_password()
            write_secret(secret, current + "\n")
            created.append(user)
            hashes[user] = hash_password(current)
        elif user not in hashes or not verify_password(hashes[user], current):
            hashes[user] = hash_password(current)
    write_secret(path, render_password_file(hashes))
    return created
