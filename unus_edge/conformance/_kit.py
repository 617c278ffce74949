"""The kit's aggregator side: what the device under test sent, and how to answer it."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from unus_edge import topics
from unus_edge.codec import Envelope
from unus_edge.errors import ProtocolError
from unus_edge.messages import Clock, GlobalModel, Message, Status, Task, Update, decode_message, encode_message
from unus_edge.onnx_io import fingerprint, load_model, read_parameters
from unus_edge.topics import Channel
from unus_edge.transport import Transport
from unus_edge.zoo import build_model

__all__ = ["EXAMPLES", "MODEL", "CheckResult", "Kit", "StepFailedError"]

M = TypeVar("M", bound=Message)
MODEL = "logreg"
"""The job's model (a zoo name): small, so that every step takes milliseconds of training."""
EXAMPLES = 60
"""Examples in the device's partition."""


@dataclass(frozen=True)
class CheckResult:
    """One step: ``passed`` is None when it did not run (an earlier step failed)."""

    name: str
    passed: bool | None
    detail: str
    seconds: float = 0.0


class StepFailedError(Exception):
    """A step saw something the protocol forbids, or not what it requires."""


class Kit:
    """The aggregator side: what the device sent, and a way to answer."""

    def __init__(self, transport: Transport, job: str, device_id: str, quiet_seconds: float, timeout: float) -> None:
        self.transport, self.job, self.device_id = transport, job, device_id
        self.quiet_seconds, self.timeout = quiet_seconds, timeout
        self.inbox: asyncio.Queue[tuple[Envelope, Message]] = asyncio.Queue()
        self.problems: list[str] = []
        model = load_model(build_model(MODEL), name=MODEL)
        self.fingerprint = fingerprint(model)
        self.params = read_parameters(model)
        self.session = ""  # the aggregator session the kit speaks as
        self.device_session = ""
        self.process: asyncio.subprocess.Process | None = None
        self.last_task: Task | None = None

    async def receive(self) -> None:
        async for message in self.transport.messages():
            try:
                parsed = topics.parse(message.topic)
                envelope, decoded = decode_message(message.payload, parsed.channel)
            except ProtocolError as error:
                self.problems.append(f"undecodable message on {message.topic}: {error}")
                continue
            if parsed.device_id == self.device_id:
                self.inbox.put_nowait((envelope, decoded))

    async def next_message(self, kinds: tuple[type[Message], ...], what: str, within: float | None = None,
                           ) -> tuple[Envelope, Message]:
        """The next message of one of ``kinds``; messages of other kinds are skipped."""
        try:
            async with asyncio.timeout(within or self.timeout):
                while True:
                    envelope, message = await self.inbox.get()
                    if isinstance(message, kinds):
                        return envelope, message
        except TimeoutError:
            raise StepFailedError(f"no {what} within {within or self.timeout:.0f} s") from None

    async def expect(self, kind: type[M], what: str, accept: Callable[[M], bool] = lambda _: True,
                     *, within: float | None = None) -> tuple[Envelope, M]:
        """The next message of ``kind`` that ``accept`` takes (others are skipped)."""
        end = time.monotonic() + (within or self.timeout)
        while True:
            envelope, message = await self.next_message((kind,), what, max(0.001, end - time.monotonic()))
            assert isinstance(message, kind)
            if accept(message):
                return envelope, message

    async def quiet(self, kind: type[Message], what: str) -> None:
        """Nothing of ``kind`` for ``quiet_seconds``, and the device still running."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.quiet_seconds):
                while True:
                    _, message = await self.inbox.get()
                    if isinstance(message, kind):
                        raise StepFailedError(f"{what}, but got {message!r}"[:400])
        if self.process is not None and self.process.returncode is not None:
            raise StepFailedError(f"the device exited (code {self.process.returncode})")

    async def send(self, message: Message) -> str:
        """To the device's tasks topic (tasks, replies, acks); returns the message id."""
        msg_id = secrets.token_hex(16)
        payload = encode_message(message, self.job, Channel.TASKS, msg_id=msg_id)
        await self.transport.publish(topics.device_topic(self.job, self.device_id, Channel.TASKS), payload, qos=1)
        return msg_id

    async def announce(self, session: str) -> None:
        self.session = session
        status = Status("aggregator", "online", session, role="aggregator", software_version="conformance")
        await self.transport.publish(topics.aggregator_status(self.job),
                                     encode_message(status, self.job, Channel.AGGREGATOR_STATUS), qos=1, retain=True)

    async def publish_model(self, version: int) -> None:
        message = GlobalModel(version, version, self.fingerprint, self.session, self.params)
        await self.transport.publish(topics.model(self.job), encode_message(message, self.job, Channel.MODEL),
                                     qos=1, retain=True)

    async def publish_clock(self, version: int, c_min: int, model_version: int, state: str = "running") -> None:
        clock = Clock(version=version, server_round=c_min, aggregator_session=self.session,
                      state=state, c_min=c_min, staleness_bound=0, live_devices=1,  # type: ignore[arg-type]
                      clocks={self.device_id: c_min}, model_version=model_version)
        await self.transport.publish(topics.clock(self.job), encode_message(clock, self.job, Channel.CLOCK),
                                     qos=1, retain=True)

    def task(self, label: str, *, model_version: int = 1, mode: str = "sync", **config: Any) -> Task:
        prefix = "ssp" if mode == "ssp" else f"r{label}.0"
        return Task(self.device_id, f"{prefix}.{secrets.token_hex(8)}.{self.device_id}", 1, model_version, 1, 10,
                    0.1, mode=mode, config={"seed": 1, "momentum": 0.0, "weight_decay": 0.0, **config})  # type: ignore[arg-type]

    def check_update(self, update: Update, task: Task, base_version: int) -> None:
        problems = []
        if update.session != self.device_session:
            problems.append(f"session {update.session!r} is not the registered {self.device_session!r}")
        if update.base_version != base_version:
            problems.append(f"base_version {update.base_version}, expected {base_version}")
        if update.num_examples != EXAMPLES:
            problems.append(f"num_examples {update.num_examples}, the partition has {EXAMPLES}")
        if update.encoding != "delta":
            problems.append(f"encoding {update.encoding!r}; the task asked for the delta")
        if set(update.tensors) != set(self.params):
            problems.append(f"tensors {sorted(update.tensors)}, the model has {sorted(self.params)}")
        for name, tensor in update.tensors.items():
            reference = self.params.get(name)
            if reference is None or not isinstance(tensor, np.ndarray):
                continue
            if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
                problems.append(f"{name}: {tensor.dtype}{tensor.shape}, the model has "
                                f"{reference.dtype}{reference.shape}")
            elif not np.all(np.isfinite(tensor)):
                problems.append(f"{name} is not finite")
        if all(isinstance(t, np.ndarray) and not np.any(t) for t in update.tensors.values()):
            problems.append("the delta is all zeros: nothing was trained")
        if problems:
            raise StepFailedError("; ".join(problems))


