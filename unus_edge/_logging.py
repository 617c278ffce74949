"""Logging set-up for the command-line entry points (the library itself only uses loggers).

Under systemd (``JOURNAL_STREAM`` is set) each line starts with a syslog priority prefix such
as ``<4>``, which journald turns into the entry's priority, and carries no timestamp (journald
adds its own). On a terminal the lines carry a timestamp.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["configure_logging"]

_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournaldFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def configure_logging(verbosity: int = 0, *, quiet: bool = False) -> None:
    """Log to stderr: WARNING when quiet, INFO by default, DEBUG with ``-v``."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 0 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournaldFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbosity < 2:
        logging.getLogger("unus_edge.transport.paho").setLevel(logging.WARNING)
        # amqtt warns about undelivered messages of clients that just left, at every shutdown.
        logging.getLogger("amqtt").setLevel(logging.ERROR)
