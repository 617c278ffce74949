"""The ``unus-edge`` command line.

Each command is a thin layer: it parses flags, configures logging, and runs a library entry
point under :func:`asyncio.run` with SIGINT/SIGTERM wired to the service's shutdown trigger.
Errors of the :class:`~unus_edge.errors.UnusError` tree are printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from unus_edge import __version__
from unus_edge._logging import configure_logging
from unus_edge.errors import UnusError

__all__ = ["main"]


def _run_until_signal(factory: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]) -> int:
    """Run a service; the first SIGINT/SIGTERM sets its shutdown trigger, a second one aborts."""

    async def runner() -> int | None:
        trigger = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, trigger.set)
        return await factory(trigger)

    return asyncio.run(runner()) or 0


# ---------------------------------------------------------------------------- commands


def _cmd_broker(args: argparse.Namespace) -> int:
    from unus_edge.broker import run_broker

    return _run_until_signal(lambda trigger: run_broker(args.host, args.port, shutdown_trigger=trigger))


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unus-edge",
        description="Federated learning for edge and IoT devices over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"unus-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: MQTT packets)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run the embedded MQTT broker (amqtt)",
                                 description="Run the embedded amqtt broker until Ctrl-C / SIGTERM.")
    broker.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    broker.add_argument("--port", type=int, default=1883, help="TCP port (default: 1883; 0 picks a free one)")
    broker.set_defaults(handler=_cmd_broker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, quiet=args.quiet)
    try:
        return int(args.handler(args))
    except UnusError as error:
        print(f"unus-edge {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
