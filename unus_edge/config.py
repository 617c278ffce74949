"""Job and device configuration: TOML files, validated at load, with overrides.

Precedence, lowest first: defaults < the TOML file < environment variables < command-line
``--set section.key=value`` flags (and the commands' own flags, which map to keys).

* Every key has an environment variable ``UNUS_<SECTION>_<KEY>`` (``UNUS_TRAIN_LEARNING_RATE``,
  ``UNUS_BROKER_URL``); ``UNUS_DATA_DIR`` also sets ``evaluation.data_dir``.
* Validation happens once, at load. An unknown key (a typo), a value of the wrong type or out
  of range raises :class:`~unus_edge.errors.ConfigError` naming the dotted key.
* ``[strategy]`` takes ``name`` plus any strategy parameters (they are passed to the strategy).
* Secrets (``broker.password``) are never shown in a ``repr``; prefer ``broker.password_file``.

This module declares the settings (frozen dataclasses, one per section) and checks their
ranges; reading TOML, the environment and flags, and coercing values by their annotations, is
the generic machinery of :mod:`unus_edge._settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from unus_edge._settings import Scalar, load_settings
from unus_edge.errors import ConfigError, ProtocolError
from unus_edge.topics import validate_name
from unus_edge.transport import ConnectOptions, TLSOptions, Will, options_from_url, redact_url

__all__ = [
    "BrokerSettings",
    "CheckpointSettings",
    "DeviceConfig",
    "DeviceSettings",
    "EvaluationSettings",
    "JobConfig",
    "JobSettings",
    "ModelSettings",
    "PredictClientSettings",
    "StrategySettings",
    "TrainSettings",
    "load_device_config",
    "load_job_config",
]

_ENV_ALIASES = {"UNUS_DATA_DIR": "evaluation.data_dir"}
"""Environment variables that set a key besides its own ``UNUS_<SECTION>_<KEY>``."""


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    check_hostname: bool = True
    client_id: str = ""
    keepalive: int = 30
    receive_queue_mb: int = 0
    """Bound of the MQTT receive queue in MB of payload (backpressure beyond it); 0: automatic."""

    def connect_options(self, *, client_id: str, clean_session: bool, will: Will | None = None,
                        queue_bytes: int = 0) -> ConnectOptions:
        """Transport options for this broker (reads ``password_file`` now, not at load).

        ``queue_bytes``: the receive queue's bound when ``receive_queue_mb`` is 0 (automatic);
        0 keeps the transport's default."""
        password = self.password
        if self.password_file:
            try:
                password = Path(self.password_file).read_text().strip()
            except OSError as error:
                raise ConfigError("broker.password_file",
                                  f"cannot read {self.password_file}: {error.strerror}") from error
        tls: TLSOptions | None = None
        secure = self.url.startswith(("mqtts://", "ssl://"))
        if not secure and (self.ca_file or self.cert_file):
            # Once this silently switched to TLS: the URL said one thing and the connection did another.
            given = "broker.ca_file" if self.ca_file else "broker.cert_file"
            raise ConfigError("broker.url", f"{redact_url(self.url)} is plain MQTT but {given} is set: use "
                              "mqtts://HOST:PORT for TLS, or leave the TLS files out")
        if secure:
            tls = TLSOptions(self.ca_file or None, self.cert_file or None, self.key_file or None, self.check_hostname)
        options = options_from_url(self.url, client_id=self.client_id or client_id, clean_session=clean_session,
                                   keepalive=self.keepalive, will=will)
        return replace(
            options,
            max_queued_bytes=(self.receive_queue_mb << 20) or queue_bytes or options.max_queued_bytes,
            username=self.username or options.username,
            password=password or options.password,
            tls=tls if tls is not None else options.tls,
        )


