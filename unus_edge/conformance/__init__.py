"""A conformance kit for device implementations (``unus-edge conformance --device-cmd '...'``).

The kit plays the aggregator of a throw-away job over a real MQTT broker (the embedded amqtt,
or ``--broker URL``), starts the device under test as a process, and drives it through what
``docs/protocol.md`` asks of a device, one step after another: its status before its first
heartbeat, registration, a synchronous round, a redelivered task, re-publication until an
acknowledgement, a task it cannot carry out, a refused update, a new aggregator session, the
SSP clock rule, the end of the job, and its last will. Each step passes or fails with what was
seen; the first failure ends the run (later steps depend on earlier ones). The kit is an
aggregator that says exactly what a test needs; it does not aggregate.

The device command is a template; the kit fills in ``{broker}`` (URL), ``{host}``, ``{port}``,
``{job}``, ``{device_id}``, ``{data}`` (an ``.npz`` partition of 60 synthetic examples,
``x`` float32 (60, 784) and ``y`` int64), ``{model}`` (the zoo name, ``logreg``),
``{model_path}`` (the same model as an ONNX file) and ``{python}``. It runs without a shell,
in its own process group, which the will step kills with SIGKILL.

"Must not happen" steps watch for ``quiet_seconds`` (default 3): long enough for a device that
answers in well under a second here, short enough for CI. A device that needs longer to train
60 examples needs a longer window, not a weaker check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from unus_edge import topics
from unus_edge.broker import EmbeddedBroker
from unus_edge.conformance._kit import EXAMPLES, MODEL, CheckResult, Kit, StepFailedError
from unus_edge.conformance._steps import STEPS
from unus_edge.data import load_dataset, save_partition
from unus_edge.transport import MqttTransport, options_from_url
from unus_edge.zoo import build_model

__all__ = ["STEPS", "STOCK_DEVICE", "CheckResult", "add_arguments", "command", "run_conformance"]

STOCK_DEVICE = (
    "{python} -m unus_edge.cli device --broker {broker} --id {device_id} --data {data}"
    " --set device.job={job} --set device.model={model_path} --set device.heartbeat_interval=1"
    " --set device.ack_timeout=2 --set device.registration_retry=2"
)
"""The stock device, with short timers so that the run takes seconds."""


async def run_conformance(
    device_cmd: str = STOCK_DEVICE,
    *,
    broker_url: str | None = None,
    wait_seconds: float = 30.0,
    quiet_seconds: float = 3.0,
    report: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run every step against the device ``device_cmd`` starts; the results in order.

    ``wait_seconds`` bounds each wait for something the device must send (a re-publication
    waits at least 60 s); ``quiet_seconds`` is how long a step watches for what must not come.
    """
    results: list[CheckResult] = []
    async with contextlib.AsyncExitStack() as stack:
        if broker_url is None:
            broker = await stack.enter_async_context(EmbeddedBroker("127.0.0.1", 0))
            broker_url = broker.url
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unus-conformance-")))
        job, device_id = f"conformance-{secrets.token_hex(4)}", "dut-1"
        options = options_from_url(broker_url)
        transport = MqttTransport(options_from_url(broker_url, client_id=f"unus-conformance-{job}", clean_session=True))
        await stack.enter_async_context(transport)
        kit = Kit(transport, job, device_id, quiet_seconds, wait_seconds)
        await transport.subscribe(topics.all_device_filter(job), qos=1)
        receiver = asyncio.create_task(kit.receive(), name="conformance-receive")
        stack.callback(receiver.cancel)
        log = stack.enter_context(_prepare(work))
        await kit.announce(f"conformance-{secrets.token_hex(4)}")
        command = device_cmd.format(python=shlex.quote(sys.executable), broker=broker_url, host=options.host,
                                    port=options.port, job=job, device_id=device_id, data=work / "partition.npz",
                                    model=MODEL, model_path=work / f"{MODEL}.onnx")
        kit.process = await asyncio.create_subprocess_exec(*shlex.split(command), stdout=log, stderr=log,
                                                           start_new_session=True)
        stack.push_async_callback(_stop, kit.process)
        failed = False
        for name, step in STEPS:
            if failed:
                results.append(CheckResult(name, None, "not run: an earlier step failed"))
            else:
                started = time.monotonic()
                try:
                    detail, passed = await step(kit), True
                except StepFailedError as error:
                    detail, passed, failed = str(error), False, True
                results.append(CheckResult(name, passed, detail, time.monotonic() - started))
            if report is not None:
                report(results[-1])
        if failed:
            tail = (work / "device.log").read_text(errors="replace").splitlines()[-15:]
            results.append(CheckResult("device log (last lines)", None, "\n".join(tail)))
            if report is not None:
                report(results[-1])
    return results


@contextlib.contextmanager
def _prepare(work: Path) -> Iterator[BinaryIO]:
    """The device's partition and model files in ``work``; its log file, open while it runs."""
    save_partition(work / "partition.npz", load_dataset("synthetic", "train", seed=0, num_examples=EXAMPLES))
    (work / f"{MODEL}.onnx").write_bytes(build_model(MODEL))
    with open(work / "device.log", "wb") as log:
        yield log


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


# --------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``unus-edge conformance``."""
    parser.add_argument("--device-cmd", metavar="CMD", default=STOCK_DEVICE,
                        help="the command that starts the device under test, run without a shell; the kit fills in "
                        "{broker} {host} {port} {job} {device_id} {data} {model} {model_path} {python} "
                        "(default: the stock device)")
    parser.add_argument("--broker", metavar="URL",
                        help="the MQTT broker to test through (default: an embedded amqtt on a free loopback port)")
    parser.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for what the device must send (default 30)")
    parser.add_argument("--quiet-window", type=float, default=3.0, metavar="SECONDS",
                        help="how long to watch for what the device must not send (default 3)")


def command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run the kit, write one line per step to ``out``; 0 when every step passed, 1 otherwise."""
    marks = {True: "PASS", False: "FAIL", None: "----"}

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    def report(result: CheckResult) -> None:
        took = f"  ({result.seconds:.1f} s)" if result.passed is not None else ""
        say(f"{marks[result.passed]}  {result.name:34s} {result.detail}{took}")

    say(f"conformance: {len(STEPS)} steps; device command: {args.device_cmd}")
    results = asyncio.run(run_conformance(args.device_cmd, broker_url=args.broker, wait_seconds=args.wait,
                                          quiet_seconds=args.quiet_window, report=report))
    passed = sum(result.passed is True for result in results)
    say(f"{passed} of {len(STEPS)} steps passed")
    return 0 if passed == len(STEPS) else 1
