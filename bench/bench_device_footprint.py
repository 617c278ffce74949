"""The device daemon's footprint, as deployed: venv size, RSS idle and training, time to registered.

Everything runs as on a Raspberry Pi deployment, on this machine:

* the venv is made by ``deploy/raspberry-pi/install.sh --role device --no-systemd`` (core
  dependencies only: numpy, paho-mqtt; pip and setuptools removed, the installer's default)
  from a wheel of this checkout; its size is the disk usage of the whole prefix;
* the broker is Mosquitto with the gateway drop-in (``mosquitto-unus-edge.conf``: TLS,
  password file, ACL) and the credentials ``unus-edge provision`` made; the device connects
  over TLS with its own identity, the aggregator (this checkout's venv) on loopback;
* the device is the installed ``unus-edge device`` console script with the installed
  ``device.toml``, on one MNIST partition of 600 examples (a 100-device split; synthetic
  data when MNIST is absent, said so), BLAS threads as the environment leaves them.

Measured:

* **time to registered**: from spawning the device process to its log line "registered with
  aggregator session" (an aggregator is already waiting), median and max of ``--repeat`` starts;
* **idle RSS**: the device's peak ``VmRSS`` while registered and idle (heartbeats only) for
  ``--idle`` seconds; also the time a SIGTERM takes to stop it (for ``TimeoutStopSec``);
* **RSS while training**: the device's ``VmHWM`` (peak RSS) over a job of ``--rounds`` rounds
  of E = 1, B = 10 on its 600 examples, for the 2NN and for the CNN.

Goals: idle RSS under 60 MB; venv under 80 MB; registered within 2 s of start.

    python bench/bench_device_footprint.py [--quick] [--json] [--dataset mnist|synthetic]
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import (
    add_common_flags,
    emit,
    free_port,
    machine,
    mosquitto_binary,
    resolve_dataset,
    say,
    setup_output,
    verdict,
)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "raspberry-pi"
CLI = [sys.executable, "-m", "unus_edge.cli"]
JOB, DEVICE = "bench", "pi-1"
MB = 1e6


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes on disk, apparent bytes) of a tree, each inode counted once."""
    seen: set[int] = set()
    blocks = apparent = 0
    for root, _, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            if info.st_ino in seen:
                continue
            seen.add(info.st_ino)
            blocks += info.st_blocks * 512
            apparent += info.st_size
    return blocks, apparent


def build_wheel(workdir: Path) -> Path:
    source = workdir / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "unus_edge", source / "unus_edge", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(workdir / "w"),
                    str(source)], check=True, capture_output=True)
    return next((workdir / "w").glob("unus_edge-*.whl"))


def install(workdir: Path, wheel: Path, bundle: Path, *, keep_pip: bool = False) -> tuple[Path, Path, float]:
    """install.sh --role device --no-systemd; returns (prefix, etc, seconds)."""
    prefix, etc, state = workdir / "opt", workdir / "etc", workdir / "state"
    env = dict(os.environ, UNUS_PREFIX=str(prefix), UNUS_ETC=str(etc), UNUS_STATE=str(state),
               UNUS_USER=getpass.getuser(), UNUS_PYTHON=sys.executable, UNUS_SOURCE=str(wheel),
               UNUS_KEEP_PIP="1" if keep_pip else "0")
    env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    subprocess.run(["bash", str(DEPLOY / "install.sh"), "--role", "device", "--no-systemd", "--no-apt",
                    "--bundle", str(bundle)], env=env, check=True, capture_output=True)
    return prefix, etc, time.perf_counter() - started


