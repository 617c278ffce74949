"""The messages of the protocol, as frozen dataclasses validated on the way in.

Each message class names its envelope ``KIND``; the fields of the dataclass are the keys of the
envelope ``body`` (a field called ``tensors`` travels in the envelope's tensor section
instead). Decoding is driven by the type annotations, so what a class declares is exactly what
the wire accepts:

* ``str``, ``int``, ``float``, ``bool`` (``int`` refuses ``bool``; ``float`` accepts integers and
  refuses NaN and infinities), ``Literal[...]``, ``X | None``;
* ``tuple[X, ...]`` from a list, ``Mapping[str, X]`` from a map.

Unknown body fields are ignored, so a newer peer may add optional fields without a schema
bump; a missing field without a default, or a value of the wrong type, raises
:class:`~unus_edge.errors.MessageError` with ``reason`` ``missing_field`` / ``bad_field``.
Each class may check cross-field rules in ``validate``.

Which kinds may arrive on which channel is fixed by :data:`CHANNEL_KINDS`; anything else is
``MessageError("unexpected_kind")``.

This module declares the messages, the channel map and the encode/decode entry points; the
:class:`Message` base and the annotation-driven validation live in
:mod:`unus_edge._message_fields`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from unus_edge._message_fields import Message, check_field
from unus_edge._types import Scalar
from unus_edge.codec import DEFAULT_LIMITS, Envelope, Limits, Tensor, decode, encode
from unus_edge.errors import MessageError
from unus_edge.topics import TOPIC_SPECS, Channel

__all__ = [
    "CHANNEL_KINDS",
    "Ack",
    "Clock",
    "DeviceFacts",
    "EvaluateTask",
    "EvaluationResult",
    "FederatedMetrics",
    "FleetMetrics",
    "GlobalModel",
    "Heartbeat",
    "JobMetrics",
    "Message",
    "PredictRequest",
    "Prediction",
    "Registration",
    "RegistrationReply",
    "Release",
    "RoundMetrics",
    "Scalar",
    "Status",
    "Task",
    "Update",
    "decode_message",
    "encode_message",
    "expect",
    "staleness_bucket",
    "task_encoding",
]


M = TypeVar("M", bound="Message")


# --------------------------------------------------------------------------------------------
# Presence and liveness (JSON, human-facing)


@dataclass(frozen=True, slots=True)
class Status(Message):
    """Presence of a device or of the aggregator (retained; also the last will)."""

    KIND: ClassVar[str] = "status"
    device_id: str
    state: Literal["online", "offline"]
    session: str
    role: Literal["device", "aggregator"] = "device"
    reason: str = ""
    """Why offline: ``"shutdown"`` (graceful), ``"will"`` (connection lost), ``"crashed"`` (a
    device adds ``": <Type>: <message>"``), ``"rejected: <detail>"`` (a refused device)."""
    software_version: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Periodic proof of life; also what the device is doing right now."""

    KIND: ClassVar[str] = "heartbeat"
    device_id: str
    session: str
    sequence: int
    state: Literal["idle", "training", "waiting", "uploading"] = "idle"
    clock: int = 0
    uptime_seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Registration (CBOR)


@dataclass(frozen=True, slots=True)
class Registration(Message):
    """A device introduces itself; the aggregator answers with :class:`RegistrationReply`."""

    KIND: ClassVar[str] = "register"
    device_id: str
    session: str
    num_examples: int
    model_fingerprint: str
    software_version: str
    platform: str = ""
    machine: str = ""
    python_version: str = ""
    cpu_count: int = 0
    memory_bytes: int = 0
    capabilities: tuple[str, ...] = ()

    def validate(self) -> None:
        check_field(self.num_examples >= 1, self.KIND, "num_examples", "must be at least 1")
        check_field(self.cpu_count >= 0 and self.memory_bytes >= 0, self.KIND, "cpu_count", "must be >= 0")


@dataclass(frozen=True, slots=True)
class RegistrationReply(Message):
    """Accepts or rejects a registration, with a reason the device logs."""

    KIND: ClassVar[str] = "registered"
    device_id: str
    accepted: bool
    aggregator_session: str
    reason: str = ""
    detail: str = ""
    clock: int = 0
    """The device's clock c_i as the aggregator knows it (a rejoining device starts here)."""
    session: str = ""
    """The device session whose registration this answers (devices ignore answers to others)."""


# --------------------------------------------------------------------------------------------
# Training (CBOR)


