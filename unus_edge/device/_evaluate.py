"""Federated evaluation on the device: the global model on the held-out examples (issue 16).

The aggregator asks (:class:`~unus_edge.messages.EvaluateTask` on the device's ``tasks`` topic);
the device evaluates and answers (:class:`~unus_edge.messages.EvaluationResult` on its ``update``
topic, QoS 1, never acknowledged: a lost answer is a failure the aggregator counts). A device
that is not training fetches the model the request names; one that is (SSP's standing task)
evaluates the model it holds and says which version that is, so an evaluation never makes it
fetch a model in the middle of a computation. It evaluates its held-out split (``device.holdout``)
or, without one, its training examples, and says which (``split``): a classifier's loss and
accuracy, a regression's mean squared error (``mse``, also its ``loss``). It runs beside the training
worker, in the device's task group, one request at a time and in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal

from unus_edge.errors import DataError, ModelError, PublishError
from unus_edge.messages import EvaluateTask, EvaluationResult
from unus_edge.onnx_io import Evaluator
from unus_edge.topics import Channel

if TYPE_CHECKING:
    from unus_edge.device._daemon import Device

__all__ = ["evaluate_on_request"]

logger = logging.getLogger("unus_edge.device")


async def evaluate_on_request(device: Device) -> None:
    """Answer the aggregator's evaluation requests, one at a time, until cancelled."""
    from unus_edge.device._worker import fetch_model

    evaluator: Evaluator | None = None
    while True:
        if device.evaluations.empty():
            device.evaluations_idle.set()
        request = await device.evaluations.get()
        device.evaluations_idle.clear()
        await device.registered.wait()
        budget = request.deadline_seconds or 60.0
        if device.standing is None and not await fetch_model(device, request.model_version, budget):
            await _answer(device, request, error=f"model version {request.model_version} did not arrive")
            continue
        params, version = device.view.model, device.view.model_version
        if params is None:
            await _answer(device, request, error="no model to evaluate")
            continue
        held_out = device.held_out
        data, split = (held_out, "held_out") if held_out is not None and len(held_out) else (device.dataset, "train")
        evaluator = evaluator or Evaluator(device.graph.model)
        loss_kind: Literal["softmax_cross_entropy", "mse"] = "mse" if data.is_regression else "softmax_cross_entropy"
        try:
            async with device.compute_slots:
                result = await asyncio.to_thread(evaluator.evaluate, params, data.x, data.y, batch_size=500,
                                                 loss=loss_kind)
        except (DataError, ModelError) as error:
            await _answer(device, request, error=str(error))
            continue
        score = f"mse {result.loss:.6g}" if result.accuracy is None else \
            f"accuracy {result.accuracy:.4f}, loss {result.loss:.4f}"
        logger.info("evaluation %s: model v%d on %d %s examples: %s", request.task_id, version, len(data), split,
                    score)
        await _answer(device, request, version=version, num_examples=len(data), loss=float(result.loss),
                      accuracy=result.accuracy, split=split,
                      mse=float(result.loss) if result.accuracy is None else None)


async def _answer(device: Device, request: EvaluateTask, *, version: int = -1, num_examples: int = 0,
                  loss: float | None = None, accuracy: float | None = None, split: str = "held_out",
                  error: str = "", mse: float | None = None) -> None:
    if error:
        logger.warning("evaluation %s not done: %s", request.task_id, error)
    answer = EvaluationResult(device.device_id, device.session, request.task_id,
                              version if version >= 0 else request.model_version, num_examples, loss, accuracy,
                              "train" if split == "train" else "held_out", error, mse)
    try:
        await device.publish_on(Channel.UPDATE, answer)
    except PublishError as failure:  # the aggregator counts a missing answer as a failure
        logger.warning("evaluation %s: the answer was not sent (%s)", request.task_id, failure)