@contextmanager
def secure_broker(workdir: Path, gateway: Path) -> Iterator[tuple[int, int]]:
    """Mosquitto with the shipped drop-in (paths and ports moved): (loopback port, TLS port)."""
    binary = mosquitto_binary()
    if binary is None:
        raise SystemExit("mosquitto is not installed")
    plain, tls = free_port(), free_port()
    text = (DEPLOY / "mosquitto-unus-edge.conf").read_text()
    text = text.replace("/etc/unus-edge/broker/", f"{gateway}/").replace(
        "listener 1883 127.0.0.1\n", f"listener {plain} 127.0.0.1\n").replace(
        "listener 8883\n", f"listener {tls} 127.0.0.1\n")
    (workdir / "conf.d").mkdir()
    (workdir / "conf.d" / "unus-edge.conf").write_text(text)
    main = workdir / "mosquitto.conf"
    main.write_text(f"user {getpass.getuser()}\npersistence_location {workdir}/\nlog_dest stdout\n"
                    f"include_dir {workdir / 'conf.d'}\n")
    process = subprocess.Popen(["stdbuf", "-oL", binary, "-c", str(main)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:  # synchronise on Mosquitto's own "running" line
        if "running" in line:
            break
    else:
        raise RuntimeError("mosquitto did not start")
    threading.Thread(target=lambda: [None for _ in process.stdout or ()], daemon=True).start()
    try:
        yield plain, tls
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    values = {key: int(value.split()[0]) * 1024 for key, value in re.findall(r"(VmRSS|VmHWM):\s+(\d+ kB)", text)}
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


class Aggregator:
    """An aggregator of job "bench" on the loopback listener, with its provisioned identity."""

    def __init__(self, fleet: Path, port: int, workdir: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [*CLI, "aggregator", "--config", str(fleet / "gateway" / f"{JOB}.toml"), "--broker",
             f"mqtt://127.0.0.1:{port}", "--no-resume", "--checkpoint-dir", str(workdir / "checkpoint"),
             "--set", f"broker.password_file={fleet / 'gateway' / f'aggregator-{JOB}.password'}",
             "--set", "evaluation.dataset=none", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        for line in self.process.stderr:  # it listens once it waits for devices
            if "waiting for" in line:
                break
        threading.Thread(target=self.process.communicate, daemon=True).start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


class DeviceProcess:
    """The installed ``unus-edge device``; its log is read line by line as it is written."""

    def __init__(self, prefix: Path, etc: Path, tls_port: int, workdir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(prefix / "bin" / "unus-edge"), "device", "--config", str(etc / "device.toml"),
             "--broker", f"mqtts://localhost:{tls_port}", *args],
            stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
        self.lines: list[str] = []
        self.registered = threading.Event()
        self.registered_after = 0.0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "registered with aggregator session" in line and not self.registered.is_set():
                self.registered_after = time.perf_counter() - self.started
                self.registered.set()

    def sample(self, until: threading.Event | None, seconds: float | None) -> tuple[int, int]:
        """Peak VmRSS and last VmHWM, sampled every 20 ms until the event, the time or the exit."""
        end = time.perf_counter() + seconds if seconds is not None else float("inf")
        peak = hwm = 0
        while self.process.poll() is None and time.perf_counter() < end and not (until and until.is_set()):
            current, high = rss(self.process.pid)
            peak, hwm = max(peak, current), max(hwm, high)
            time.sleep(0.02)  # a sampling period, not a synchronisation
        return peak, hwm

    def stop(self) -> float:
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        return time.perf_counter() - started


def wait_until_training(port: int, password: str) -> None:
    """As the monitor identity, wait for the device's heartbeat to say it is training."""
    import asyncio
    import json

    from unus_edge import topics
    from unus_edge.topics import Channel
    from unus_edge.transport import ConnectOptions, MqttTransport

    async def watch() -> None:
        options = ConnectOptions(port=port, username="monitor", password=password)
        async with asyncio.timeout(120), MqttTransport(options) as monitor:
            await monitor.subscribe(topics.device_topic(JOB, DEVICE, Channel.HEARTBEAT))
            async for message in monitor.messages():
                if json.loads(message.payload)["body"]["state"] == "training":
                    return

    asyncio.run(watch())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--repeat", type=int, default=5, help="device starts for the time to registered")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle sampling per start")
    parser.add_argument("--rounds", type=int, default=3, help="training rounds per model")
    args = parser.parse_args()
    setup_output(args)
    if args.quick:
        args.repeat, args.idle, args.rounds = 3, 2.0, 1
    if shutil.which("openssl") is None or mosquitto_binary() is None:
        say("needs openssl and mosquitto")
        return 1
    dataset, data_dir = resolve_dataset(args)
    figures: dict[str, Any] = {"machine": machine(), "dataset": dataset}
    with tempfile.TemporaryDirectory(prefix="unus-footprint-") as temporary:
        workdir = Path(temporary)
        fleet = workdir / "fleet"
        state = workdir / "state"
        subprocess.run([*CLI, "-q", "provision", "--job", JOB, "--devices", DEVICE, "--gateway", "localhost",
                        "--out", str(fleet), "--config-dir", str(workdir / "etc"), "--data",
                        str(state / "data.npz")], check=True, capture_output=True)
        wheel = build_wheel(workdir)

        # ---- the venv
        prefix, etc, seconds = install(workdir, wheel, fleet / "devices" / DEVICE)
        on_disk, apparent = disk_usage(prefix)
        figures.update(venv_bytes=on_disk, venv_apparent_bytes=apparent, install_seconds=seconds)
        say(f"core venv (install.sh, no pip): {on_disk / MB:.1f} MB on disk ({apparent / MB:.1f} MB apparent), "
            f"installed in {seconds:.1f} s  -> {verdict(on_disk < 80 * MB)} (< 80 MB)")
        if not args.quick:
            with_pip = workdir / "with-pip"
            with_pip.mkdir()
            other, _, _ = install(with_pip, wheel, fleet / "devices" / DEVICE, keep_pip=True)
            figures["venv_with_pip_bytes"] = disk_usage(other)[0]
            say(f"  the same with pip and setuptools kept (UNUS_KEEP_PIP=1): "
                f"{figures['venv_with_pip_bytes'] / MB:.1f} MB")
            shutil.rmtree(with_pip)

        # ---- data: one partition of a 100-device split (600 examples)
        split = [*CLI, "-q", "data", "split", "--dataset", dataset, "--devices", "100", "--out", str(workdir / "parts")]
        if data_dir:
            split += ["--data-dir", data_dir]
        subprocess.run(split, check=True, capture_output=True)
        state.mkdir(exist_ok=True)
        shutil.copy(workdir / "parts" / "device_000.npz", state / "data.npz")

        (workdir / "broker").mkdir()
        with secure_broker(workdir / "broker", fleet / "gateway") as (plain, tls):
            # ---- start-up and idle
            waiting = Aggregator(fleet, plain, workdir, "--set", "job.min_devices=2", "--set",
                                 "job.wait_for_devices=3600")
            starts, idles, stops = [], [], []
            try:
                for _ in range(args.repeat):
                    device = DeviceProcess(prefix, etc, tls, workdir)
                    if not device.registered.wait(60):
                        raise RuntimeError("the device did not register:\n" + "".join(device.lines[-20:]))
                    starts.append(device.registered_after)
                    peak, _ = device.sample(None, args.idle)
                    idles.append(peak)
                    stops.append(device.stop())
            finally:
                waiting.stop()
            figures.update(registered_seconds=starts, idle_rss_bytes=idles, sigterm_stop_seconds=stops)
            say(f"time to registered: median {statistics.median(starts):.2f} s, max {max(starts):.2f} s "
                f"({args.repeat} starts, TLS + password)  -> {verdict(max(starts) < 2.0)} (< 2 s)")
            say(f"idle RSS: {max(idles) / MB:.1f} MB (peak over {args.idle:.0f} s idle, each start)  "
                f"-> {verdict(max(idles) < 60 * MB)} (< 60 MB)")
            say(f"SIGTERM to exit (idle): max {max(stops):.2f} s")

            # ---- training
            for model in ("mnist_2nn", "mnist_cnn"):
                shutil.rmtree(workdir / "checkpoint", ignore_errors=True)
                job = Aggregator(fleet, plain, workdir, "--model", model, "--rounds", str(args.rounds),
                                 "--epochs", "1", "--batch-size", "10", "--set", "job.min_devices=1")
                try:
                    device = DeviceProcess(prefix, etc, tls, workdir, "--exit-when-finished",
                                           "--set", f"device.model={model}")
                    started = time.perf_counter()
                    peak, hwm = device.sample(None, None)
                    device.process.wait(timeout=600)
                    elapsed = time.perf_counter() - started
                finally:
                    job.stop()
                if device.process.returncode != 0:
                    raise RuntimeError(f"the device failed:\n{''.join(device.lines[-20:])}")
                figures[f"train_{model}_peak_rss_bytes"] = max(peak, hwm)
                figures[f"train_{model}_seconds"] = elapsed
                say(f"RSS while training {model} (E=1, B=10, 600 examples, {args.rounds} round(s)): "
                    f"peak {max(peak, hwm) / MB:.1f} MB; job took {elapsed:.1f} s")
            # ---- SIGTERM in the middle of a CNN training task (many epochs: it would take minutes)
            job = Aggregator(fleet, plain, workdir, "--model", "mnist_cnn", "--rounds", "1", "--epochs", "100",
                             "--deadline", "3600", "--set", "job.min_devices=1")
            try:
                device = DeviceProcess(prefix, etc, tls, workdir, "--set", "device.model=mnist_cnn",
                                       "--set", "device.heartbeat_interval=0.5")
                wait_until_training(plain, (fleet / "gateway" / "monitor.password").read_text().strip())
                figures["sigterm_training_stop_seconds"] = device.stop()
            finally:
                job.stop()
            say(f"SIGTERM to exit while training the CNN: {figures['sigterm_training_stop_seconds']:.2f} s "
                "(the step is abandoned; TimeoutStopSec is 30 s)")
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