@dataclass(frozen=True, slots=True)
class Task(Message):
    """Work for one device: train from model ``model_version`` and send an update.

    In ``sync`` mode there is one task per round; in ``ssp`` mode a single standing task
    configures the device, which then paces itself on the retained clock.
    """

    KIND: ClassVar[str] = "task"
    device_id: str
    task_id: str
    server_round: int
    model_version: int
    epochs: int
    batch_size: int
    learning_rate: float
    mode: Literal["sync", "ssp"] = "sync"
    deadline_seconds: float = 0.0
    """Time budget for the task; 0 means none. Relative, so device clocks need not agree."""
    config: Mapping[str, Scalar] = field(default_factory=dict)
    """Strategy-specific device settings (for example ``proximal_mu``)."""

    @property
    def encoding(self) -> Literal["delta", "weights"]:
        """What the update must carry: ``config["encoding"] == "weights"`` asks for the trained
        weights, anything else for the delta. Decided here only, for the device and the driver."""
        return task_encoding(self.config)

    def validate(self) -> None:
        check_field(self.epochs >= 1, self.KIND, "epochs", "must be at least 1")
        check_field(self.batch_size >= 1, self.KIND, "batch_size", "must be at least 1")
        check_field(self.learning_rate > 0, self.KIND, "learning_rate", "must be positive")
        check_field(self.server_round >= 0 and self.model_version >= 0, self.KIND, "server_round", "must be >= 0")


@dataclass(frozen=True, slots=True)
class Update(Message):
    """A device's contribution: tensors (a delta against ``base_version`` by default)."""

    KIND: ClassVar[str] = "update"
    device_id: str
    session: str
    task_id: str
    server_round: int
    base_version: int
    num_examples: int
    train_loss: float
    tensors: Mapping[str, Tensor]
    encoding: Literal["delta", "weights"] = "delta"
    clock: int = 0
    """Which of this device's updates this is (c_i before it is applied)."""
    train_seconds: float = 0.0
    metrics: Mapping[str, Scalar] = field(default_factory=dict)

    def validate(self) -> None:
        check_field(self.num_examples >= 1, self.KIND, "num_examples", "must be at least 1")
        check_field(self.base_version >= 0 and self.server_round >= 0, self.KIND, "base_version", "must be >= 0")


@dataclass(frozen=True, slots=True)
class EvaluateTask(Message):
    """Federated evaluation: evaluate model ``model_version`` on the device's held-out examples."""

    KIND: ClassVar[str] = "evaluate"
    device_id: str
    task_id: str
    server_round: int
    """The round (sync) or the evaluation's number (SSP) it belongs to."""
    model_version: int
    deadline_seconds: float = 0.0
    """The answer is counted only if it arrives within this many seconds (0: no limit)."""


@dataclass(frozen=True, slots=True)
class EvaluationResult(Message):
    """A device's answer to :class:`EvaluateTask` (on its ``update`` topic; never acknowledged)."""

    KIND: ClassVar[str] = "evaluation"
    device_id: str
    session: str
    task_id: str
    model_version: int
    """The version evaluated (SSP: the one the device holds, possibly newer than asked)."""
    num_examples: int
    loss: float | None = None
    accuracy: float | None = None
    split: Literal["held_out", "train"] = "held_out"
    """``train`` when the device keeps no held-out examples (``device.holdout = 0``)."""
    error: str = ""
    """Why the device could not evaluate (then the figures are null); counted as a failure."""
    mse: float | None = None
    """A regression model's mean squared error (then also ``loss``; ``accuracy`` is null)."""


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The aggregator's verdict on one update, so the device may forget it (or resend)."""

    KIND: ClassVar[str] = "ack"
    device_id: str
    update_msg_id: str
    task_id: str
    accepted: bool
    reason: str = ""
    clock: int = 0
    """The device's clock c_i after this update."""
    version: int = 0
    """The global model version after this update (train from at least this version next)."""


@dataclass(frozen=True, slots=True)
class GlobalModel(Message):
    """The current global model (retained)."""

    KIND: ClassVar[str] = "model"
    version: int
    server_round: int
    fingerprint: str
    aggregator_session: str
    tensors: Mapping[str, Tensor]


