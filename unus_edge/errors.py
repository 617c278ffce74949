"""The one exception hierarchy of unus-edge.

Every error the library raises on purpose derives from :class:`UnusError`. Errors carry
data (the device id, the topic, the key, a short machine-readable ``reason``) as attributes,
not only in their message, so that callers can log, count and react without parsing text::

    UnusError
    ├── ConfigError ............ a setting is missing or invalid        (key, reason)
    ├── ProtocolError .......... bytes or a message broke the protocol   (reason)
    │   ├── CodecError ......... malformed, oversized or unsafe payload  (reason)
    │   └── MessageError ....... well-formed CBOR, invalid message       (kind, field, reason)
    ├── TransportError ......... the MQTT connection failed              (host, port)
    │   ├── ConnectError ....... refused or unreachable at connect       (host, port, reason)
    │   ├── PublishError ....... a publish was refused or lost           (topic, reason)
    │   └── SubscribeError ..... a subscription was refused              (topic_filter, reason)
    ├── BrokerError ............ the embedded broker could not start     (host, port, reason)
    ├── ModelError ............. an ONNX model is unusable               (model, reason, detail)
    │   ├── UnsupportedOpError . the engine cannot run a node            (op_type, node_name)
    │   └── ParameterError ..... parameters disagree with the model      (name, reason)
    ├── DataError .............. a dataset or partition file is unusable (path, reason, detail)
    ├── StrategyError .......... a strategy cannot be loaded or failed   (strategy, reason)
    ├── RejectedError .......... the aggregator refused us               (device_id, reason)
    └── JobError ............... the federated job cannot go on          (job, reason)

``reason`` is a short, stable, snake_case code (``"too_large"``, ``"bad_dtype"``,
``"fingerprint_mismatch"``...) that metrics use as a label; ``str(error)`` is the human text.

Timeouts are not part of the tree: they are set at the call site with
``asyncio.timeout()`` and surface as the built-in :class:`TimeoutError`.
"""

from __future__ import annotations

import re

__all__ = [
    "BrokerError",
    "CodecError",
    "ConfigError",
    "ConnectError",
    "DataError",
    "JobError",
    "MessageError",
    "ModelError",
    "ParameterError",
    "ProtocolError",
    "PublishError",
    "RejectedError",
    "StrategyError",
    "SubscribeError",
    "TransportError",
    "UnsupportedOpError",
    "UnusError",
    "describe_error",
]


_CODE = re.compile(r"[a-z][a-z0-9_]*")


class UnusError(Exception):
    """Root of every error unus-edge raises on purpose."""


class ConfigError(UnusError):
    """A configuration value is missing or invalid.

    ``key`` is the dotted name of the setting (``"train.learning_rate"``), so the user
    knows exactly what to fix.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class ProtocolError(UnusError):
    """Bytes or a message received from the network broke the wire protocol."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CodecError(ProtocolError):
    """A payload is not valid unus-edge CBOR or exceeds a decoding limit.

    ``reason`` is one of the codes listed in :mod:`unus_edge.codec`.
    """


class MessageError(ProtocolError):
    """A payload decoded, but is not a valid message of its kind."""

    def __init__(self, reason: str, detail: str = "", *, kind: str = "", field: str = "") -> None:
        where = ".".join(part for part in (kind, field) if part)
        super().__init__(reason, f"{where}: {detail}" if where else detail)
        self.kind = kind
        self.field = field


class TransportError(UnusError):
    """The MQTT connection failed."""

    def __init__(self, message: str, *, host: str = "", port: int = 0) -> None:
        super().__init__(message)
        self.host = host
        self.port = port


class ConnectError(TransportError):
    """The broker refused the connection or could not be reached."""

    def __init__(self, reason: str, *, host: str, port: int, refused: bool = False, tls: bool = False) -> None:
        super().__init__(f"cannot connect to {'mqtts' if tls else 'mqtt'}://{host}:{port}: {reason}", host=host,
                         port=port)
        self.reason = reason
        self.refused = refused
        """The broker answered and said no (credentials, authorisation): retrying will not help."""


