"""Assembling an aggregator from a job configuration (shared by the CLI and the simulator)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unus_edge.aggregator._ports import Evaluate
from unus_edge.aggregator._results import JobResult, RoundProgress
from unus_edge.aggregator._service import Aggregator
from unus_edge.config import JobConfig
from unus_edge.data import load_dataset, load_source
from unus_edge.errors import ConfigError
from unus_edge.messages import RoundMetrics
from unus_edge.onnx_io import Evaluator, OnnxModel, fingerprint, read_parameters
from unus_edge.strategies import AsyncStrategy, Params, Strategy, load_strategy
from unus_edge.transport import MqttTransport, Transport, connect_unless_stopped, redact_url
from unus_edge.zoo import resolve_model

__all__ = ["JobParts", "prepare_job", "run_aggregator"]

logger = logging.getLogger("unus_edge.aggregator")


@dataclass(frozen=True)
class JobParts:
    model: OnnxModel
    params: Params
    fingerprint: str
    strategy: Strategy[Any] | AsyncStrategy
    evaluate: Evaluate | None


def central_evaluation(config: JobConfig, model: OnnxModel) -> Evaluate | None:
    """Evaluation of global parameters on the configured test set (or ``None`` if disabled)."""
    settings = config.evaluation
    if settings.dataset == "none" or settings.mode == "federated":
        return None
    regression = config.train.loss == "mse"
    named = settings.dataset in ("mnist", "synthetic", "digits")
    if named and regression:
        raise ConfigError("evaluation.dataset", f"{settings.dataset} is a classification test set and this job "
                          "trains a regression (train.loss = mse): name a test set file, or evaluate on the "
                          "devices (evaluation.mode = federated) or not at all (none)")
    if named:
        test = load_dataset(settings.dataset, "test", data_dir=settings.data_dir or None,  # type: ignore[arg-type]
                            seed=config.job.seed, num_examples=settings.num_examples or None)
    else:
        test = load_source(Path(settings.dataset).expanduser(), label_column=settings.csv_label,
                           task="regression" if regression else "classification")
        if settings.num_examples:
            test = test.subset(slice(0, settings.num_examples))
    evaluator = Evaluator(model, backend=settings.backend)
    logger.info("central evaluation on %d %s test examples (%s backend)", len(test), settings.dataset,
                evaluator.backend)

    def evaluate(params: Params) -> dict[str, float]:
        result = evaluator.evaluate(params, test.x, test.y, batch_size=settings.batch_size, loss=config.train.loss)
        if result.accuracy is None:
            return {"loss": float(result.loss), "mse": float(result.loss)}
        return {"loss": float(result.loss), "accuracy": float(result.accuracy)}

    return evaluate


def prepare_job(config: JobConfig) -> JobParts:
    """Load the model, its initial parameters, the strategy and the evaluation."""
    model = resolve_model(config.model.source, seed=config.model.seed)
    name = config.strategy.resolved(config.job.mode)
    strategy = load_strategy(name, config.strategy.options)
    if config.job.mode == "ssp" and not isinstance(strategy, AsyncStrategy):
        raise ConfigError("strategy.name", f"{name} has no SSP/asynchronous mode; with job.mode = "
                                           "'ssp' use ssp, fedasync, fedbuff or another AsyncStrategy")
    if config.job.mode == "sync" and not isinstance(strategy, Strategy):
        raise ConfigError("job.mode", f"{name} is asynchronous: set job.mode = 'ssp' (simulate: --sync-bound S)")
    return JobParts(model, read_parameters(model), fingerprint(model), strategy, central_evaluation(config, model))


async def run_aggregator(
    config: JobConfig,
    *,
    shutdown_trigger: asyncio.Event | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    on_progress: Callable[[RoundProgress], None] | None = None,
    resume: bool = True,
    transport: Transport | None = None,
) -> JobResult:
    """Run the job of ``config`` against its broker until it finishes, fails or is shut down."""
    parts = prepare_job(config)
    session = secrets.token_hex(8)
    model_bytes = sum(int(value.nbytes) for value in parts.params.values())
    transport = transport or MqttTransport(Aggregator.connect_options(config, session, model_bytes=model_bytes))
    aggregator = Aggregator(config, transport, params=parts.params, fingerprint=parts.fingerprint,
                            strategy=parts.strategy, evaluate=parts.evaluate, session=session,
                            shutdown_trigger=shutdown_trigger, on_round=on_round, on_progress=on_progress,
                            resume=resume)
    logger.info("aggregator for job %s (%s, %s) on %s", config.job.name, config.model.source,
                type(parts.strategy).__name__, redact_url(config.broker.url))
    # A shutdown while the broker is unreachable ends the connect back-off too (issue 14).
    try:
        if not await connect_unless_stopped(transport, aggregator.shutdown_trigger):
            logger.info("job %s: stopped while waiting for the broker", config.job.name)
            return aggregator.result("stopped", "stopped while waiting for the broker", 0.0)
        return await aggregator.run()
    finally:
        await transport.close()  # also after a stop during the first connection: no socket left behind