@dataclass(frozen=True, slots=True)
class Release(Message):
    """The trained model, handed to the fleet for use (retained on ``release``)."""

    KIND: ClassVar[str] = "release"
    job: str
    version: int
    server_round: int
    fingerprint: str
    """The model's architecture fingerprint: a device stores a release only for its own model."""
    aggregator_session: str
    tensors: Mapping[str, Tensor]
    eval_accuracy: float | None = None
    """The last evaluation's accuracy (central, else federated), for the operator's records."""
    eval_mse: float | None = None
    """A regression's last mean squared error (central, else federated)."""
    task: Literal["classification", "regression"] = "classification"
    """What the outputs are: class scores (a prediction is the arg-max) or the predicted values."""


@dataclass(frozen=True, slots=True)
class Clock(Message):
    """Global model version and SSP clock state (retained). ``staleness_bound`` None is infinity."""

    KIND: ClassVar[str] = "clock"
    version: int
    server_round: int
    aggregator_session: str
    state: Literal["waiting", "running", "finished", "failed"] = "running"
    c_min: int = 0
    staleness_bound: int | None = 0
    live_devices: int = 0
    clocks: Mapping[str, int] = field(default_factory=dict)
    model_version: int = -1
    """Version of the retained model when this clock was published (-1: unknown, an older
    aggregator). An SSP device may start from any model of at least this version."""


# --------------------------------------------------------------------------------------------
# Metrics (JSON, human-facing)


@dataclass(frozen=True, slots=True)
class RoundMetrics(Message):
    """Published after every round or buffer flush on ``metrics/round``."""

    KIND: ClassVar[str] = "round"
    server_round: int
    version: int
    num_selected: int
    num_updates: int
    num_failures: int
    num_examples: int
    duration_seconds: float
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    """Seconds since the job started."""
    num_rejected: int = 0
    """Updates refused in this round (SSP: since the previous report)."""
    eval_mse: float | None = None
    """A regression model's mean squared error on the central test set (then also ``eval_loss``)."""


@dataclass(frozen=True, slots=True)
class DeviceFacts(Message):
    """One device as the aggregator sees it, retained on ``metrics/devices/{device_id}``."""

    KIND: ClassVar[str] = "device"
    device_id: str
    online: bool
    last_seen: float
    rounds_contributed: int = 0
    last_train_loss: float | None = None
    num_examples: int = 0
    clock: int = 0
    platform: str = ""


@dataclass(frozen=True, slots=True)
class FleetMetrics(Message):
    """The fleet in counts, on ``metrics/devices``: its size does not grow with the fleet (each
    device's facts have their own topic). Published after the registry changes, at most once per
    ``job.fleet_interval``."""

    KIND: ClassVar[str] = "devices"
    registered: int
    online: int
    platforms: Mapping[str, int] = field(default_factory=dict)
    """Registered devices by platform: the most common ones, the rest summed under ``"other"``."""


@dataclass(frozen=True, slots=True)
class FederatedMetrics(Message):
    """One federated evaluation, retained on ``metrics/evaluation``: the devices' answers combined."""

    KIND: ClassVar[str] = "federated_evaluation"
    server_round: int
    version: int
    num_selected: int
    num_answered: int
    num_failures: int
    """Selected devices without a usable answer: timed out, or answered with an ``error``."""
    num_examples: int
    loss: float | None = None
    """The examples-weighted mean of the answers' losses."""
    accuracy: float | None = None
    accuracy_std: float | None = None
    """The spread across devices (unweighted), and its extremes:"""
    accuracy_min: float | None = None
    accuracy_max: float | None = None
    loss_std: float | None = None
    mse: float | None = None
    """A regression model's examples-weighted mean squared error, and its spread across devices."""
    mse_std: float | None = None
    num_on_training_data: int = 0
    """Answers computed on training examples (devices without a held-out split)."""
    duration_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class JobMetrics(Message):
    """The job's state, published on ``metrics/job``."""

    KIND: ClassVar[str] = "job"
    state: Literal["waiting", "running", "finished", "failed"]
    strategy: str
    server_round: int
    total_rounds: int
    version: int
    aggregator_session: str
    staleness_bound: int | None = 0
    c_min: int = 0
    eval_accuracy: float | None = None
    eval_loss: float | None = None
    reason: str = ""
    staleness: Mapping[str, int] = field(default_factory=dict)
    """Applied updates by staleness (model versions between an update's base and its
    application), in buckets ``"0"``, ``"1"``, ``"2-3"``, ``"4-7"``, ... (:func:`staleness_bucket`)."""
    current_round: int = 0
    """Synchronous rounds: the round in progress (0 between rounds and in SSP); ``server_round``
    is the last completed one."""


def task_encoding(config: Mapping[str, Scalar]) -> Literal["delta", "weights"]:
    """The update encoding a task's ``config`` asks for (:attr:`Task.encoding`)."""
    return "weights" if config.get("encoding") == "weights" else "delta"


