"""What the ``unus-edge`` commands share: running a service until a signal, and config overrides."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["JOB_FLAGS", "overrides", "run_until_signal"]


def run_until_signal(factory: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> Any:
    """Run a service; SIGINT/SIGTERM set its shutdown trigger."""

    async def runner() -> Any:
        trigger = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, trigger.set)
        return await factory(trigger)

    return asyncio.run(runner())


def overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """``--set`` values, then the flags of ``mapping`` (attribute -> config key) that were given."""
    found = list(args.set or [])
    for attribute, key in mapping.items():
        value = getattr(args, attribute, None)
        if value is not None:
            found.append(f"{key}={value}")
    return found


JOB_FLAGS = {"broker": "broker.url", "rounds": "job.rounds", "job": "job.name", "model": "model.source",
              "strategy": "strategy.name", "fraction": "job.fraction", "epochs": "train.epochs",
              "batch_size": "train.batch_size", "lr": "train.learning_rate", "seed": "job.seed",
              "eval_examples": "evaluation.num_examples", "data_dir": "evaluation.data_dir",
              "checkpoint_dir": "checkpoint.dir", "deadline": "job.round_deadline"}
