"""``unus-edge monitor`` folds the fleet summary and the per-device facts into one view (issue 21)."""

from __future__ import annotations

from unus_edge import topics
from unus_edge.messages import DeviceFacts, FederatedMetrics, FleetMetrics, Heartbeat, encode_message
from unus_edge.monitor import MonitorState, render
from unus_edge.topics import Channel

JOB = "mon"


def test_the_fleet_is_counted_whole_and_the_table_is_bounded() -> None:
    state = MonitorState()
    summary = FleetMetrics(120, 118, {"Linux-aarch64": 100, "other": 20})
    assert state.apply(topics.metrics(JOB, "devices"), encode_message(summary, JOB, Channel.METRICS))
    for index in range(120):
        facts = DeviceFacts(f"pi-{index:03d}", index != 7, 1000.0, 3, 0.25, 600, 3, "Linux-aarch64")
        assert state.apply(topics.device_metrics(JOB, facts.device_id), encode_message(facts, JOB, Channel.METRICS))
    heartbeat = Heartbeat("pi-000", "s", 5, "training")
    assert state.apply(topics.device_topic(JOB, "pi-000", Channel.HEARTBEAT),
                       encode_message(heartbeat, JOB, Channel.HEARTBEAT))
    assert not state.apply(topics.device_metrics(JOB, "pi-x"), b"{not json")
    federated = FederatedMetrics(4, 4, 10, 9, 1, 900, 0.3, 0.91, 0.02, 0.85, 0.95)
    assert state.apply(topics.metrics(JOB, "evaluation"), encode_message(federated, JOB, Channel.METRICS))
    text = render(state, JOB, now=1010.0, max_rows=10)
    assert "federated evaluation, round 4: accuracy 0.9100 (devices 0.8500-0.9500), 9/10 devices, 1 failed" in text
    assert "fleet: 120 registered, 118 online  (Linux-aarch64: 100  other: 20)" in text
    assert "... and 110 more device(s)" in text
    rows = [line for line in text.splitlines() if line.startswith("pi-")]
    assert len(rows) == 10 and rows[0].split()[:3] == ["pi-000", "online", "training"]
    assert rows[7].split()[:2] == ["pi-007", "offline"]
    assert state.devices["pi-042"]["rounds_contributed"] == 3