@dataclass(frozen=True)
class JobSettings:
    name: str = "unus"
    rounds: int = 10
    seed: int = 0
    fraction: float = 1.0
    """C: the fraction of online devices selected per round (at least one)."""
    min_devices: int = 1
    """Devices that must be online before a round starts."""
    round_deadline: float = 300.0
    """Seconds a round waits for updates before aggregating what arrived."""
    min_fraction: float = 0.0
    """Quorum: fraction of the selected devices that must answer for a round to count."""
    allow_empty_rounds: bool = False
    """Whether a round in which no device answered counts (the model stays as it was). By default
    it does not: the quorum is at least one update, whatever ``min_fraction`` says."""
    max_retries: int = 3
    """Rounds below quorum are retried with newly selected devices this many times."""
    heartbeat_timeout: float = 30.0
    """A device without a heartbeat for this long is offline, whatever the broker says."""
    fleet_interval: float = 1.0
    """Seconds between two publications of the fleet summary (``metrics/devices``) at most."""
    release: bool = True
    """Publish the trained model, retained on ``release``, when the job finishes (for the devices to use)."""
    release_every: int = 0
    """Also release after every N-th round (SSP: evaluation point) while the job runs (0: only at the end)."""
    wait_for_devices: float = 600.0
    """Seconds to wait for ``min_devices`` before the job fails."""
    max_update_norm: float = 0.0
    """Reject updates whose L2 norm exceeds this (0: no bound)."""
    weight_policy: Literal["cap", "refuse"] = "cap"
    """An update claiming more examples than its device registered with: ``cap`` its weight at the
    registered number, or ``refuse`` it (``weight_mismatch``)."""
    mode: Literal["sync", "ssp"] = "sync"
    """``sync``: rounds (FedAvg...). ``ssp``: Stale Synchronous Parallel, no rounds."""
    staleness_bound: int | str = 0
    """SSP bound s: a device may start update c_i only when c_i <= c_min + s. ``"inf"``: fully asynchronous."""
    max_staleness: int | str = "inf"
    """SSP: reject updates whose base is more than this many versions old."""
    max_updates: int = 0
    """SSP: stop after this many accepted updates (0: no limit; the job ends when c_min reaches rounds)."""
    time_budget: float = 0.0
    """Stop after this many seconds (0: no limit)."""

    @property
    def bound(self) -> int | None:
        """The SSP staleness bound s (``None`` is infinity)."""
        return _bound(self.staleness_bound)

    @property
    def staleness_limit(self) -> int | None:
        """``max_staleness`` as an integer (``None`` is infinity)."""
        return _bound(self.max_staleness)


@dataclass(frozen=True)
class ModelSettings:
    source: str = "mnist_2nn"
    """A zoo name (``logreg``, ``mnist_2nn``, ``mnist_cnn``) or a path to an ONNX file."""
    seed: int = 0
    """Initialisation seed for zoo models."""


@dataclass(frozen=True)
class StrategySettings:
    name: str = ""
    """``fedavg``, ``fedsgd``, ``ssp``, ``fedasync``, ``fedbuff``, ``path/to/file.py:Class`` or
    ``package.module:Class``. Empty: ``fedavg`` for synchronous jobs, ``ssp`` in SSP mode."""

    def resolved(self, mode: str) -> str:
        return self.name or ("ssp" if mode == "ssp" else "fedavg")
    options: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 10
    learning_rate: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: Literal["softmax_cross_entropy", "mse"] = "softmax_cross_entropy"
    """``mse`` for a regression model (the devices' data say ``device.task = "regression"``): it is
    trained and evaluated with the mean squared error, and evaluations report ``mse``, no accuracy."""


@dataclass(frozen=True)
class EvaluationSettings:
    dataset: str = "mnist"
    """``mnist`` (the IDX files in ``data_dir``: Fashion-MNIST's too), ``digits``, ``synthetic``,
    ``none``, or the path of a test set in a device source format: an ``.npz`` partition, a CSV
    file with a ``label`` column (a regression job's: its target columns, comma-separated in
    ``csv_label``), an IDX or image folder (:func:`~unus_edge.data.load_source`)."""
    csv_label: str = "label"
    data_dir: str = ""
    """Folder of the MNIST IDX files; empty means ``$UNUS_DATA_DIR``."""
    num_examples: int = 0
    """Evaluate on the first N test examples; 0 means all."""
    batch_size: int = 1000
    backend: Literal["auto", "onnxruntime", "numpy", "litert"] = "auto"
    every_updates: int = 0
    """SSP: evaluate after this many applied updates (0: as many as there are participants)."""
    mode: Literal["central", "federated", "both"] = "central"
    """``central``: on ``dataset`` at the gateway; ``federated``: on the devices' held-out examples
    (:mod:`unus_edge.aggregator._fedeval`); ``both``."""
    federated_every: int = 1
    """Federated evaluation after every N-th round (SSP: every N-th evaluation point)."""
    federated_fraction: float = 0.5
    """The fraction of the online devices asked (at least one)."""
    federated_timeout: float = 30.0
    """Seconds the answers are waited for; a device that has not answered by then is a failure."""


@dataclass(frozen=True)
class CheckpointSettings:
    dir: str = ""
    """Where the aggregator keeps its checkpoint; empty disables checkpoints."""


@dataclass(frozen=True)
class JobConfig:
    job: JobSettings = field(default_factory=JobSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)