class PublishError(TransportError):
    """A publish was refused by the client library or lost with the connection."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"publish to {topic!r} failed: {reason}")
        self.topic = topic
        self.reason = reason


class SubscribeError(TransportError):
    """The broker refused a subscription (SUBACK 0x80) or the request failed."""

    def __init__(self, topic_filter: str, reason: str) -> None:
        super().__init__(f"subscribe to {topic_filter!r} failed: {reason}")
        self.topic_filter = topic_filter
        self.reason = reason


class BrokerError(UnusError):
    """The embedded broker could not start or stop."""

    def __init__(self, reason: str, *, host: str = "", port: int = 0) -> None:
        super().__init__(f"embedded broker on {host}:{port}: {reason}")
        self.reason = reason
        self.host = host
        self.port = port


class ModelError(UnusError):
    """An ONNX model cannot be read, run or trained.

    ``reason`` is a short code (``truncated``, ``bad_shape``...) and ``detail`` the explanation;
    ``ModelError("truncated: 12 bytes missing")`` is read as that code and that detail.
    """

    def __init__(self, reason: str, detail: str = "", *, model: str = "") -> None:
        code, separator, rest = reason.partition(": ")
        if not detail and separator and _CODE.fullmatch(code):
            reason, detail = code, rest
        text = f"{reason}: {detail}" if detail else reason
        super().__init__(f"model {model}: {text}" if model else text)
        self.reason = reason
        self.detail = detail
        self.model = model


class UnsupportedOpError(ModelError):
    """The NumPy engine has no implementation for a node of the graph."""

    def __init__(self, op_type: str, node_name: str, *, model: str = "", detail: str = "") -> None:
        text = f"unsupported op {op_type!r} at node {node_name!r}"
        super().__init__("unsupported_op", f"{text} ({detail})" if detail else text, model=model)
        self.op_type = op_type
        self.node_name = node_name


class ParameterError(ModelError):
    """A parameter dict disagrees with the model (missing/extra name, shape, dtype)."""

    def __init__(self, name: str, reason: str, *, model: str = "") -> None:
        code, separator, _ = reason.partition(": ")
        if not (separator and _CODE.fullmatch(code)):
            code = "bad_parameter"
        super().__init__(code, f"parameter {name!r}: {reason}", model=model)
        self.name = name


class DataError(UnusError):
    """A dataset, IDX file or partition file is missing or malformed."""

    def __init__(self, reason: str, detail: str = "", *, path: str = "") -> None:
        text = f"{reason}: {detail}" if detail else reason
        super().__init__(f"{path}: {text}" if path else text)
        self.reason = reason
        self.detail = detail
        self.path = path


class StrategyError(UnusError):
    """A strategy could not be loaded or configured, or failed to aggregate."""

    def __init__(self, reason: str, *, strategy: str = "") -> None:
        super().__init__(f"strategy {strategy}: {reason}" if strategy else reason)
        self.reason = reason
        self.strategy = strategy


class RejectedError(UnusError):
    """The aggregator refused this device (registration or an update)."""

    def __init__(self, device_id: str, reason: str, detail: str = "") -> None:
        text = f"device {device_id!r} rejected: {reason}"
        super().__init__(f"{text} ({detail})" if detail else text)
        self.device_id = device_id
        self.reason = reason
        self.detail = detail


class JobError(UnusError):
    """The federated job cannot continue (for example: quorum never reached)."""

    def __init__(self, job: str, reason: str) -> None:
        super().__init__(f"job {job!r}: {reason}")
        self.job = job
        self.reason = reason


def describe_error(error: BaseException) -> str:
    """``Type: message`` of an exception, or of the first leaf of an exception group, in at most
    200 characters: the ``reason`` a service's goodbye carries when something raised."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"[:200]
