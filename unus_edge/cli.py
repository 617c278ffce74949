"""The ``unus-edge`` command line.

Each command is a thin layer: it parses flags, configures logging, and runs a library entry
point under :func:`asyncio.run` with SIGINT/SIGTERM wired to the service's shutdown trigger.
Flags that set configuration keys win over ``--set section.key=value``, which wins over
``UNUS_*`` environment variables, which win over the ``--config`` file.

Exit status: 0 success (or stopped by SIGINT/SIGTERM), 1 the job failed, 2 a usage or
configuration error (one line naming the problem), 77 (EX_NOPERM) the broker refused the
credentials, 78 (EX_CONFIG) the aggregator refused this device. systemd should not restart on
77 or 78.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from unus_edge import __version__
from unus_edge._cli_common import JOB_FLAGS, overrides, run_until_signal
from unus_edge._cli_model import add_model_commands
from unus_edge._cli_simulate import cmd_simulate
from unus_edge._cli_watch import add_watch_commands
from unus_edge._logging import configure_logging
from unus_edge.errors import ConnectError, RejectedError, UnusError

if TYPE_CHECKING:
    from unus_edge.data import Dataset

__all__ = ["build_parser", "main"]

EXIT_REJECTED = 78
EXIT_NO_PERMISSION = 77


# ---------------------------------------------------------------------------- commands


def _cmd_broker(args: argparse.Namespace) -> int:
    from unus_edge.broker import load_users, run_broker

    users = load_users(args.password_file) if args.password_file else None
    run_until_signal(lambda trigger: run_broker(args.host, args.port, users=users, shutdown_trigger=trigger))
    return 0



def _cmd_aggregator(args: argparse.Namespace) -> int:
    from unus_edge._progress import RoundProgressBar
    from unus_edge.aggregator import run_aggregator
    from unus_edge.config import load_job_config

    config = load_job_config(args.config, overrides=overrides(args, JOB_FLAGS))
    bar = RoundProgressBar(sys.stderr, config.job.rounds)
    result = run_until_signal(lambda trigger: run_aggregator(
        config, shutdown_trigger=trigger, on_round=bar.round_done, resume=not args.no_resume))
    print(f"job {result.job}: {result.state} after {result.rounds} rounds"
          + (f", accuracy {result.final_accuracy:.4f}" if result.final_accuracy is not None else "")
          + (f" ({result.reason})" if result.reason else ""))
    return 0 if result.state in ("finished", "stopped") else 1  # stopped: by SIGTERM, as asked


def _cmd_device(args: argparse.Namespace) -> int:
    from unus_edge.config import load_device_config
    from unus_edge.device import run_device

    config = load_device_config(args.config, overrides=overrides(args, {"broker": "broker.url", "id": "device.id",
                                                                         "data": "device.data"}))
    run_until_signal(lambda trigger: run_device(config, shutdown_trigger=trigger,
                                                 exit_when_finished=args.exit_when_finished))
    return 0


def _cmd_models_build(args: argparse.Namespace) -> int:
    from unus_edge.zoo import build_zoo

    for path in build_zoo(Path(args.out), seed=args.seed):
        print(path)
    return 0


def _cmd_chaos(args: argparse.Namespace) -> int:
    import json

    from unus_edge.chaos import ChaosOptions, run_chaos

    options = ChaosOptions(
        out_dir=Path(args.out), devices=args.devices, rounds=args.rounds, mode="ssp" if args.sync_bound else "sync",
        staleness_bound=args.sync_bound or 0, dataset=args.dataset, data_dir=args.data_dir or "",
        train_examples=args.train_examples, faults=not args.no_faults, cut_interval=args.cut_interval,
        device_kill_fraction=args.kill_devices, aggregator_kills=args.kill_aggregator,
        broker_restarts=args.restart_broker, seed=args.seed,
    )
    report = asyncio.run(run_chaos(options))
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.passed else 1


def _cmd_provision(args: argparse.Namespace) -> int:
    from unus_edge.provision import run

    return run(args)


def _cmd_data_split(args: argparse.Namespace) -> int:
    from unus_edge.data import load_dataset, resolve_data_dir, split_to_directory

    dataset = load_dataset(args.dataset, "train", data_dir=resolve_data_dir(args.data_dir), seed=args.seed,
                           num_examples=args.train_examples or None)
    if args.format != "npz":
        return _split_as(dataset, args)

    def progress(written: int, total: int, path: Path) -> None:
        print(f"\r{written}/{total} {path}", end="\n" if written == total else "", file=sys.stderr, flush=True)

    paths = split_to_directory(dataset, Path(args.out), num_parts=args.devices, scheme=args.scheme, seed=args.seed,
                               alpha=args.alpha, overwrite=args.overwrite, progress=progress)
    print(f"wrote {len(paths)} partition files and manifest.json to {args.out}")
    return 0


def _split_as(dataset: Dataset, args: argparse.Namespace) -> int:
    """``data split --format csv|idx|images``: one device source per part, as a device reads it."""
    from unus_edge.data import Dataset, partition, write_source
    from unus_edge.data._split import source_manifest

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UnusError(f"{out} is not empty: pass --overwrite, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    parts = partition(dataset.y, args.devices, args.scheme, seed=args.seed, alpha=args.alpha)
    width = max(3, len(str(args.devices - 1)))
    written = []
    for index, indices in enumerate(parts):
        name = f"device_{index:0{width}d}" + (".csv" if args.format == "csv" else "")
        part = Dataset(dataset.x[indices], dataset.y[indices], dataset.num_classes)
        written.append((write_source(part, out / name, args.format), part))
        print(f"\r{index + 1}/{args.devices} {out / name}", end="\n" if index + 1 == args.devices else "",
              file=sys.stderr, flush=True)
    source_manifest(out, written, data_format=args.format, scheme=args.scheme, seed=args.seed, alpha=args.alpha,
                    whole=dataset)
    print(f"wrote {args.devices} {args.format} sources and manifest.json to {out} (device.data = one of them, "
          f"device.data_format = {args.format} or auto)")
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from unus_edge.data import fetch_dataset

    shown: dict[str, int] = {}

    def progress(name: str, done: int, total: int) -> None:
        step = done * 20 // total if total else done >> 22  # about 20 updates per file
        if shown.get(name) != step or done == total:
            shown[name] = step
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
            print(f"\r{name}: {size}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    folder = fetch_dataset(args.dataset, Path(args.dir).expanduser() if args.dir else None, base_url=args.url,
                           progress=progress)
    print(f"{args.dataset} is in {folder} (checked); use it with --data-dir {folder} or UNUS_DATA_DIR={folder}"
          + (" (MNIST in this folder is found without either)" if args.dataset == "mnist" and not args.dir else ""))
    return 0


# ---------------------------------------------------------------------------- parser


def _job_flags(parser: argparse.ArgumentParser, *, simulate: bool) -> None:
    parser.add_argument("--config", metavar="TOML", help="job configuration file")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    parser.add_argument("--broker", metavar="URL", help="broker URL, e.g. mqtt://gateway:1883"
                        + (" (default: an embedded amqtt broker)" if simulate else ""))
    parser.add_argument("--job", help="job name")
    parser.add_argument("--rounds", type=int, help="number of rounds")
    parser.add_argument("--model", help="zoo model (logreg, mnist_2nn, mnist_cnn) or ONNX path")
    parser.add_argument("--strategy", help="fedavg, fedsgd, fedprox, robust_fedavg, robust_fedprox, ssp, fedasync, "
                        "fedbuff, dssgd, dssgd-async, path/to/file.py:Class or package.module:Class "
                        "(docs/strategies.md)")
    parser.add_argument("--fraction", "-C", type=float, help="fraction of devices per round")
    parser.add_argument("--epochs", "-E", type=int, help="local epochs")
    parser.add_argument("--batch-size", "-B", type=int, help="local batch size")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--seed", type=int, help="job seed (selection, partitions, training)")
    parser.add_argument("--deadline", type=float, help="round deadline in seconds")
    parser.add_argument("--eval-examples", type=int, help="evaluate on the first N test examples (0: all)")
    parser.add_argument("--data-dir", help="MNIST folder (default: $UNUS_DATA_DIR)")
    parser.add_argument("--checkpoint-dir", help="checkpoint folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unus-edge", description="Federated learning for edge and IoT devices "
                                     "over MQTT.")
    parser.add_argument("--version", action="version", version=f"unus-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: MQTT packets)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run the embedded MQTT broker (amqtt)",
                                 description="Run the embedded amqtt broker until Ctrl-C / SIGTERM.")
    broker.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    broker.add_argument("--port", type=int, default=1883, help="TCP port (default: 1883; 0 picks a free one)")
    broker.add_argument("--password-file", metavar="FILE",
                        help="Mosquitto password file (e.g. from `unus-edge provision`): only its users may connect")
    broker.set_defaults(handler=_cmd_broker)

    aggregator = commands.add_parser("aggregator", help="run the aggregator of a job (gateway)",
                                     description="Run a federated job: registration, rounds, aggregation.")
    _job_flags(aggregator, simulate=False)
    aggregator.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    aggregator.set_defaults(handler=_cmd_aggregator)

    device = commands.add_parser("device", help="run the device daemon",
                                 description="Register with the aggregator and train on local data when asked.")
    device.add_argument("--config", metavar="TOML", help="device configuration file")
    device.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    device.add_argument("--broker", metavar="URL", help="broker URL")
    device.add_argument("--id", help="device id")
    device.add_argument("--data", help="partition file (.npz)")
    device.add_argument("--exit-when-finished", action="store_true", help="exit when the job ends")
    device.set_defaults(handler=_cmd_device)

    for name, is_demo in (("simulate", False), ("demo", True)):
        sim = commands.add_parser(name, help="run a whole federation on this machine" if not is_demo else
                                  "the README's demo: 10 devices train the 2NN on MNIST",
                                  description="Broker, aggregator and N devices on one machine.")
        _job_flags(sim, simulate=True)
        sim.add_argument("--devices", "-N", type=int, default=10, help="number of devices (default 10)")
        sim.add_argument("--dataset", choices=["mnist", "digits", "synthetic"], default="mnist",
                         help="mnist (MNIST-format IDX files in --data-dir), digits (1,797 real 8x8 digits shipped "
                         "with unus-edge) or synthetic (a stand-in whose accuracy means nothing)")
        sim.add_argument("--scheme", choices=["iid", "shards", "dirichlet"], default="iid", help="partition scheme")
        sim.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
        sim.add_argument("--train-examples", type=int, default=0, help="use the first N training examples (0: all)")
        sim.add_argument("--processes", action="store_true", help="devices as separate OS processes")
        sim.add_argument("--evaluation", choices=["central", "federated", "both"], help="where the model is "
                         "evaluated: on the test set at the gateway (central, the default), on the devices' "
                         "held-out tenth (federated), or both")
        sim.add_argument("--device-hosts", type=int, default=0, metavar="K", help="split the devices over K "
                         "processes of in-process devices (for fleets of thousands; the aggregator keeps its own)")
        sim.add_argument("--compute-slots", type=int, metavar="K", help="in-process devices: at most K train at "
                         "once (default: the usable cores; 0: no limit)")
        sim.add_argument("--sync-bound", metavar="S", help="SSP with staleness bound S (an integer, or inf for "
                         "fully asynchronous training); default: synchronous rounds")
        sim.add_argument("--stragglers", metavar="FRAC:FACTOR", help="make a seeded FRAC of the devices FACTOR "
                         "times slower, e.g. 0.2:5")
        sim.add_argument("--device-profiles", metavar="SPEC", help="device speeds by profile "
                         "(in-process or --processes devices), e.g. pi-zero-2:0.2,pi-4:0.6,pi-5:0.2 or "
                         "fast=0.005:0.8,slow=0.025:0.2 "
                         "(NAME=STEP_SECONDS[/MBPS[/LATENCY_MS]]:SHARE; docs/aggregator.md, 'Simulation')")
        sim.add_argument("--out", metavar="DIR", help="output folder (default: runs/<job>-<time>)")
        sim.set_defaults(handler=(lambda a: cmd_simulate(a, demo=True)) if is_demo else cmd_simulate)
        if is_demo:
            sim.set_defaults(job="demo", rounds=10, seed=0)

    add_model_commands(commands)

    add_watch_commands(commands)

    models = commands.add_parser("models", help="the model zoo").add_subparsers(dest="models_command",
                                                                                  required=True, metavar="ACTION")
    build = models.add_parser("build", help="write the zoo's ONNX files")
    build.add_argument("--out", default="models", metavar="DIR")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=_cmd_models_build)

    chaos = commands.add_parser("chaos", help="run a job under faults and audit it (needs mosquitto)",
                                description="Mosquitto, a fault proxy, an aggregator and N device processes; "
                                "connections cut at random, devices and the aggregator killed and restarted, "
                                "the broker restarted. Then every applied update is checked to be unique and "
                                "every acknowledged update to be applied.")
    chaos.add_argument("--out", required=True, metavar="DIR", help="an empty folder for logs and the report")
    chaos.add_argument("--devices", "-N", type=int, default=20)
    chaos.add_argument("--rounds", type=int, default=30)
    chaos.add_argument("--sync-bound", metavar="S", help="SSP with bound S instead of synchronous rounds")
    chaos.add_argument("--dataset", choices=["mnist", "synthetic"], default="synthetic")
    chaos.add_argument("--data-dir", help="MNIST folder (default: $UNUS_DATA_DIR)")
    chaos.add_argument("--train-examples", type=int, default=0)
    chaos.add_argument("--cut-interval", type=float, default=2.0, help="mean seconds between connection faults")
    chaos.add_argument("--kill-devices", type=float, default=0.2, help="fraction of devices killed and restarted")
    chaos.add_argument("--kill-aggregator", type=int, default=2, help="aggregator kills")
    chaos.add_argument("--restart-broker", type=int, default=1, help="broker restarts")
    chaos.add_argument("--seed", type=int, default=0)
    chaos.add_argument("--no-faults", action="store_true", help="the same run without faults (the reference)")
    chaos.set_defaults(handler=_cmd_chaos)

    from unus_edge.conformance import add_arguments as conformance_arguments
    from unus_edge.conformance import command as conformance_command

    conformance = commands.add_parser("conformance", help="check a device implementation against the protocol",
                                      description="Play the aggregator of a throw-away job over a real broker and "
                                      "drive a device through registration, a round, a duplicate, refusals, a new "
                                      "session, the SSP clock, the end of the job and its will (docs/protocol.md).")
    conformance_arguments(conformance)
    conformance.set_defaults(handler=conformance_command)

    from unus_edge.provision import add_arguments as provision_arguments

    provision = commands.add_parser("provision", help="certificates, credentials, ACL and device configs for a job",
                                    description="Generate what a fleet needs: a CA and server certificate (or use "
                                    "given ones), per-device Mosquitto credentials, ACL entries, one device.toml "
                                    "per device. Secrets are written with mode 0600 and never logged.")
    provision_arguments(provision)
    provision.set_defaults(handler=_cmd_provision)

    data = commands.add_parser("data", help="datasets and partitions").add_subparsers(dest="data_command",
                                                                                     required=True, metavar="ACTION")
    split = data.add_parser("split", help="write one .npz partition per device")
    split.add_argument("--dataset", choices=["mnist", "digits", "synthetic"], default="mnist")
    split.add_argument("--data-dir", help="MNIST folder (default: $UNUS_DATA_DIR)")
    split.add_argument("--devices", "-N", type=int, required=True)
    split.add_argument("--scheme", choices=["iid", "shards", "dirichlet"], default="iid")
    split.add_argument("--alpha", type=float, default=0.5)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--train-examples", type=int, default=0)
    split.add_argument("--out", required=True, metavar="DIR")
    split.add_argument("--overwrite", action="store_true", help="replace the files of a previous split")
    split.add_argument("--format", choices=["npz", "csv", "idx", "images"], default="npz",
                       help="what each device's source is (default npz; images need Pillow)")
    split.set_defaults(handler=_cmd_data_split)
    fetch = data.add_parser("fetch", help="download a dataset's canonical files, checked by SHA-256")
    fetch.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    fetch.add_argument("--dir", metavar="DIR", help="where to put them (default ~/.cache/unus-edge/<dataset>)")
    fetch.add_argument("--url", metavar="BASE", default="", help="a mirror's base URL instead of the canonical ones")
    fetch.set_defaults(handler=_cmd_data_fetch)
    return parser


def _first_unus_error(error: BaseException) -> UnusError | None:
    if isinstance(error, UnusError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_unus_error(inner)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The federation commands draw a progress bar: keep their log to warnings unless asked.
    quiet = args.quiet or (args.command in ("simulate", "demo") and not args.verbose)
    configure_logging(args.verbose, quiet=quiet)
    try:
        return int(args.handler(args))
    except (UnusError, BaseExceptionGroup) as error:
        found = _first_unus_error(error)
        if found is None:
            raise
        print(f"unus-edge {args.command}: error: {found}", file=sys.stderr)
        if isinstance(found, RejectedError):
            return EXIT_REJECTED
        if isinstance(found, ConnectError) and found.refused:
            return EXIT_NO_PERMISSION  # credentials or authorisation: a restart will not help
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
