"""The Prometheus collector over what the monitor reads (issue 19), parsed with Prometheus's text parser."""

from __future__ import annotations

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from unus_edge import topics  # noqa: E402
from unus_edge.messages import (  # noqa: E402
    DeviceFacts,
    FederatedMetrics,
    FleetMetrics,
    JobMetrics,
    RoundMetrics,
    Status,
    encode_message,
)
from unus_edge.monitor import MonitorState  # noqa: E402
from unus_edge.prometheus import JobCollector  # noqa: E402
from unus_edge.topics import Channel  # noqa: E402

JOB = "prom"


def scrape(state: MonitorState) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(state, JOB))
    text = prometheus_client.generate_latest(registry).decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def feed(state: MonitorState, topic: str, channel: Channel, message: object) -> None:
    assert state.apply(topic, encode_message(message, JOB, channel))  # type: ignore[arg-type]


def test_a_job_in_progress_scrapes_with_the_conventional_names() -> None:
    state = MonitorState()
    feed(state, topics.aggregator_status(JOB), Channel.AGGREGATOR_STATUS,
         Status("aggregator", "online", "s1", role="aggregator"))
    feed(state, topics.metrics(JOB, "job"), Channel.METRICS,
         JobMetrics("running", "fedavg", 3, 10, 3, "s1", eval_accuracy=0.91, eval_loss=0.3, staleness={"0": 9}))
    feed(state, topics.metrics(JOB, "round"), Channel.METRICS,
         RoundMetrics(3, 3, 3, 3, 0, 900, 1.5, bytes_up=3000, bytes_down=6000, rejected={"stale": 2}))
    feed(state, topics.metrics(JOB, "devices"), Channel.METRICS, FleetMetrics(3, 2))
    feed(state, topics.metrics(JOB, "evaluation"), Channel.METRICS,
         FederatedMetrics(3, 3, 2, 2, 0, 200, loss=0.4, accuracy=0.88))
    for index, online in enumerate((True, True, False)):
        feed(state, topics.device_metrics(JOB, f"pi-{index}"), Channel.METRICS,
             DeviceFacts(f"pi-{index}", online, 1000.0 + index, rounds_contributed=3 - index))
        feed(state, topics.device_topic(JOB, f"pi-{index}", Channel.STATUS), Channel.STATUS,
             Status(f"pi-{index}", "online" if online else "offline", "d"))
    samples = scrape(state)

    def value(name: str, **labels: str) -> float:
        matches = [v for found, v in samples[name] if found == {"job_name": JOB, **labels}]
        assert len(matches) == 1, (name, labels, samples.get(name))
        return matches[0]

    assert value("unus_aggregator_up") == 1
    assert value("unus_job_info", state="running", strategy="fedavg") == 1
    assert (value("unus_round"), value("unus_rounds_planned"), value("unus_model_version")) == (3, 10, 3)
    assert value("unus_accuracy", evaluation="central") == pytest.approx(0.91)
    assert value("unus_accuracy", evaluation="federated") == pytest.approx(0.88)
    assert value("unus_loss", evaluation="federated") == pytest.approx(0.4)
    assert value("unus_bytes_total", direction="up") == 3000 and value("unus_bytes_total", direction="down") == 6000
    assert value("unus_rejected_total", reason="stale") == 2
    assert value("unus_staleness_updates_total", staleness="0") == 9
    assert (value("unus_devices_registered"), value("unus_devices_online")) == (3, 2)
    assert [value("unus_device_online", device=f"pi-{i}") for i in range(3)] == [1, 1, 0]
    assert value("unus_device_rounds_contributed_total", device="pi-2") == 1
    assert value("unus_device_last_seen_timestamp_seconds", device="pi-1") == 1001.0


def test_nothing_known_yet_scrapes_without_samples_rather_than_zeros() -> None:
    samples = scrape(MonitorState())
    assert "unus_round" not in samples and "unus_aggregator_up" not in samples  # unknown, not 0


def test_the_grafana_dashboard_asks_only_for_metrics_the_collector_exports() -> None:
    import json
    import re

    from tests.brokers import REPO

    dashboard = json.loads((REPO / "deploy" / "grafana" / "unus-edge-job.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    asked = {name for expr in expressions for name in re.findall(r"\b(unus_[a-z_]+)", expr)}
    state = MonitorState()  # every family the collector can emit, once the state is full
    feed(state, topics.aggregator_status(JOB), Channel.AGGREGATOR_STATUS,
         Status("aggregator", "online", "s1", role="aggregator"))
    feed(state, topics.metrics(JOB, "job"), Channel.METRICS,
         JobMetrics("running", "fedavg", 1, 2, 1, "s1", eval_accuracy=0.5, eval_loss=1.0, staleness={"0": 1}))
    feed(state, topics.metrics(JOB, "round"), Channel.METRICS, RoundMetrics(1, 1, 1, 1, 0, 10, 0.1, rejected={"x": 1}))
    feed(state, topics.metrics(JOB, "devices"), Channel.METRICS, FleetMetrics(1, 1))
    feed(state, topics.device_metrics(JOB, "pi"), Channel.METRICS, DeviceFacts("pi", True, 1.0))
    exported = set(scrape(state))
    assert asked and asked <= exported, asked - exported
