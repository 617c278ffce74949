"""A simulated device process: the device daemon paced by a profile or a slowdown (``simulate --processes``).

Simulation code, kept out of the production daemon: ``unus-edge device`` never paces.
:func:`unus_edge.simulation.simulate` starts one of these per device when it is given device
profiles and ``processes``::

    python -m unus_edge._paced_device --config device.toml --profile JSON --cost C --report pace.json
    python -m unus_edge._paced_device --config device.toml --slowdown F --report pace.json

``--profile`` is a :class:`~unus_edge.profiles.DeviceProfile` as JSON (its fields), ``--cost``
the model's :func:`~unus_edge.profiles.workload_cost`; ``--slowdown`` makes a straggler
without a profile (:class:`~unus_edge.profiles.SlowdownPace`). When the device stops (the job's end, or
SIGTERM/SIGINT), the pace's counters are written to ``--report`` as JSON (``trainings``,
``overruns``, ``waited_seconds``), which ``simulate`` reads back into its report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

from unus_edge._logging import configure_logging
from unus_edge.config import load_device_config
from unus_edge.device import run_device
from unus_edge.errors import ConfigError
from unus_edge.profiles import DeviceProfile, ProfilePace, SlowdownPace

__all__ = ["main", "pace_report", "profile_from_json", "profile_to_json", "read_pace_report"]

logger = logging.getLogger("unus_edge.simulation")


def profile_to_json(profile: DeviceProfile) -> str:
    return json.dumps({"name": profile.name, "step_seconds": profile.step_seconds,
                       "bandwidth_mbps": profile.bandwidth_mbps, "latency_ms": profile.latency_ms})


def profile_from_json(text: str) -> DeviceProfile:
    try:
        fields = json.loads(text)
        return DeviceProfile(str(fields["name"]), float(fields["step_seconds"]),
                             None if fields.get("bandwidth_mbps") is None else float(fields["bandwidth_mbps"]),
                             float(fields.get("latency_ms", 0.0)))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError("--profile", f"not a device profile as JSON: {text!r}") from error


def pace_report(pace: ProfilePace) -> dict[str, float]:
    return {"trainings": pace.trainings, "overruns": pace.overruns, "waited_seconds": pace.waited_seconds}


def read_pace_report(path: Path, profile: DeviceProfile, cost: float) -> ProfilePace:
    """A device process's pace as it ended (a fresh one when the process wrote no report)."""
    pace = ProfilePace(profile, cost)
    if not path.exists():
        return pace
    try:
        counters = json.loads(path.read_text())
        pace.trainings = int(counters["trainings"])
        pace.overruns = int(counters["overruns"])
        pace.waited_seconds = float(counters["waited_seconds"])
    except (ValueError, KeyError, TypeError) as error:  # a process killed while it wrote it
        logger.warning("%s: unreadable pace report (%s); its trainings are not counted", path, error)
    return pace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unus_edge._paced_device", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    pacing = parser.add_mutually_exclusive_group(required=True)
    pacing.add_argument("--profile", help="a DeviceProfile as JSON")
    pacing.add_argument("--slowdown", type=float, help="a straggler without a profile: its slowdown factor")
    parser.add_argument("--cost", type=float, default=1.0, help="the model's workload cost (with --profile)")
    parser.add_argument("--report", required=True, type=Path, help="where the pace's counters go at exit")
    args = parser.parse_args(argv)
    configure_logging()
    pace: ProfilePace | SlowdownPace = (ProfilePace(profile_from_json(args.profile), args.cost) if args.profile
                                        else SlowdownPace(args.slowdown))
    config = load_device_config(args.config)

    async def runner() -> None:
        trigger = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, trigger.set)
        try:
            await run_device(config, shutdown_trigger=trigger, exit_when_finished=True, pace=pace)
        finally:
            if isinstance(pace, ProfilePace):
                args.report.write_text(json.dumps(pace_report(pace)))

    asyncio.run(runner())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
