"""Device profiles: parsing, assignment, and the pace's waits on a fake clock (no timing assertions)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from unus_edge._paced_device import pace_report, profile_from_json, profile_to_json, read_pace_report
from unus_edge.errors import ConfigError
from unus_edge.profiles import (
    PROFILES,
    DeviceProfile,
    ProfilePace,
    SlowdownPace,
    assign_profiles,
    parse_profiles,
    workload_cost,
)


class FakeClock:
    """Time that moves only when the code under test sleeps, or the test says so."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_pace_waits_out_exactly_what_the_profile_asks_beyond_the_real_computation() -> None:
    clock = FakeClock()
    pace = ProfilePace(DeviceProfile("slow", step_seconds=0.05), cost=2.0, clock=clock, sleep=clock.sleep)
    started = pace.now()
    clock.now += 1.5  # the real training took 1.5 s
    asyncio.run(pace.training(started, steps=30))  # the profile: 30 x 0.05 x 2 = 3 s
    assert clock.sleeps == [pytest.approx(1.5)]
    assert clock.now == pytest.approx(started + 3.0)
    assert (pace.trainings, pace.overruns) == (1, 0)


def test_a_host_slower_than_the_profile_is_an_overrun_and_no_wait() -> None:
    clock = FakeClock()
    pace = ProfilePace(DeviceProfile("fast", step_seconds=0.001), clock=clock, sleep=clock.sleep)
    started = pace.now()
    clock.now += 2.0  # the host needed 2 s for what the profile says takes 0.1 s
    asyncio.run(pace.training(started, steps=100))
    assert clock.sleeps == []
    assert (pace.trainings, pace.overruns) == (1, 1)


def test_a_5x_slower_profile_is_5x_slower_whatever_the_host_took() -> None:
    base = PROFILES["pi-4"]
    for host_seconds in (0.0, 0.1, 0.5):  # an idle and a loaded host, both faster than the profiles
        ends = []
        for profile in (base, base.scaled(5)):
            clock = FakeClock()
            pace = ProfilePace(profile, clock=clock, sleep=clock.sleep)
            started = pace.now()
            clock.now += host_seconds
            asyncio.run(pace.training(started, steps=60))
            ends.append(clock.now - started)
        assert ends[1] == pytest.approx(5 * ends[0])


def test_a_transfer_takes_latency_plus_bytes_over_bandwidth() -> None:
    clock = FakeClock()
    pace = ProfilePace(DeviceProfile("link", 0.0, bandwidth_mbps=8.0, latency_ms=20.0), clock=clock,
                       sleep=clock.sleep)
    asyncio.run(pace.transfer(1_000_000))  # 8 Mbit over 8 Mbit/s = 1 s, + 20 ms
    assert clock.sleeps == [pytest.approx(1.02)]
    unlimited = ProfilePace(DeviceProfile("host", 0.0), clock=clock, sleep=clock.sleep)
    asyncio.run(unlimited.transfer(10**9))
    assert clock.sleeps == [pytest.approx(1.02)]  # no link given: no wait


def test_profiles_parse_built_in_and_custom() -> None:
    mix = parse_profiles("pi-zero-2:0.2, pi-4:0.6, edge=0.02/50/10:0.2")
    assert [(p.name, share) for p, share in mix] == [("pi-zero-2", 0.2), ("pi-4", 0.6), ("edge", 0.2)]
    assert mix[2][0] == DeviceProfile("edge", 0.02, 50.0, 10.0)
    assert parse_profiles("x=0.5:1")[0][0] == DeviceProfile("x", 0.5)


@pytest.mark.parametrize("spec", ["", "pi-9:1", "pi-4:0.5", "pi-4:zero", "x=:1", "x=1/2/3/4:1", "x=-1:1",
                                  "x=0.1/0:1", "pi-4", ":1", "x=0.1:-1"])
