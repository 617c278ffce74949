"""Predictions over MQTT with the stored release (``device.serve_predictions``; issue 16).

A local application (with the identity of the device's applications, ``[predict]`` in
device.toml: ``app@<device>`` when provisioned, which the ACL lets ask this device only) publishes
a :class:`~unus_edge.messages.PredictRequest` (CBOR: a ``request_id`` and the inputs as tensor
``x``) on ``devices/{id}/predict/request``; the daemon answers each with one
:class:`~unus_edge.messages.Prediction` on ``devices/{id}/predict/response``: the classes and the
probabilities, or a regression's values, with the version of the release that computed them,
or an ``error`` saying why not (no release yet, inputs the model cannot take, busy).

Decisions:

* The release is read from ``device.release_dir`` (the store of :mod:`._release`), not kept
  from the release message: what answers is exactly what a local application loading
  ``model.onnx`` gets, and a release stored while the daemon was down serves too. The store is
  read again only when ``release.json`` changed (its size and modification time).
* One request at a time, in a worker thread (inference must not hold the event loop and the
  keepalives); at most :data:`QUEUED` wait, and a request beyond that is answered ``busy`` at
  once rather than queued without bound.
* A request larger than ``device.predict_max_bytes`` fails to decode: it is logged and dropped
  (without a readable ``request_id`` there is nobody to answer).
* Predictions run beside training; they do not take a ``compute_slots`` slot (that bounds the
  simulated fleet's trainings), so a prediction waits for no round.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from unus_edge import topics
from unus_edge.device._release import StoredRelease, load_release, probabilities_of
from unus_edge.errors import DataError, ModelError, ProtocolError, PublishError, TransportError
from unus_edge.messages import Prediction, PredictRequest, decode_message, encode_message
from unus_edge.onnx_io import Evaluator, read_parameters
from unus_edge.topics import Channel
from unus_edge.transport import Transport

if TYPE_CHECKING:
    from unus_edge.device._daemon import Device

__all__ = ["QUEUED", "ReleaseCache", "accept_prediction", "ask_prediction", "serve_predictions"]

logger = logging.getLogger("unus_edge.device")

QUEUED = 16
"""Prediction requests that may wait; one more is answered ``busy``."""


class ReleaseCache:
    """The stored release, its parameters and its evaluator, read again when the store changed."""

    def __init__(self, folder: str | os.PathLike[str], backend: str = "auto") -> None:
        self.folder = Path(folder).expanduser()
        self.backend = backend
        self._stamp: tuple[int, int] | None = None
        self._loaded: tuple[StoredRelease, dict[str, Any], Evaluator] | None = None

    def current(self) -> tuple[StoredRelease, dict[str, Any], Evaluator]:
        """The release now in the store (raises ``DataError("no_release")`` when there is none)."""
        try:
            stat = (self.folder / "release.json").stat()
            stamp: tuple[int, int] | None = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            stamp = None
        if self._loaded is None or stamp != self._stamp:
            release = load_release(self.folder)
            evaluator = Evaluator(release.model, backend=self.backend)  # type: ignore[arg-type]
            self._loaded, self._stamp = (release, read_parameters(release.model), evaluator), stamp
            logger.info("predictions: release %d loaded (%s backend)", release.version, evaluator.backend)
        return self._loaded

    def answer(self, device_id: str, request: PredictRequest) -> Prediction:
        """The prediction for ``request`` (an answer with an ``error`` when it cannot be made)."""
        version = -1
        try:
            release, params, evaluator = self.current()
            version = release.version
            outputs = np.asarray(evaluator.predict(params, np.asarray(request.tensors["x"])), np.float64)
        except (DataError, ModelError) as error:
            return Prediction(device_id, request.request_id, version, error=str(error))
        if release.task == "regression":
            return Prediction(device_id, request.request_id, version, "regression",
                              tensors={"y": outputs.astype(np.float32)})
        probabilities = probabilities_of(outputs)
        return Prediction(device_id, request.request_id, version, "classification",
                          tuple(int(c) for c in probabilities.argmax(axis=1)),
                          {"y": probabilities.astype(np.float32)})


def accept_prediction(device: Device, request: PredictRequest, group: asyncio.TaskGroup) -> None:
    """Queue ``request``, or answer ``busy`` at once when :data:`QUEUED` already wait."""
    try:
        device.predictions.put_nowait(request)
    except asyncio.QueueFull:
        busy = Prediction(device.device_id, request.request_id, -1, error=f"busy: {QUEUED} requests waiting")
        group.create_task(_send(device, busy), name="device-prediction-busy")


async def serve_predictions(device: Device) -> None:
    """Answer the queued prediction requests, one at a time, until cancelled."""
    cache = ReleaseCache(device.settings.release_dir, device.settings.predict_backend)
    while True:
        request = await device.predictions.get()
        answer = await asyncio.to_thread(cache.answer, device.device_id, request)
        if answer.error:
            logger.warning("prediction %s not made: %s", request.request_id, answer.error)
        await _send(device, answer)


async def _send(device: Device, answer: Prediction) -> None:
    try:
        await device.publish_on(Channel.PREDICT_RESPONSE, answer)
    except PublishError as failure:  # the application asks again
        logger.warning("prediction %s: the answer was not sent (%s)", answer.request_id, failure)


async def ask_prediction(transport: Transport, job: str, device_id: str, inputs: NDArray[Any], *,
                         request_id: str = "", resend_seconds: float = 5.0) -> Prediction:
    """A local application's side: send ``inputs`` to the device's daemon and wait for its answer.

    ``transport`` is connected (with the applications' identity, ``[predict]`` in device.toml,
    and a client id of its own); put the overall timeout at the call site. The answer subscription is made
    before the request goes out, so the answer cannot be missed; the request is sent again, with
    the same ``request_id``, every ``resend_seconds`` until an answer comes (a request published
    while the daemon was not subscribed, restarting say, is lost: MQTT keeps no message for a
    topic nobody subscribes to). The first answer wins; later copies are ignored."""
    request_id = request_id or secrets.token_hex(8)
    response = topics.device_topic(job, device_id, Channel.PREDICT_RESPONSE)
    await transport.subscribe(response, qos=1)
    request = PredictRequest(request_id, {"x": np.ascontiguousarray(inputs, np.float32)})
    payload = encode_message(request, job, Channel.PREDICT_REQUEST)
    answered = asyncio.create_task(_answer_to(transport, response, request_id), name="prediction-answer")
    try:
        while True:
            await transport.publish(topics.device_topic(job, device_id, Channel.PREDICT_REQUEST), payload, qos=1)
            done, _ = await asyncio.wait({answered}, timeout=resend_seconds)
            if done:
                return answered.result()
            logger.info("no prediction for %s within %.0f s: asking again", request_id, resend_seconds)
    finally:
        answered.cancel()


async def _answer_to(transport: Transport, response: str, request_id: str) -> Prediction:
    async for message in transport.messages():
        if message.topic != response:
            continue
        try:
            _, answer = decode_message(message.payload, Channel.PREDICT_RESPONSE)
        except ProtocolError as error:
            logger.warning("ignoring an unreadable prediction: %s", error)
            continue
        if isinstance(answer, Prediction) and answer.request_id == request_id:
            return answer
    raise TransportError("the connection closed before the prediction arrived")
