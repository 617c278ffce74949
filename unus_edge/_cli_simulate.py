"""``unus-edge simulate`` and ``unus-edge demo``: a whole federation on this machine."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from unus_edge._cli_common import JOB_FLAGS, overrides, run_until_signal
from unus_edge.errors import UnusError

__all__ = ["cmd_simulate"]


def cmd_simulate(args: argparse.Namespace, *, demo: bool = False) -> int:
    # Many devices train in one process: one BLAS thread each, or they fight over the cores.
    # (Set before numpy is first imported; an explicit setting wins.)
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    from unus_edge._progress import RoundProgressBar, format_bytes
    from unus_edge.config import load_job_config
    from unus_edge.data import resolve_data_dir
    from unus_edge.profiles import assign_profiles, parse_profiles
    from unus_edge.simulation import SimulationOptions, simulate, stragglers

    dataset = args.dataset
    data_dir = resolve_data_dir(args.data_dir)
    if dataset == "mnist" and (data_dir is None or not any(data_dir.glob("train-images-idx3-ubyte*"))):
        if not demo:
            raise UnusError("no MNIST here: run `unus-edge data fetch mnist`, pass --data-dir or set UNUS_DATA_DIR, "
                            "or use --dataset digits (shipped with unus-edge) or synthetic")
        print("note: no MNIST found (run `unus-edge data fetch mnist`, or set UNUS_DATA_DIR to the folder of "
              "its IDX files): training on the 1,797 real 8x8 handwritten digits shipped with unus-edge instead "
              "(1,497 to train, 300 to test)", file=sys.stderr)
        dataset = "digits"
    flags = dict(JOB_FLAGS)
    flags.pop("data_dir")
    config_overrides = overrides(args, flags)
    if args.sync_bound is not None:
        config_overrides += ["job.mode=ssp", f"job.staleness_bound={args.sync_bound}"]
    config_overrides.append(f"evaluation.dataset={dataset}")
    if args.evaluation:
        config_overrides.append(f"evaluation.mode={args.evaluation}")
    if data_dir is not None:
        config_overrides.append(f"evaluation.data_dir={data_dir}")
    config = load_job_config(args.config, overrides=config_overrides)
    out_dir = Path(args.out) if args.out else Path("runs") / f"{config.job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = SimulationOptions(
        config=config, num_devices=args.devices, dataset=dataset, data_dir=str(data_dir or ""),
        scheme=args.scheme, alpha=args.alpha, train_examples=args.train_examples,
        embedded_broker=args.broker is None, processes=args.processes, device_hosts=args.device_hosts, out_dir=out_dir,
        slowdowns=stragglers(args.stragglers, args.devices, config.job.seed) if args.stragglers else {},
        compute_slots=args.compute_slots,
        profiles=(assign_profiles(parse_profiles(args.device_profiles), args.devices, config.job.seed)
                  if args.device_profiles else None),
    )
    layout = (f"in {args.device_hosts} host processes" if args.device_hosts else
              "processes" if args.processes else "tasks")
    print(f"simulating job {config.job.name}: {args.devices} devices ({layout}),"
          f" {config.model.source}, {config.strategy.resolved(config.job.mode)}, {dataset} {args.scheme}, "
          f"{config.job.rounds} rounds, "
          f"C={config.job.fraction} E={config.train.epochs} B={config.train.batch_size} "
          f"lr={config.train.learning_rate}", file=sys.stderr)
    bar = RoundProgressBar(sys.stderr, config.job.rounds)
    report = run_until_signal(lambda trigger: simulate(options, on_round=bar.round_done, on_progress=bar.update,
                                                        shutdown_trigger=trigger))
    result = report.result
    accuracy = f"{result.final_accuracy:.4f}" if result.final_accuracy is not None else "-"
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    print(f"\n{result.state}: {result.rounds} rounds in {result.wall_seconds:.1f} s; "
          f"final accuracy {accuracy}, loss {loss}")
    if result.federated:
        last = result.federated[-1]
        spread = (f" (devices {last.accuracy_min:.4f}-{last.accuracy_max:.4f})"
                  if last.accuracy_min is not None and last.accuracy_max is not None else "")
        federated_accuracy = f"{last.accuracy:.4f}" if last.accuracy is not None else "-"
        print(f"federated evaluation of round {last.server_round}: accuracy {federated_accuracy}{spread} on "
              f"{last.num_examples} held-out examples, {last.num_answered}/{last.num_selected} devices answered")
    print(f"bytes up {format_bytes(result.bytes_up)}, down {format_bytes(result.bytes_down)}"
          + (f"; rejected {result.rejected}" if result.rejected else ""))
    if report.paces:
        overruns, trainings = report.pace_overruns
        print(f"device profiles: {overruns} of {trainings} trainings took the host longer than their profile"
              + (" (the host, not the profiles, set those devices' speed)" if overruns else ""))
    if report.hosts:
        print(f"device hosts: {sum(h.registrations for h in report.hosts)} registrations for {args.devices} devices, "
              f"{sum(h.failed for h in report.hosts)} device(s) failed (logs: {out_dir / 'logs'})")
    print(f"metrics: {out_dir / 'metrics.csv'}, {out_dir / 'metrics.json'}; model: {out_dir / 'model.onnx'}")
    print(f"plot: {report.plot}" if report.plot else "plot: none (pip install 'unus-edge[plot]')")
    return 0 if result.state == "finished" else 1
