"""Helpers shared by the benchmarks: brokers on loopback, the data folder, output.

Output convention: human-readable figures go to stdout; with ``--json`` they go to stderr
instead and stdout carries exactly one JSON line of figures (``emit``).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_JSON_MODE = False


def add_common_flags(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run (well under two minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON line of figures on stdout")
    if data:
        parser.add_argument("--data-dir", help="MNIST folder (default: $UNUS_DATA_DIR)")
        parser.add_argument("--dataset", choices=["mnist", "synthetic"], default="mnist",
                            help="mnist (falls back to synthetic, with a message, when absent) or synthetic")


def setup_output(args: argparse.Namespace) -> None:
    global _JSON_MODE
    _JSON_MODE = bool(args.json)


def say(*parts: object) -> None:
    """A human-readable line: stdout, or stderr in --json mode."""
    print(*parts, file=sys.stderr if _JSON_MODE else sys.stdout, flush=True)


def emit(figures: dict[str, Any]) -> None:
    if _JSON_MODE:
        print(json.dumps(figures, sort_keys=True, default=_plain), flush=True)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def seeded_subset(device_ids: Sequence[str], fraction: float, seed: int, salt: int) -> set[str]:
    """A seeded ``round(fraction * K)`` of the devices (at least one when fraction > 0), by a keyed hash of the id."""
    if fraction <= 0 or not device_ids:
        return set()
    count = min(len(device_ids), max(1, round(fraction * len(device_ids))))
    keyed = sorted(device_ids, key=lambda d: (int(np.random.SeedSequence([seed, salt, zlib.crc32(d.encode())])
                                                  .generate_state(1)[0]), d))
    return set(keyed[:count])


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None (said once) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("NOTE: matplotlib is not installed: no plot (pip install 'unus-edge[plot]')")
        return None
    return plt


def save_figure(plt: Any, figure: Any, path: Path, title: str) -> Path:
    """Title, lay out, write (creating the folder) and close ``figure``; returns ``path``."""
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def finish(results: dict[str, Any], path: Path | None) -> None:
    """Write ``results`` as JSON to ``path`` (when given, creating the folder), then :func:`emit` them."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=_plain_or_str) + "\n")
        say(f"results: {path}")
    emit(results)


def _plain_or_str(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def verdict(met: bool) -> str:
    return "goal met" if met else "GOAL MISSED"


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def resolve_dataset(args: argparse.Namespace) -> tuple[str, str]:
    """``(dataset, data_dir)``: real MNIST from ``--data-dir`` / ``$UNUS_DATA_DIR``, else synthetic."""
    from unus_edge.data import resolve_data_dir

    if args.dataset == "synthetic":
        say("dataset: synthetic (as asked)")
        return "synthetic", ""
    folder = resolve_data_dir(args.data_dir)
    if folder is None or not any(folder.glob("train-images-idx3-ubyte*")) or not any(
            folder.glob("t10k-images-idx3-ubyte*")):
        where = str(folder) if folder is not None else "neither --data-dir nor $UNUS_DATA_DIR is set"
        say(f"NOTE: no MNIST found ({where}); falling back to --dataset synthetic. "
            "Figures below are NOT on real MNIST.")
        return "synthetic", ""
    say(f"dataset: MNIST from {folder}")
    return "mnist", str(folder)


# ----------------------------------------------------------------------------- brokers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait for the broker's listening socket: connect attempts bounded in number and time."""
    for _ in range(400):
        if process.poll() is not None:
            raise RuntimeError("broker exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return
        time.sleep(0.05)  # a benchmark harness outside the library: bounded start-up wait
    raise RuntimeError(f"broker did not listen on {port}")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


@contextlib.contextmanager
def broker_process(kind: str) -> Iterator[int]:
    """A broker process on a free loopback port: ``mosquitto`` or the embedded ``amqtt``."""
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        if kind == "mosquitto":
            binary = mosquitto_binary()
            if binary is None:
                raise RuntimeError("mosquitto is not installed")
            config = Path(workdir) / "m.conf"
            # Started as root, mosquitto drops to the "mosquitto" user unless told otherwise.
            config.write_text(
                f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\nmax_queued_messages 1000000\nmax_inflight_messages 0\n"
                "max_packet_size 268435456\n"
            )
            command = [binary, "-c", str(config)]
        elif kind == "amqtt":
            command = [sys.executable, "-m", "unus_edge.cli", "-q", "broker", "--port", str(port)]
        else:
            raise ValueError(kind)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, process)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


_BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def add_blas_flag(parser: argparse.ArgumentParser, default: str = "1") -> None:
    parser.add_argument("--blas-threads", default=default, metavar="N|default",
                        help=f"BLAS threads of this process (default {default}; 'default': leave the environment "
                             "alone). Set by re-executing the script, since BLAS reads it when it loads.")


def ensure_blas_threads(threads: str) -> None:
    """Re-execute this script with the BLAS thread variables set to ``threads`` (unless 'default')."""
    if threads == "default":
        return
    wanted = {name: threads for name in _BLAS_VARIABLES}
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def blas_threads() -> str:
    return os.environ.get("OPENBLAS_NUM_THREADS", "default")


def single_thread_env() -> dict[str, str]:
    return dict(os.environ, **{name: "1" for name in _BLAS_VARIABLES})


def load_average() -> float:
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    import platform

    import numpy as np

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "blas_threads": blas_threads(), "load_average_1min": load_average()}
