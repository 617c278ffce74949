"""Aggregator checkpoints and the audit log.

``<dir>/checkpoint.cbor`` is one CBOR envelope: the global model and its version, the last
completed round, the RNG state, the registry (with the devices' clocks), the metrics history,
the deduplication window, the driver's state (the round in progress with its accumulator, or
the SSP clocks and the strategy's state) and the audit entries of the last commit. A
consistent snapshot is taken in the event loop (:func:`freeze_checkpoint`: copies, no
encoding); a worker thread encodes it, writes it to a temporary file, fsyncs it, renames it
over the old one and fsyncs the directory. A crash at any point leaves either the old
or the new checkpoint, never a torn one.

``<dir>/audit.jsonl`` has one line per applied update (``msg_id``, device, task, round or
clock, version). It is appended *after* the checkpoint that contains those updates, so it is
always a prefix of what the checkpoint knows. On load, a line missing after a crash is put back
from the checkpoint, and a torn last line is cut.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unus_edge.aggregator._registry import DeviceRecord
from unus_edge.codec import Envelope, Limits, decode, encode
from unus_edge.errors import CodecError, JobError
from unus_edge.strategies import Params

__all__ = [
    "AUDIT_FILE",
    "CHECKPOINT_FILE",
    "Checkpoint",
    "FrozenCheckpoint",
    "append_audit",
    "encode_checkpoint",
    "encode_frozen",
    "freeze_checkpoint",
    "load_checkpoint",
    "read_audit",
    "save_checkpoint",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.cbor"
AUDIT_FILE = "audit.jsonl"
_LIMITS = Limits(max_payload_bytes=1 << 31, max_items=10_000_000, max_string_bytes=1 << 24,
                 max_tensors=1 << 20, max_elements=1 << 31)
_EXTRA = "@"  # prefix of non-model tensors (accumulator, strategy state) in the checkpoint


@dataclass
class Checkpoint:
    job: str
    fingerprint: str
    server_round: int
    """The last completed round."""
    version: int
    params: Params
    rng_state: dict[str, Any]
    devices: list[DeviceRecord] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    dedup: Sequence[tuple[str, bool, str]] = field(default_factory=list)
    finished: bool = False
    driver: dict[str, Any] = field(default_factory=dict)
    """The driver's own state (JSON-able): the round in progress, or SSP clocks."""
    tensors: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    """The driver's tensors: the accumulator's sums, the asynchronous strategy's state."""
    audit_count: int = 0
    """Audit entries applied up to and including this checkpoint."""
    pending_audit: list[dict[str, Any]] = field(default_factory=list)
    """The audit entries of the commit that wrote this checkpoint (the last ``len`` of them)."""
    counters: dict[str, Any] = field(default_factory=dict)
    """The job totals (bytes up and down, messages by outcome, refusals by reason): a resumed job
    goes on counting from them (``Counters.as_dict``)."""


@dataclass(frozen=True)
class FrozenCheckpoint:
    """A checkpoint taken in the event loop, ready to encode: nothing in it changes afterwards
    (its arrays are copies, its records and state are plain values), so a worker thread may
    encode it while the loop goes on."""

    job: str
    body: dict[str, Any]
    tensors: dict[str, np.ndarray[Any, Any]]


def freeze_checkpoint(checkpoint: Checkpoint) -> FrozenCheckpoint:
    """In the event loop: copy what later updates could change (arrays, device records, the
    driver's state, as JSON text). Costs a copy of the tensors; the encoding is left for later."""
    body = {
        "fingerprint": checkpoint.fingerprint,
        "server_round": checkpoint.server_round,
        "version": checkpoint.version,
        # PCG64 states are 128-bit integers: JSON text keeps them exact.
        "rng_state": json.dumps(checkpoint.rng_state),
        "devices": [record.as_dict() for record in checkpoint.devices],  # plain fields: a shallow copy
        "history": checkpoint.history,
        "dedup": checkpoint.dedup,  # a copy; its rows are built when encoded (encode_frozen)
        "finished": checkpoint.finished,
        "driver": json.dumps(checkpoint.driver),
        "audit_count": checkpoint.audit_count,
        "pending_audit": json.dumps(checkpoint.pending_audit),
        "counters": json.dumps(checkpoint.counters),
    }
    tensors: dict[str, np.ndarray[Any, Any]] = {name: np.array(value, copy=True)
                                                for name, value in checkpoint.params.items()}
    tensors.update({_EXTRA + name: np.array(value, copy=True) for name, value in checkpoint.tensors.items()})
    return FrozenCheckpoint(checkpoint.job, body, tensors)