@dataclass(frozen=True)
class DeviceSettings:
    id: str = ""
    job: str = "unus"
    data: str = ""
    """The device's data: a partition file (``.npz`` from ``unus-edge data split``), a CSV file, a
    folder of images (one subfolder per class) or of IDX files (:mod:`unus_edge.data._sources`)."""
    data_format: str = "auto"
    """``npz``, ``csv``, ``images`` or ``idx``; ``auto`` tells them apart by the path."""
    task: Literal["classification", "regression"] = "classification"
    """What the labels are: classes, or the targets of a regression (float; the job trains with
    ``train.loss = "mse"``)."""
    csv_label: str = "label"
    """A CSV source's label column (regression: the target columns, comma-separated)."""
    csv_features: str = ""
    """A CSV source's feature columns, comma-separated (empty: every column but the label)."""
    holdout: float = 0.0
    """A fraction of the examples kept aside for evaluation (seeded by ``model_seed``), never trained on."""
    release_dir: str = ""
    """Where the device keeps the trained model a finished job releases (empty: not kept)."""
    serve_predictions: bool = False
    """Answer predictions with the stored release on ``devices/{id}/predict/request`` (needs
    ``release_dir``): a local application sends inputs, the device answers on ``predict/response``."""
    predict_backend: Literal["auto", "onnxruntime", "numpy", "litert"] = "auto"
    """What runs the predictions: onnxruntime when installed (``auto``), the NumPy engine, or
    LiteRT (``litert``: the release written as ``.tflite``, :mod:`unus_edge.tflite`)."""
    predict_max_bytes: int = 4 << 20
    """The largest prediction request accepted (bytes); a larger one is answered with an error."""
    model: str = "mnist_2nn"
    """The model the device runs: a zoo name or an ONNX path (its fingerprint must match the job's)."""
    model_seed: int = 0
    heartbeat_interval: float = 5.0
    model_wait: float = 30.0
    """Seconds to wait for the model a task names before re-subscribing to the retained copy."""
    ack_timeout: float = 30.0
    """Seconds to wait for the aggregator's acknowledgement before re-publishing an update."""
    registration_retry: float = 15.0
    """Seconds to wait at least for an answer to a registration before registering again; each
    further wait doubles, with jitter, up to ``registration_retry_max`` (``device._register``)."""
    registration_retry_max: float = 240.0
    """The longest wait between two registrations of one aggregator session."""
    client_strategies: str = ""
    """Device halves this device may run besides the built-ins: comma-separated ``package.module:Class``,
    imported at start. A task only names one; it never makes the device import a module."""
    blas_threads: int = 1
    """Threads of the BLAS pool the training uses (0: leave OpenBLAS's own default, one per core).

    One by default: several threads gain at most 1.5x on an idle machine (the CNN at batch 50) and
    stall 30-40x when other work holds the cores (docs/engine.md, "Threads on a shared CPU")."""


@dataclass(frozen=True)
class PredictClientSettings:
    """The identity a local application (``unus-edge predict --mqtt``) asks the daemon with.

    Empty: the broker identity's. A broker that takes the username as the client id (the
    provisioned Mosquitto) holds one connection per identity, so the daemon and its
    applications need two: ``unus-edge provision`` writes ``app@<device>`` here."""

    username: str = ""
    password_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def broker(self, broker: BrokerSettings) -> BrokerSettings:
        """``broker`` with this identity instead of the daemon's, and never the daemon's client id."""
        if not self.username:
            return replace(broker, client_id="")
        return replace(broker, username=self.username, password="", password_file=self.password_file,
                       cert_file=self.cert_file, key_file=self.key_file, client_id="")


