"""Many simulated devices in one process (``unus-edge simulate --device-hosts K``).

A fleet of thousands cannot be one OS process per device on a small machine, and in the
aggregator's process it would share the aggregator's interpreter, so a benchmark could not tell
the aggregator's cost from the devices'. A *device host* is the middle ground: one process runs
a slice of the fleet as asyncio tasks, each device with its own MQTT connection, exactly as
in-process simulated devices do. :func:`unus_edge.simulation.simulate` writes, per host:

* ``host_K.toml``: the device configuration every device of the host shares (``[device]`` and
  ``[broker]``; ``device.id`` and ``device.data`` are replaced per device);
* ``host_K.npz``: the host's examples, its devices' partitions one after another (a version-1
  partition file, :func:`unus_edge.data.save_partition`);
* ``host_K.json``: the layout: ``first_index`` (device ``i`` is ``device-{i:03d}``) and
  ``offsets`` (device ``j`` of the host owns examples ``offsets[j]:offsets[j+1]``).

and starts::

    python -m unus_edge._device_host --config host_K.toml --layout host_K.json --report report_K.json

The host exits when every device has stopped (the job's end, or SIGTERM/SIGINT), after writing
``--report``: ``devices``, ``failed`` (devices that raised), ``registrations`` (registrations
sent: more than one per device means one went unanswered and was retried) and ``updates``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from unus_edge._logging import configure_logging
from unus_edge.config import DeviceConfig, load_device_config
from unus_edge.data import Dataset, holdout_split, load_partition, save_partition
from unus_edge.device import Device, run_device
from unus_edge.errors import ConfigError, describe_error

__all__ = ["HostReport", "device_id", "main", "read_report", "run_host", "write_host"]

logger = logging.getLogger("unus_edge.simulation")


def device_id(index: int) -> str:
    """The id of the ``index``-th simulated device (as in-process simulated devices name it)."""
    return f"device-{index:03d}"


@dataclass(frozen=True)
class HostReport:
    devices: int
    failed: int = 0
    registrations: int = 0
    updates: int = 0


def write_host(folder: Path, host: int, first_index: int, shards: Sequence[Dataset], config: DeviceConfig) -> Path:
    """Write host ``host``'s configuration, examples and layout into ``folder``; return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"host_{host}.npz"
    offsets = np.concatenate([[0], np.cumsum([len(shard) for shard in shards])]).astype(np.int64)
    x = np.concatenate([shard.x for shard in shards])
    y = np.concatenate([shard.y for shard in shards])
    save_partition(data, Dataset(x, y, shards[0].num_classes), compress=False)
    device = replace(config.device, id=device_id(first_index), data=str(data))
    lines = ["[device]"] + [f"{key} = {json.dumps(value)}" for key, value in vars(device).items()]
    lines += ["", "[broker]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in vars(config.broker).items()
              if key != "password" and value not in ("", None)]
    path = folder / f"host_{host}.toml"
    path.write_text("\n".join(lines) + "\n")
    (folder / f"host_{host}.json").write_text(json.dumps({"first_index": first_index,
                                                          "offsets": offsets.tolist()}))
    return path


def read_layout(path: Path, num_examples: int) -> tuple[int, list[int]]:
    """``(first_index, offsets)`` from a layout file, checked against the host's examples."""
    try:
        layout = json.loads(path.read_text())
        first_index, offsets = int(layout["first_index"]), [int(o) for o in layout["offsets"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError("--layout", f"{path}: not a device host layout ({describe_error(error)})") from error
    if (first_index < 0 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_examples
            or any(b < a for a, b in itertools.pairwise(offsets))):
        raise ConfigError("--layout", f"{path}: offsets must rise from 0 to the {num_examples} examples of the host")
    return first_index, offsets


def read_report(path: Path, devices: int) -> HostReport:
    """A host's report; a host that wrote none (killed) reports all its devices failed."""
    try:
        fields = json.loads(path.read_text())
        return HostReport(int(fields["devices"]), int(fields["failed"]), int(fields["registrations"]),
                          int(fields["updates"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("%s: no device host report (%s)", path, describe_error(error))
        return HostReport(devices, failed=devices)


async def run_host(config: DeviceConfig, first_index: int, shards: Sequence[Dataset], *,
                   shutdown_trigger: asyncio.Event, compute_slots: int = 1) -> HostReport:
    """Run one device per shard until they all stop; a device that raises does not stop the others."""
    slots = asyncio.Semaphore(compute_slots) if compute_slots > 0 else None

    async def one(index: int, shard: Dataset) -> Device:
        settings = replace(config.device, id=device_id(index), data="memory")
        train, held_out = holdout_split(shard, settings.holdout, settings.model_seed)
        return await run_device(replace(config, device=settings), dataset=train, held_out=held_out,
                                exit_when_finished=True, shutdown_trigger=shutdown_trigger, compute_slots=slots)

    tasks = [asyncio.create_task(one(first_index + offset, shard), name=f"host-{device_id(first_index + offset)}")
             for offset, shard in enumerate(shards)]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    devices = [outcome for outcome in outcomes if isinstance(outcome, Device)]
    for offset, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            logger.error("device %s failed: %s", device_id(first_index + offset), describe_error(outcome))
    return HostReport(len(shards), len(shards) - len(devices), sum(d.registrations_sent for d in devices),
                      sum(d.updates_sent for d in devices))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unus_edge._device_host", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="the devices' shared configuration (TOML)")
    parser.add_argument("--layout", required=True, type=Path, help="first device index and example offsets (JSON)")
    parser.add_argument("--report", required=True, type=Path, help="where the host's counters go at exit (JSON)")
    parser.add_argument("--compute-slots", type=int, default=1, help="devices that may train at once (0: no limit)")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    args = parser.parse_args(argv)
    configure_logging(quiet=args.quiet)
    config = load_device_config(args.config)
    data = load_partition(config.device.data)
    first_index, offsets = read_layout(args.layout, len(data))
    shards = [Dataset(data.x[a:b], data.y[a:b], data.num_classes) for a, b in itertools.pairwise(offsets)]
    del data

    async def runner() -> HostReport:
        trigger = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, trigger.set)
        return await run_host(config, first_index, shards, shutdown_trigger=trigger,
                              compute_slots=args.compute_slots)

    report = asyncio.run(runner())
    args.report.write_text(json.dumps(vars(report)))
    logger.info("device host %s: %d device(s), %d failed, %d registration(s), %d update(s)", args.config.stem,
                report.devices, report.failed, report.registrations, report.updates)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