def test_bad_profiles_are_refused_with_the_flag_named(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_profiles(spec)
    assert caught.value.key == "--device-profiles"


def test_each_profile_gets_its_share_of_the_fleet() -> None:
    mix = parse_profiles("pi-zero-2:0.2,pi-4:0.6,pi-5:0.2")
    for devices in (1, 7, 10, 21, 100):
        profiles = assign_profiles(mix, devices, seed=3)
        counts = Counter(p.name for p in profiles)
        assert len(profiles) == devices
        for profile, share in mix:
            assert abs(counts[profile.name] - share * devices) < 1
    assert assign_profiles(mix, 10, seed=3) == assign_profiles(mix, 10, seed=3)
    assert assign_profiles(mix, 10, seed=3) != assign_profiles(mix, 10, seed=4)


def test_a_bigger_model_costs_more_per_step() -> None:
    assert workload_cost(199_210, 10) == 1.0
    assert workload_cost(199_210, 50) == 5.0
    assert workload_cost(7_850, 10) == pytest.approx(0.0394, abs=1e-4)


class RecordingPace:
    """A pace that records what the device asked of it, on a fake clock."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.trainings: list[tuple[float, int]] = []
        self.transfers: list[int] = []

    def now(self) -> float:
        return self.clock()

    async def training(self, started: float, steps: int, cpu_seconds: float = 0.0) -> None:
        self.trainings.append((started, steps))

    async def transfer(self, num_bytes: int) -> None:
        self.transfers.append(num_bytes)


def test_a_device_asks_its_pace_after_every_training_download_and_before_every_upload() -> None:
    from tests.unit.test_model_delivery import job
    from tests.unit.test_service_memory import run
    from unus_edge.device import _daemon

    paces: list[RecordingPace] = []
    original = _daemon.Device.__init__

    def with_pace(self: _daemon.Device, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        paces.append(RecordingPace())
        self.pace = paces[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_daemon.Device, "__init__", with_pace)
        _, devices, _ = run(lambda: job(2, job__rounds=2))
    for device, pace in zip(devices, paces, strict=True):
        assert len(pace.trainings) == device.updates_sent == 2
        assert all(steps > 0 for _, steps in pace.trainings)
        downloads, uploads = pace.transfers[0::2], pace.transfers[1::2]  # fetch, then upload, per round
        assert sum(downloads) == device.model_bytes and all(size > 0 for size in uploads)


def test_simulate_refuses_a_profile_count_that_is_not_the_fleet() -> None:
    from tests.unit.test_service_memory import config
    from unus_edge.simulation import SimulationOptions, simulate

    options = SimulationOptions(config(), num_devices=3, dataset="synthetic", profiles=[PROFILES["pi-4"]] * 2)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(simulate(options))
    assert "2 profiles for 3" in str(caught.value)


@pytest.mark.parametrize("profile", [PROFILES["pi-zero-2"], DeviceProfile("bare", 0.002)])
def test_a_profile_crosses_to_a_device_process_unchanged(profile: DeviceProfile) -> None:
    assert profile_from_json(profile_to_json(profile)) == profile


def test_a_device_process_pace_report_reads_back(tmp_path: Path) -> None:
    pace = ProfilePace(PROFILES["pi-4"], 0.5)
    pace.trainings, pace.overruns, pace.waited_seconds = 7, 2, 1.25
    (tmp_path / "pace.json").write_text(json.dumps(pace_report(pace)))
    read = read_pace_report(tmp_path / "pace.json", pace.profile, pace.cost)
    assert (read.trainings, read.overruns, read.waited_seconds, read.cost) == (7, 2, 1.25, 0.5)
    missing = read_pace_report(tmp_path / "absent.json", pace.profile, pace.cost)  # a process that died
    assert (missing.trainings, missing.overruns) == (0, 0)


@pytest.mark.parametrize("text", ["{}", "not json", '{"name": "x", "step_seconds": -1}'])
def test_a_bad_profile_for_a_device_process_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        profile_from_json(text)


def test_a_straggler_without_a_profile_waits_out_its_slowdown_in_cpu_time() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def scenario() -> None:
        await SlowdownPace(5.0, sleep=sleep).training(0.0, 300, cpu_seconds=0.25)
        await SlowdownPace(1.0, sleep=sleep).training(0.0, 300, cpu_seconds=0.25)  # not a straggler
        await SlowdownPace(5.0, sleep=sleep).transfer(1 << 20)  # no link model

    asyncio.run(scenario())
    assert waits == [1.0]  # (5 - 1) x 0.25 s of the training's own CPU time
    with pytest.raises(ConfigError):
        SlowdownPace(0.5)


def test_a_device_process_is_the_plain_daemon_unless_it_is_paced(tmp_path: Path) -> None:
    from unus_edge.simulation import _device_command

    config = tmp_path / "device_000.toml"
    plain = _device_command(config, 0, tmp_path, [], {})
    assert plain[1:5] == ["-m", "unus_edge.cli", "device", "--config"]
    straggler = _device_command(config, 1, tmp_path, [], {1: 5.0})
    assert straggler[1:3] == ["-m", "unus_edge._paced_device"] and straggler[5:7] == ["--slowdown", "5.0"]
    profiled = _device_command(config, 0, tmp_path, [ProfilePace(PROFILES["pi-4"], 2.0)], {})
    assert profiled[5] == "--profile" and profile_from_json(profiled[6]) == PROFILES["pi-4"]
    assert profiled[7:9] == ["--cost", "2.0"]


def test_an_unreadable_pace_report_counts_nothing_instead_of_failing_the_run(tmp_path: Path) -> None:
    (tmp_path / "torn.json").write_text('{"trainings": 3, "overr')
    pace = read_pace_report(tmp_path / "torn.json", PROFILES["pi-4"], 1.0)
    assert (pace.trainings, pace.overruns) == (0, 0)