@dataclass(frozen=True)
class DeviceConfig:
    device: DeviceSettings = field(default_factory=DeviceSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    predict: PredictClientSettings = field(default_factory=PredictClientSettings)


# ------------------------------------------------------------------------------------------ loading


def load_job_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> JobConfig:
    """Load and validate a job configuration (see the module docstring for precedence)."""
    config = load_settings(JobConfig, path, environ, overrides, aliases=_ENV_ALIASES)
    validate_job_config(config)
    return config


def validate_job_config(config: JobConfig) -> None:
    job = config.job
    try:
        validate_name(job.name, "job name")
    except ProtocolError as error:
        raise ConfigError("job.name", str(error)) from error
    _check(job.rounds >= 1, "job.rounds", "must be at least 1")
    _check(job.release_every >= 0, "job.release_every", "must be 0 (at the end only) or a number of rounds")
    evaluation = config.evaluation
    _check(evaluation.federated_every >= 1, "evaluation.federated_every", "must be at least 1")
    _check(0 < evaluation.federated_fraction <= 1, "evaluation.federated_fraction", "must lie in (0, 1]")
    _check(evaluation.federated_timeout > 0, "evaluation.federated_timeout", "must be positive (seconds)")
    _check(0 < job.fraction <= 1, "job.fraction", "must lie in (0, 1]")
    _check(job.min_devices >= 1, "job.min_devices", "must be at least 1")
    _check(job.round_deadline > 0, "job.round_deadline", "must be positive (seconds)")
    _check(0 <= job.min_fraction <= 1, "job.min_fraction", "must lie in [0, 1]")
    _check(job.max_retries >= 0, "job.max_retries", "must be >= 0")
    _check(job.heartbeat_timeout > 0, "job.heartbeat_timeout", "must be positive (seconds)")
    _check(job.fleet_interval >= 0, "job.fleet_interval", "must be 0 or more (seconds)")
    _check(job.wait_for_devices > 0, "job.wait_for_devices", "must be positive (seconds)")
    _check(job.max_update_norm >= 0, "job.max_update_norm", "must be >= 0 (0: no bound)")
    for key, value in (("job.staleness_bound", job.staleness_bound), ("job.max_staleness", job.max_staleness)):
        valid = value in ("inf", "infinity") or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        _check(valid, key, f"must be a non-negative integer or \"inf\", got {value!r}")
    _check(job.max_updates >= 0, "job.max_updates", "must be >= 0 (0: no limit)")
    _check(job.time_budget >= 0, "job.time_budget", "must be >= 0 seconds (0: no limit)")
    train = config.train
    _check(train.epochs >= 1, "train.epochs", "must be at least 1")
    _check(train.batch_size >= 1, "train.batch_size", "must be at least 1")
    _check(train.learning_rate > 0, "train.learning_rate", "must be positive")
    _check(0 <= train.momentum < 1, "train.momentum", "must lie in [0, 1)")
    _check(train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    dataset = config.evaluation.dataset
    _check(dataset in ("mnist", "digits", "synthetic", "none") or Path(dataset).expanduser().exists(),
           "evaluation.dataset", f"must be one of mnist, digits, synthetic, none, or the path of a test set "
                                 f"(no such file or folder: {dataset!r})")
    _check(config.evaluation.num_examples >= 0, "evaluation.num_examples", "must be >= 0")
    _check(config.evaluation.batch_size >= 1, "evaluation.batch_size", "must be at least 1")
    _check(config.evaluation.every_updates >= 0, "evaluation.every_updates", "must be >= 0")
    _check_broker(config.broker)


def load_device_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> DeviceConfig:
    """Load and validate a device configuration."""
    config = load_settings(DeviceConfig, path, environ, overrides, aliases=_ENV_ALIASES)
    device = config.device
    _check(bool(device.id), "device.id", "is required")
    for key, value in (("device.id", device.id), ("device.job", device.job)):
        try:
            validate_name(value, key)
        except ProtocolError as error:
            raise ConfigError(key, str(error)) from error
    _check(bool(device.data), "device.data", "is required: the device's .npz partition file")
    _check(device.heartbeat_interval > 0, "device.heartbeat_interval", "must be positive (seconds)")
    _check(device.model_wait > 0, "device.model_wait", "must be positive (seconds)")
    _check(device.ack_timeout > 0, "device.ack_timeout", "must be positive (seconds)")
    _check(device.registration_retry > 0, "device.registration_retry", "must be positive (seconds)")
    _check(device.registration_retry_max >= device.registration_retry, "device.registration_retry_max",
           "must be at least device.registration_retry")
    _check(device.data_format in ("auto", "npz", "csv", "images", "idx"), "device.data_format",
           "must be auto, npz, csv, images or idx")
    _check(0 <= device.holdout < 1, "device.holdout", "must be a fraction in [0, 1)")
    _check(not device.serve_predictions or bool(device.release_dir), "device.serve_predictions",
           "needs device.release_dir: predictions are made with the release stored there")
    _check(device.predict_max_bytes >= 1024, "device.predict_max_bytes", "must be at least 1024 bytes")
    _check(device.blas_threads >= 0, "device.blas_threads", "must be 0 (OpenBLAS's default) or a thread count")
    _check_broker(config.broker)
    _check(not (config.predict.cert_file and not config.predict.key_file), "predict.key_file",
           "is required with predict.cert_file")
    return config


def _check_broker(broker: BrokerSettings) -> None:
    options_from_url(broker.url)  # raises ConfigError("broker.url", ...)
    _check(broker.keepalive >= 1, "broker.keepalive", "must be at least 1 second")
    _check(broker.receive_queue_mb >= 0, "broker.receive_queue_mb", "must be >= 0 (0: automatic)")
    _check(not (broker.cert_file and not broker.key_file), "broker.key_file", "is required with broker.cert_file")


def _bound(value: int | str) -> int | None:
    if isinstance(value, str):
        return None  # "inf", checked at load
    return value


def _check(condition: bool, key: str, reason: str) -> None:
    if not condition:
        raise ConfigError(key, reason)
