"""Run every benchmark (quick versions by default; ``--full`` for the figures in the docs).

    python bench/run_all.py [--full]

Each benchmark prints its figures and its ratio against a floor measured in the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = [
    ["bench_codec.py"],
    ["bench_transport.py"],
    ["bench_aggregation.py"],
    ["bench_train.py", "all"],
    ["bench_time_to_accuracy.py"],
    ["bench_round_overhead.py"],
    ["bench_memory.py"],
    ["bench_rounds_to_accuracy.py"],
    ["bench_device_footprint.py"],
    ["staleness.py"],
    ["chaos.py"],
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size runs (long)")
    args = parser.parse_args()
    failures = 0
    for command in BENCHMARKS:
        line = [sys.executable, str(HERE / command[0]), *command[1:], *([] if args.full else ["--quick"])]
        print(f"\n=== {' '.join(command)} ===", flush=True)
        started = time.perf_counter()
        status = subprocess.run(line, check=False).returncode
        print(f"--- {command[0]}: exit {status}, {time.perf_counter() - started:.0f} s", flush=True)
        failures += status != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