def encode_frozen(frozen: FrozenCheckpoint) -> bytes:
    """The checkpoint's CBOR envelope; safe in a worker thread."""
    body = dict(frozen.body, dedup=list(frozen.body["dedup"]))  # (msg_id, accepted, reason) rows: CBOR arrays
    return encode(Envelope("checkpoint", frozen.job, body, frozen.tensors))


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """Serialise now (copies every array: later in-place updates do not reach the file)."""
    return encode_frozen(freeze_checkpoint(checkpoint))


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint(directory: Path, payload: bytes) -> Path:
    """Write an encoded checkpoint atomically (temporary file, fsync, rename, fsync the folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    temporary = directory / f".{CHECKPOINT_FILE}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(directory)
    return path


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Encode and write ``checkpoint`` atomically into ``directory``; return the file."""
    return write_checkpoint(directory, encode_checkpoint(checkpoint))


def append_audit(directory: Path, entries: list[dict[str, Any]]) -> None:
    """Append applied updates to the audit log and fsync it."""
    if not entries:
        return
    with open(directory / AUDIT_FILE, "a", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_audit(directory: Path) -> list[dict[str, Any]]:
    """The audit log's entries (a torn last line, left by a crash, is skipped)."""
    path = directory / AUDIT_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        entries.append(json.loads(line))
    return entries


def _repair_audit(directory: Path, checkpoint: Checkpoint) -> None:
    """Make the audit log hold exactly the checkpoint's ``audit_count`` entries."""
    path = directory / AUDIT_FILE
    entries = read_audit(directory)
    if len(entries) > checkpoint.audit_count:
        raise JobError(checkpoint.job, f"{path} has {len(entries)} entries, the checkpoint only "
                                       f"{checkpoint.audit_count}: they do not belong together")
    missing = checkpoint.audit_count - len(entries)
    if missing or (path.exists() and not path.read_bytes().endswith(b"\n") and path.stat().st_size):
        with open(path, "w", encoding="utf-8") as handle:  # rewrite without a torn last line
            handle.writelines(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
        if missing > len(checkpoint.pending_audit):
            raise JobError(checkpoint.job, f"{path} misses {missing} entries the checkpoint cannot restore")
        append_audit(directory, checkpoint.pending_audit[len(checkpoint.pending_audit) - missing:])
        logger.warning("audit log repaired: %d entr%s restored from the checkpoint", missing,
                       "y" if missing == 1 else "ies")


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory`` (audit log repaired), ``None`` if none; ``JobError`` if unreadable."""
    path = directory / CHECKPOINT_FILE
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise JobError("?", f"cannot read checkpoint {path}: {error.strerror}") from error
    try:
        envelope = decode(payload, limits=_LIMITS)
        body = envelope.body
        tensors: Mapping[str, Any] = envelope.tensors
        checkpoint = Checkpoint(
            job=envelope.job,
            fingerprint=str(body["fingerprint"]),
            server_round=int(body["server_round"]),
            version=int(body["version"]),
            params={n: np.array(v) for n, v in tensors.items() if not n.startswith(_EXTRA)},  # writable copies
            rng_state=json.loads(body["rng_state"]),
            devices=[DeviceRecord(**record) for record in body["devices"]],
            history=list(body["history"]),
            dedup=[(str(m), bool(a), str(r)) for m, a, r in body["dedup"]],
            finished=bool(body.get("finished", False)),
            driver=json.loads(body.get("driver", "{}")),
            tensors={n[len(_EXTRA):]: np.array(v) for n, v in tensors.items() if n.startswith(_EXTRA)},
            audit_count=int(body.get("audit_count", 0)),
            pending_audit=json.loads(body.get("pending_audit", "[]")),
            counters=json.loads(body.get("counters", "{}")),  # absent in checkpoints before 2026-12-03
        )
    except (CodecError, KeyError, TypeError, ValueError) as error:
        raise JobError("?", f"checkpoint {path} is corrupt: {error}") from error
    _repair_audit(directory, checkpoint)
    logger.info("loaded checkpoint %s: round %d, version %d", path, checkpoint.server_round, checkpoint.version)
    return checkpoint
