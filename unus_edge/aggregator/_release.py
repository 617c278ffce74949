"""A release on demand, from a stopped job's checkpoint (``unus-edge release``; issue 16).

A running aggregator releases at the job's end and every ``job.release_every`` rounds. A job
that was stopped before its end (``job.release = false``, a crash, an operator's Ctrl-C) still has
its checkpoint: :func:`release_from_checkpoint` reads it, checks it is this job's and this
model's, and builds the :class:`~unus_edge.messages.Release` the aggregator would have sent;
:func:`publish_release` publishes it, retained, with the job's broker credentials.

Publishing it while the job's aggregator runs would race that aggregator's own releases and the
fleet would store whichever came last, so :func:`publish_release` first reads the retained
aggregator status and refuses an ``online`` one (``force`` overrides). The retained copy, if
any, arrives right after the subscription; the wait for it is bounded by ``status_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from unus_edge import topics
from unus_edge.aggregator._checkpoint import load_checkpoint
from unus_edge.config import JobConfig
from unus_edge.errors import ConfigError, JobError, ProtocolError
from unus_edge.messages import Release, Status, decode_message, encode_message
from unus_edge.onnx_io import fingerprint
from unus_edge.strategies import Params
from unus_edge.topics import Channel
from unus_edge.transport import MqttTransport, Transport
from unus_edge.zoo import resolve_model

__all__ = ["build_release", "publish_release", "release_from_checkpoint"]

logger = logging.getLogger("unus_edge.aggregator")


def release_from_checkpoint(config: JobConfig, directory: Path | None = None) -> Release:
    """The release of the model in ``directory``'s checkpoint (default ``checkpoint.dir``)."""
    job = config.job.name
    if directory is None:
        if not config.checkpoint.dir:
            raise ConfigError("checkpoint.dir", "is empty: name the job's checkpoint folder (or pass --checkpoint)")
        directory = Path(config.checkpoint.dir)
    checkpoint = load_checkpoint(directory.expanduser())
    if checkpoint is None:
        raise JobError(job, f"no checkpoint in {directory}: the job never completed a round there")
    if checkpoint.job != job:
        raise JobError(job, f"the checkpoint in {directory} is job {checkpoint.job!r}'s")
    model = resolve_model(config.model.source, seed=config.model.seed)
    expected = fingerprint(model)
    if checkpoint.fingerprint != expected:
        raise JobError(job, f"the checkpoint's model ({checkpoint.fingerprint}) is not model.source "
                            f"{config.model.source} ({expected})")
    return build_release(config, checkpoint.version, checkpoint.server_round, checkpoint.fingerprint,
                         f"release-{secrets.token_hex(6)}", checkpoint.params, checkpoint.history, [])


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    known = [row[key] for row in rows if row.get(key) is not None]
    return float(known[-1]) if known else None


def build_release(config: JobConfig, version: int, server_round: int, model_fingerprint: str, session: str,
                  params: Params, history: Sequence[Mapping[str, Any]],
                  federated: Sequence[Mapping[str, Any]]) -> Release:
    """A release of ``params``, with the last accuracy (or a regression's mean squared error) the
    rounds' metrics (``history``) know, else the federated evaluations'."""
    accuracy = _last(history, "eval_accuracy")
    error = _last(history, "eval_mse")
    return Release(config.job.name, version, server_round, model_fingerprint, session, params,
                   accuracy if accuracy is not None else _last(federated, "accuracy"),
                   error if error is not None else _last(federated, "mse"),
                   "regression" if config.train.loss == "mse" else "classification")


async def _aggregator_online(transport: Transport, job: str, wait: float) -> Status | None:
    """The retained aggregator status if it says ``online`` (``None`` if offline or absent)."""
    await transport.subscribe(topics.aggregator_status(job), qos=1)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            async for message in transport.messages():
                if message.topic != topics.aggregator_status(job):
                    continue
                try:
                    _, status = decode_message(message.payload, Channel.AGGREGATOR_STATUS)
                except ProtocolError as error:
                    logger.warning("unreadable aggregator status (%s): taken as absent", error)
                    return None
                return status if isinstance(status, Status) and status.state == "online" else None
    return None


async def publish_release(config: JobConfig, release: Release, *, force: bool = False, status_wait: float = 2.0,
                          transport: Transport | None = None) -> None:
    """Publish ``release`` retained on the job's ``release`` topic; refuse while its aggregator
    is online unless ``force``."""
    job = config.job.name
    if transport is None:
        options = config.broker.connect_options(client_id="", clean_session=True)
        # Never the aggregator's own client id: the broker would disconnect a running aggregator.
        transport = MqttTransport(replace(options, client_id=f"unus-release-{job}-{secrets.token_hex(4)}"))
    async with transport:
        online = await _aggregator_online(transport, job, status_wait)
        if online is not None and not force:
            raise JobError(job, f"its aggregator is online (session {online.session}) and releases the model "
                                "itself: stop it first, or pass --force")
        payload = encode_message(release, job, Channel.RELEASE)
        await transport.publish(topics.release(job), payload, qos=1, retain=True)
    logger.info("release of job %s published: version %d (round %d), %d bytes", job, release.version,
                release.server_round, len(payload))
