"""The full chaos run: 20 device processes, 30 FedAvg rounds and an SSP run (s = 2), under faults.

Faults: connection cuts every ~2 s (some held half-open), 20% of the devices killed and
restarted, the aggregator killed twice, Mosquitto restarted once. Each run is compared with the
same job without faults (same seeds): the floor measured in the same run.

    python bench/chaos.py [--quick] [--data-dir DIR] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

from unus_edge.chaos import ChaosOptions, run_chaos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 devices, 6 rounds")
    parser.add_argument("--data-dir", default=os.environ.get("UNUS_DATA_DIR", ""))
    parser.add_argument("--out", help="folder for logs and reports (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dataset = "mnist" if args.data_dir and Path(args.data_dir).is_dir() else "synthetic"
    if dataset == "synthetic":
        print("note: no MNIST ($UNUS_DATA_DIR / --data-dir): using the synthetic dataset")
    out = Path(args.out or tempfile.mkdtemp(prefix="unus-chaos-"))
    devices, rounds = (5, 6) if args.quick else (20, 30)
    results = {}
    for mode in ("sync", "ssp"):
        for faults in (False, True):
            name = f"{mode}-{'chaos' if faults else 'reference'}"
            options = ChaosOptions(out_dir=out / name, devices=devices, rounds=rounds, mode=mode,  # type: ignore[arg-type]
                                   staleness_bound=2, dataset=dataset, data_dir=args.data_dir if dataset == "mnist"
                                   else "", eval_examples=10_000 if dataset == "mnist" else 2000, faults=faults,
                                   round_deadline=60.0, timeout=3600.0)
            report = asyncio.run(run_chaos(options))
            results[name] = report.as_dict()
            print(f"{name:16} {report.state:9} accuracy {report.final_accuracy} applied {report.applied} "
                  f"acked {report.acknowledged} duplicates {len(report.duplicates)} "
                  f"acked-not-applied {len(report.acknowledged_not_applied)} {report.wall_seconds:.0f} s "
                  f"faults {report.faults}", flush=True)
    for mode in ("sync", "ssp"):
        chaos, reference = results[f"{mode}-chaos"], results[f"{mode}-reference"]
        if chaos["final_accuracy"] is not None and reference["final_accuracy"] is not None:
            delta = 100 * (chaos["final_accuracy"] - reference["final_accuracy"])
            print(f"{mode}: accuracy under faults {delta:+.2f} points vs fault-free (goal: within 1 point); "
                  f"wall time x{chaos['wall_seconds'] / reference['wall_seconds']:.2f}")
    (out / "chaos-results.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results))
    print(f"logs and reports: {out}")


if __name__ == "__main__":
    main()
