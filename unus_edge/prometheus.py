"""Prometheus metrics of a job, from its MQTT topics (``unus-edge monitor --prometheus``; issue 19).

A :class:`JobCollector` turns a :class:`~unus_edge.monitor.MonitorState` (what the monitor reads
from the job's topics) into Prometheus metric families at each scrape, with the conventional
names: ``_total`` for counters, ``_seconds`` and ``_bytes`` units, and ``job_name`` (not ``job``,
which Prometheus itself sets to the scrape job) on every sample. :func:`serve` exposes them over
HTTP with ``prometheus-client`` (``pip install 'unus-edge[prometheus]'``).

Scrapes run in prometheus-client's server thread while the monitor's event loop updates the
state: the collector reads the state's fields once (references to immutable messages) and
copies the device table (``dict.copy`` holds the GIL), so a scrape never sees a half-applied
message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from unus_edge.errors import ConfigError
from unus_edge.monitor import MonitorState

__all__ = ["JobCollector", "serve"]


def _families() -> Any:
    try:
        from prometheus_client import core
    except ImportError as error:
        raise ConfigError("--prometheus", "needs prometheus-client: pip install 'unus-edge[prometheus]'") from error
    return core


class JobCollector:
    """The metric families of one job, computed from ``state`` at each scrape."""

    def __init__(self, state: MonitorState, job: str) -> None:
        self.state, self.job = state, job
        self._core = _families()

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only: the device labels are not known in advance

    def collect(self) -> Iterator[Any]:
        core, job = self._core, self.job
        state = self.state
        metrics, last_round, fleet = state.job, state.last_round, state.fleet
        federated, aggregator = state.federated, state.aggregator
        devices = {device_id: dict(entry) for device_id, entry in state.devices.copy().items()}

        def gauge(name: str, documentation: str, value: float | None, **labels: str) -> Any:
            family = core.GaugeMetricFamily(name, documentation, labels=["job_name", *labels])
            if value is not None:
                family.add_metric([job, *labels.values()], float(value))
            return family

        yield gauge("unus_aggregator_up", "1 while the aggregator's retained status is online",
                    None if aggregator is None else float(aggregator.state == "online"))
        if metrics is not None:
            info = core.InfoMetricFamily("unus_job", "the job's state and strategy", labels=["job_name"])
            info.add_metric([job], {"state": metrics.state, "strategy": metrics.strategy})
            yield info
            yield gauge("unus_round", "rounds completed (SSP: c_min)", metrics.server_round)
            yield gauge("unus_rounds_planned", "the job's number of rounds", metrics.total_rounds)
            yield gauge("unus_model_version", "the global model's version", metrics.version)
            staleness = core.CounterMetricFamily("unus_staleness_updates", "updates applied, by staleness bucket",
                                                 labels=["job_name", "staleness"])
            for bucket, count in sorted(metrics.staleness.items()):
                staleness.add_metric([job, bucket], count)
            yield staleness
        accuracy = core.GaugeMetricFamily("unus_accuracy", "the last evaluation's accuracy",
                                          labels=["job_name", "evaluation"])
        loss = core.GaugeMetricFamily("unus_loss", "the last evaluation's loss", labels=["job_name", "evaluation"])
        for kind, value_accuracy, value_loss in (
                ("central", metrics.eval_accuracy if metrics else None, metrics.eval_loss if metrics else None),
                ("federated", federated.accuracy if federated else None, federated.loss if federated else None)):
            if value_accuracy is not None:
                accuracy.add_metric([job, kind], value_accuracy)
            if value_loss is not None:
                loss.add_metric([job, kind], value_loss)
        yield accuracy
        yield loss
        if last_round is not None:
            transferred = core.CounterMetricFamily("unus_bytes", "payload bytes of updates (up) and of models "
                                                   "and tasks (down)", labels=["job_name", "direction"])
            transferred.add_metric([job, "up"], last_round.bytes_up)
            transferred.add_metric([job, "down"], last_round.bytes_down)
            yield transferred
            rejected = core.CounterMetricFamily("unus_rejected", "messages dropped or refused, by reason code",
                                                labels=["job_name", "reason"])
            for reason, count in sorted(last_round.rejected.items()):
                rejected.add_metric([job, reason], count)
            yield rejected
            yield gauge("unus_round_duration_seconds", "the last round's duration", last_round.duration_seconds)
            yield gauge("unus_round_updates", "the last round's updates", last_round.num_updates)
            yield gauge("unus_round_selected", "the devices the last round selected", last_round.num_selected)
        if fleet is not None:
            yield gauge("unus_devices_registered", "devices registered (the aggregator's count)", fleet.registered)
            yield gauge("unus_devices_online", "devices online (the aggregator's count)", fleet.online)
        online = core.GaugeMetricFamily("unus_device_online", "1 while the device's status is online",
                                        labels=["job_name", "device"])
        seen = core.GaugeMetricFamily("unus_device_last_seen_timestamp_seconds", "when the device was last heard of",
                                      labels=["job_name", "device"])
        rounds = core.CounterMetricFamily("unus_device_rounds_contributed", "rounds the device's update counted in",
                                          labels=["job_name", "device"])
        for device_id, entry in sorted(devices.items()):
            if entry.get("online") is not None:
                online.add_metric([job, device_id], float(bool(entry["online"])))
            if isinstance(entry.get("last_seen"), int | float):
                seen.add_metric([job, device_id], float(entry["last_seen"]))
            rounds.add_metric([job, device_id], float(entry.get("rounds_contributed", 0)))
        yield online
        yield seen
        yield rounds


def serve(state: MonitorState, job: str, address: str) -> Any:
    """Expose ``state``'s metrics on ``http://address/metrics`` (``HOST:PORT``); returns the server."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit():
        raise ConfigError("--prometheus", f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:9108)")
    _families()
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(state, job))
    try:
        server, _ = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    except OSError as error:
        raise ConfigError("--prometheus", f"cannot listen on {address}: {error.strerror}") from error
    return server