def staleness_bucket(staleness: int) -> str:
    """The histogram bucket of a staleness: 0, 1, then powers of two (``"2-3"``, ``"4-7"``, ...)."""
    if staleness < 2:
        return str(max(0, staleness))
    low = 1 << (staleness.bit_length() - 1)
    return f"{low}-{2 * low - 1}"


@dataclass(frozen=True, slots=True)
class PredictRequest(Message):
    """A local application's inputs for the device's released model (``predict/request``)."""

    KIND: ClassVar[str] = "predict"
    request_id: str
    """The application's own id for this request; the answer repeats it."""
    tensors: Mapping[str, Tensor]
    """``x``: the inputs, one row per example (any shape the model's input reshapes from)."""

    def validate(self) -> None:
        check_field(0 < len(self.request_id) <= 128, self.KIND, "request_id", "must be 1-128 characters")
        check_field(set(self.tensors) == {"x"}, self.KIND, "tensors", "must be exactly one tensor, x")


@dataclass(frozen=True, slots=True)
class Prediction(Message):
    """The device's answer to a :class:`PredictRequest` (``predict/response``)."""

    KIND: ClassVar[str] = "prediction"
    device_id: str
    request_id: str
    model_version: int
    """The release that answered (-1 when none could)."""
    task: Literal["classification", "regression"] = "classification"
    classes: tuple[int, ...] = ()
    """A classifier's predicted class per row (the arg-max of ``y``)."""
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    """``y``: per row, the class probabilities (softmax) or a regression's predicted values."""
    error: str = ""
    """Why there is no prediction (no release stored yet, inputs of the wrong shape, busy)."""


CHANNEL_KINDS: dict[Channel, tuple[type[Message], ...]] = {
    Channel.STATUS: (Status,),
    Channel.AGGREGATOR_STATUS: (Status,),
    Channel.HEARTBEAT: (Heartbeat,),
    Channel.REGISTER: (Registration,),
    Channel.UPDATE: (Update, EvaluationResult),
    Channel.TASKS: (Task, RegistrationReply, Ack, EvaluateTask),
    Channel.MODEL: (GlobalModel,),
    Channel.CLOCK: (Clock,),
    Channel.METRICS: (RoundMetrics, FleetMetrics, JobMetrics, DeviceFacts, FederatedMetrics),
    Channel.RELEASE: (Release,),
    Channel.PREDICT_REQUEST: (PredictRequest,),
    Channel.PREDICT_RESPONSE: (Prediction,),
}


def encode_message(
    message: Message, job: str, channel: Channel, *, msg_id: str | None = None, timestamp: float | None = None
) -> bytes:
    """Encode ``message`` for ``channel`` (CBOR or JSON as the channel's spec says)."""
    if not isinstance(message, CHANNEL_KINDS[channel]):
        raise MessageError("unexpected_kind", f"{message.KIND!r} does not travel on {channel.value}", kind=message.KIND)
    extra: dict[str, Any] = {}
    if msg_id is not None:
        extra["msg_id"] = msg_id
    if timestamp is not None:
        extra["timestamp"] = timestamp
    envelope = Envelope(message.KIND, job, message.body(), message.tensors_or_empty(), **extra)
    return encode(envelope, format="json" if TOPIC_SPECS[channel].format == "json" else "cbor")


def decode_message(
    payload: bytes | bytearray | memoryview, channel: Channel, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[Envelope, Message]:
    """Decode and validate a payload received on ``channel``.

    Raises :class:`~unus_edge.errors.CodecError` or :class:`~unus_edge.errors.MessageError`
    (both :class:`~unus_edge.errors.ProtocolError`) and nothing else.
    """
    spec = TOPIC_SPECS[channel]
    envelope = decode(payload, limits=limits, format="json" if spec.format == "json" else "cbor")
    for cls in CHANNEL_KINDS[channel]:
        if envelope.kind == cls.KIND:
            return envelope, cls.from_envelope(envelope)
    raise MessageError("unexpected_kind", f"{envelope.kind!r} on channel {channel.value}", kind=envelope.kind)


def expect(message: Message, cls: type[M]) -> M:
    """Narrow a decoded message to ``cls`` or raise ``MessageError("unexpected_kind")``."""
    if not isinstance(message, cls):
        raise MessageError("unexpected_kind", f"expected {cls.KIND!r}", kind=message.KIND)
    return message
