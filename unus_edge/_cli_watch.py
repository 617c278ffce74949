"""The operators' commands: ``unus-edge monitor`` (live) and ``unus-edge status`` (one shot).

Private to :mod:`unus_edge.cli`, which registers them. Both read only the job's MQTT topics,
with any identity that may read them (the provisioned read-only ``monitor``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from unus_edge._cli_common import run_until_signal
from unus_edge.errors import UnusError

__all__ = ["add_watch_commands"]


def _connect_options(args: argparse.Namespace) -> Any:
    from unus_edge.config import BrokerSettings

    settings = BrokerSettings(url=args.broker, username=args.username or "", password_file=args.password_file or "",
                              ca_file=args.ca_file or "")
    return settings.connect_options(client_id=args.client_id or "", clean_session=True)


def _cmd_monitor(args: argparse.Namespace) -> int:
    from unus_edge.monitor import MonitorState, monitor
    from unus_edge.prometheus import serve
    from unus_edge.transport import MqttTransport

    options = _connect_options(args)
    state = MonitorState()
    if args.prometheus:
        server = serve(state, args.job, args.prometheus)
        print(f"Prometheus metrics of job {args.job} on http://{args.prometheus}/metrics", file=sys.stderr)

    async def run(trigger: asyncio.Event) -> None:
        async with MqttTransport(options) as transport:
            stream = None if args.prometheus and not args.draw else sys.stdout
            watcher = asyncio.create_task(monitor(transport, args.job, stream, once_after=args.once, state=state),
                                          name="monitor")
            stopper = asyncio.create_task(trigger.wait())
            await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watcher, stopper):
                task.cancel()

    try:
        run_until_signal(run)
    finally:
        if args.prometheus:
            server.shutdown()
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from unus_edge.status import collect_status, status_document, status_table
    from unus_edge.transport import MqttTransport

    options = _connect_options(args)

    async def collect() -> Any:
        async with asyncio.timeout(args.timeout + 15):  # the connection's own bound, beside the collection's
            async with MqttTransport(options) as transport:
                return await collect_status(transport, args.job, settle=args.settle, limit=args.timeout)

    try:
        state = asyncio.run(collect())
    except TimeoutError as error:
        raise UnusError(f"no answer from the broker at {args.broker} within {args.timeout + 15:.0f} s") from error
    found = state.job is not None or state.aggregator is not None or bool(state.devices)
    if args.json:
        print(json.dumps(status_document(state, args.job), indent=2, sort_keys=True))
    elif found:
        print(status_table(state, args.job))
    if not found:
        print(f"no job {args.job!r} on {args.broker}: no retained metrics, statuses or aggregator presence "
              "(check --job, and that this identity may read unus/v1/<job>/metrics/#)", file=sys.stderr)
        return 1
    return 0


def _broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL")
    parser.add_argument("--job", required=True)
    parser.add_argument("--username", help="broker username (e.g. the provisioned monitor identity)")
    parser.add_argument("--password-file", metavar="FILE", help="file holding the broker password")
    parser.add_argument("--ca-file", metavar="FILE", help="CA of the broker's TLS certificate (mqtts://)")
    parser.add_argument("--client-id", help="MQTT client id (brokers that use the username as client id need it)")


def add_watch_commands(commands: Any) -> None:
    """Register ``monitor`` and ``status`` on the CLI's subparsers."""
    watch = commands.add_parser("monitor", help="live view of a job from its MQTT topics")
    _broker_arguments(watch)
    watch.add_argument("--once", type=float, metavar="SECONDS", help="print one snapshot after SECONDS and exit")
    watch.add_argument("--prometheus", metavar="HOST:PORT", help="serve the job's metrics for Prometheus on "
                       "http://HOST:PORT/metrics (e.g. 127.0.0.1:9108), drawing nothing unless --draw")
    watch.add_argument("--draw", action="store_true", help="with --prometheus, draw the view too")
    watch.set_defaults(handler=_cmd_monitor)

    status = commands.add_parser("status", help="one table of a job and its fleet, from its retained topics",
                                 description="Exit status 1 when the broker holds nothing for the job.")
    _broker_arguments(status)
    status.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    status.add_argument("--settle", type=float, default=0.5, metavar="SECONDS",
                        help="the quiet period after the last retained message that ends the collection")
    status.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="the longest the collection lasts")
    status.set_defaults(handler=_cmd_status)
