"""Aggregator checkpoints: one CBOR envelope on disk, written atomically.

The file ``<dir>/checkpoint.cbor`` holds the global model and its version, the last completed
round, the RNG state, the registry, the metrics history and the deduplication window. It is
written to a temporary file, fsync'ed, renamed over the old one, and the directory fsync'ed: a
crash at any point leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unus_edge.aggregator._registry import DeviceRecord
from unus_edge.codec import Envelope, Limits, decode, encode
from unus_edge.errors import CodecError, JobError
from unus_edge.strategies import Params

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.cbor"
_LIMITS = Limits(max_payload_bytes=1 << 31, max_items=10_000_000, max_string_bytes=1 << 24)


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
    dedup: list[tuple[str, bool, str]] = field(default_factory=list)
    finished: bool = False


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically into ``directory``; return the file."""
    directory.mkdir(parents=True, exist_ok=True)
    body = {
        "fingerprint": checkpoint.fingerprint,
        "server_round": checkpoint.server_round,
        "version": checkpoint.version,
        # PCG64 states are 128-bit integers: JSON text keeps them exact.
        "rng_state": json.dumps(checkpoint.rng_state),
        "devices": [dataclasses.asdict(record) for record in checkpoint.devices],
        "history": checkpoint.history,
        "dedup": [[msg_id, accepted, reason] for msg_id, accepted, reason in checkpoint.dedup],
        "finished": checkpoint.finished,
    }
    payload = encode(Envelope("checkpoint", checkpoint.job, body, checkpoint.params))
    path = directory / CHECKPOINT_FILE
    temporary = directory / f".{CHECKPOINT_FILE}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return path


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or ``None`` if there is none; ``JobError`` if unreadable."""
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
        devices = [DeviceRecord(**record) for record in body["devices"]]
        checkpoint = Checkpoint(
            job=envelope.job,
            fingerprint=str(body["fingerprint"]),
            server_round=int(body["server_round"]),
            version=int(body["version"]),
            params={name: np.array(value) for name, value in envelope.tensors.items()},  # writable copies
            rng_state=json.loads(body["rng_state"]),
            devices=devices,
            history=list(body["history"]),
            dedup=[(str(m), bool(a), str(r)) for m, a, r in body["dedup"]],
            finished=bool(body.get("finished", False)),
        )
    except (CodecError, KeyError, TypeError, ValueError) as error:
        raise JobError("?", f"checkpoint {path} is corrupt: {error}") from error
    logger.info("loaded checkpoint %s: round %d, version %d", path, checkpoint.server_round, checkpoint.version)
    return checkpoint
