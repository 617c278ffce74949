"""Terminal progress for long commands (``simulate``, ``demo``, ``aggregator``).

On a terminal the current round is one line redrawn in place; elsewhere (CI logs, pipes) only
the finished rounds are written, one line each.
"""

from __future__ import annotations

import time
from typing import TextIO

from unus_edge.aggregator import RoundProgress
from unus_edge.messages import RoundMetrics

__all__ = ["RoundProgressBar", "format_bytes"]


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class RoundProgressBar:
    def __init__(self, stream: TextIO, total_rounds: int, *, width: int = 24) -> None:
        self.stream = stream
        self.total_rounds = total_rounds
        self.width = width
        self.interactive = stream.isatty()
        self.started = time.perf_counter()

    def update(self, progress: RoundProgress) -> None:
        if not self.interactive or progress.selected == 0:
            return
        done = progress.received + progress.failed
        filled = round(self.width * done / progress.selected)
        bar = "#" * filled + "." * (self.width - filled)
        failed = f", {progress.failed} failed" if progress.failed else ""
        self.stream.write(f"\rround {progress.server_round:>3}/{self.total_rounds} [{bar}] "
                          f"{progress.received}/{progress.selected} updates{failed}   ")
        self.stream.flush()

    def round_done(self, metrics: RoundMetrics) -> None:
        accuracy = f"accuracy {metrics.eval_accuracy:.4f}" if metrics.eval_accuracy is not None else "no evaluation"
        loss = f"loss {metrics.eval_loss:.4f}" if metrics.eval_loss is not None else ""
        failed = f" ({metrics.num_failures} failed)" if metrics.num_failures else ""
        line = (f"round {metrics.server_round:>3}/{self.total_rounds}  {metrics.num_updates}/{metrics.num_selected}"
                f" updates{failed}  {accuracy}  {loss}  {metrics.duration_seconds:.2f} s")
        self.stream.write(("\r" + line + " " * 8 + "\n") if self.interactive else line + "\n")
        self.stream.flush()
