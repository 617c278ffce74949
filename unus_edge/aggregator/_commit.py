"""Group commit: an update is acknowledged only once a checkpoint holding it is on disk.

Accepted updates queue their acknowledgement and audit entry here. The committer task takes a
consistent snapshot of the aggregator in the event loop (:meth:`Aggregator.checkpoint`,
frozen by copies), encodes and writes it atomically in a worker thread, appends the audit
entries, and only then sends the acknowledgements. The encoding, the costly part (a quarter of
a second with a full dedup window, ``bench/bench_commit_stall.py``), stays off the loop. One
write serves every update accepted meanwhile (a burst shares a commit). Without a checkpoint
folder the acknowledgements go out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unus_edge.aggregator._checkpoint import (
    Checkpoint,
    FrozenCheckpoint,
    append_audit,
    encode_frozen,
    freeze_checkpoint,
    write_checkpoint,
)
from unus_edge.aggregator._ports import Outbox
from unus_edge.errors import TransportError
from unus_edge.messages import Ack

__all__ = ["GroupCommit"]


class GroupCommit:
    """Commits to ``directory`` (none: acknowledge at once) the checkpoints ``snapshot`` takes.

    ``snapshot`` is given the audit entries the checkpoint must carry; ``running`` says whether
    the service's task group is up (acknowledgements are then posted through ``outbox``).
    """

    def __init__(self, directory: str, snapshot: Callable[[list[dict[str, Any]]], Checkpoint], outbox: Outbox,
                 running: Callable[[], bool]) -> None:
        self.directory = directory
        self.snapshot = snapshot
        self.outbox = outbox
        self.running = running
        self.unacked: list[Ack] = []
        self.pending_ids: set[str] = set()
        """Accepted updates whose acknowledgement waits for the next commit."""
        self.audit_pending: list[dict[str, Any]] = []
        self.audit_count = 0
        self._wanted = asyncio.Event()
        self._progress = asyncio.Event()
        self._requested = 0
        self._done = 0

    def add(self, ack: Ack, audit_entry: dict[str, Any]) -> None:
        """An update was applied: acknowledge it after the next commit."""
        self.unacked.append(ack)
        self.pending_ids.add(ack.update_msg_id)
        self.audit_pending.append(audit_entry)
        self.request()

    def request(self) -> int:
        self._requested += 1
        self._wanted.set()
        return self._requested

    async def commit(self, *, running: bool) -> None:
        """Checkpoint everything applied so far; with ``running`` the committer task does it."""
        target = self.request()
        if not running:
            await self._commit_once()
            return
        while self._done < target:
            self._progress.clear()
            await self._progress.wait()

    async def run(self) -> None:
        """The committer task."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self._commit_once()

    async def _commit_once(self) -> None:
        target = self._requested
        acks, self.unacked = self.unacked, []
        audit, self.audit_pending = self.audit_pending, []
        if self.directory:
            directory = Path(self.directory)
            self.audit_count += len(audit)
            frozen = freeze_checkpoint(self.snapshot(audit))  # a consistent snapshot, taken in the loop
            await asyncio.to_thread(_encode_and_write, directory, frozen, audit)
        for ack in acks:
            self.pending_ids.discard(ack.update_msg_id)
            if self.running():
                self.outbox.post(ack.device_id, ack)
            else:  # shutting down: try, briefly (a device re-publishes an unacknowledged update anyway)
                with contextlib.suppress(TimeoutError, TransportError):
                    async with asyncio.timeout(2):
                        await self.outbox.send_to_device(ack.device_id, ack)
        self._done = max(self._done, target)
        self._progress.set()


def _encode_and_write(directory: Path, frozen: FrozenCheckpoint, audit: list[dict[str, Any]]) -> None:
    """In a worker thread: encode the checkpoint, write it atomically, then append the audit entries."""
    write_checkpoint(directory, encode_frozen(frozen))
    append_audit(directory, audit)
