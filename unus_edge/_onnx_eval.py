"""Evaluating an ONNX model with any weights: onnxruntime when installed, else the NumPy engine.

Private to :mod:`unus_edge.onnx_io`, which re-exports it. An :class:`Evaluator` builds its
backend once: one onnxruntime ``InferenceSession`` over a rewrite of the model in which the
parameters are graph inputs (new weights are fed per call, the session is never rebuilt), or,
without onnxruntime or when it cannot run the model, a :class:`unus_edge.nn.Graph`. Asked for
(``backend="litert"``, never by ``auto``), LiteRT runs the model written as a ``.tflite``
(:mod:`unus_edge.tflite`); its weights are constants of that file, so it is written again
when the weights change (a digest of them says when).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from unus_edge._onnx_model import OnnxModel, check_parameters, parameters_as_inputs, read_parameters
from unus_edge.errors import DataError, ModelError

__all__ = [
    "EvalResult",
    "Evaluator",
    "prepare_input",
    "softmax_cross_entropy",
]

logger = logging.getLogger("unus_edge.onnx_io")


class EvalResult(NamedTuple):
    """The mean loss (softmax cross-entropy, or the mean squared error of a regression), the
    accuracy (``None`` for a regression) and the number of examples evaluated."""

    loss: float
    accuracy: float | None
    num_examples: int


def prepare_input(model: OnnxModel, x: NDArray[Any]) -> NDArray[Any]:
    """``x`` (any shape with n rows) as a C-contiguous float32 batch of the model's input shape."""
    array = np.asarray(x)
    if array.ndim == 0:
        raise DataError("bad_shape", f"expected a batch of inputs for model {model.name}, got a scalar")
    if not model.inputs:
        raise ModelError("no_input: the graph has no non-initializer input", model=model.name)
    shape = model.inputs[0].shape
    if shape and all(isinstance(d, int) for d in shape[1:]):
        target = (array.shape[0], *(int(d) for d in shape[1:]))  # type: ignore[arg-type]
        if array.shape != target:
            if array.size != int(np.prod(target)):
                raise DataError(
                    "bad_shape", f"input {array.shape} cannot be reshaped to {target} for model {model.name}"
                )
            array = array.reshape(target)
    return np.ascontiguousarray(array, dtype=np.float32)


def softmax_cross_entropy(logits: NDArray[Any], labels: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Per-example cross-entropy (log-sum-exp, stable) and the softmax probabilities."""
    if logits.ndim != 2:
        raise ModelError(f"bad_output: cross-entropy needs (n, classes) logits, got {logits.shape}")
    labels = np.asarray(labels)
    if labels.shape != (logits.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError("bad_labels", f"expected {logits.shape[0]} integer labels, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise DataError("bad_labels", f"labels must lie in [0, {logits.shape[1]})")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(logits.shape[0])
    losses = np.log(total[:, 0]) - shifted[rows, labels]
    exp /= total
    return losses, exp


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    """The exception classes onnxruntime raises (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented", "RuntimeException")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


class Evaluator:
    """Predict and evaluate a model with any weights; the backend is built once."""

    def __init__(self, model: OnnxModel, *,
                 backend: Literal["auto", "onnxruntime", "numpy", "litert"] = "auto") -> None:
        self.model = model
        self._session: Any = None
        self._graph: Any = None
        self._litert: tuple[bytes, Any] | None = None
        self._errors: tuple[type[Exception], ...] = ()
        if backend not in ("auto", "onnxruntime", "numpy", "litert"):
            raise ValueError(f"unknown backend {backend!r}")
        if backend == "litert":
            from unus_edge.tflite import litert_available

            if not litert_available():
                raise ModelError("litert_missing", "backend litert needs ai-edge-litert: "
                                 "pip install 'unus-edge[litert]'", model=model.name)
            self.backend = "litert"
            self._litert_runner(read_parameters(model))  # refuses now what it cannot write; kept for these weights
            return
        if backend in ("auto", "onnxruntime"):
            try:
                import onnxruntime  # optional accelerator, imported lazily
            except ImportError as error:
                if backend == "onnxruntime":
                    raise ModelError("onnxruntime is not installed", model=model.name) from error
                logger.debug("onnxruntime not installed: evaluating %s with numpy", model.name)
            else:
                self._errors = _onnxruntime_errors()
                options = onnxruntime.SessionOptions()
                options.log_severity_level = 3
                try:
                    self._session = onnxruntime.InferenceSession(
                        parameters_as_inputs(model), options, providers=["CPUExecutionProvider"]
                    )
                except self._errors as error:
                    if backend == "onnxruntime":
                        raise ModelError(f"onnxruntime_failed: {error}", model=model.name) from error
                    logger.warning("onnxruntime cannot run %s (%s): evaluating with numpy", model.name, error)
                else:
                    self._input = self._session.get_inputs()[0].name
                    self.backend = "onnxruntime"
                    return
        from unus_edge.nn import Graph  # nn imports onnx_io, hence this module: no cycle at load

        self._graph = Graph(model)
        self.backend = "numpy"

    def predict(self, params: Mapping[str, NDArray[Any]], x: NDArray[Any], *, batch_size: int = 1000) -> NDArray[Any]:
        """The model's output (logits) for every row of ``x``, computed ``batch_size`` rows at a time."""
        check_parameters(self.model, params)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        inputs = prepare_input(self.model, x)
        runner = self._litert_runner(params) if self.backend == "litert" else None  # once per call, not per batch
        chunks = []
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size]
            if runner is not None:
                chunks.append(runner.run(batch))
            elif self._session is not None:
                feeds = {key: np.asarray(params[key]) for key in self.model.parameter_names}
                feeds[self._input] = batch
                try:
                    chunks.append(self._session.run(None, feeds)[0])
                except self._errors as error:
                    raise ModelError(f"onnxruntime_failed: {error}", model=self.model.name) from error
            else:
                chunks.append(self._graph.forward(params, batch))
        if not chunks:
            return np.zeros((0,), np.float32)
        return np.concatenate(chunks)

    def _litert_runner(self, params: Mapping[str, NDArray[Any]]) -> Any:
        from unus_edge.tflite import LiteRTRunner, to_tflite

        digest = hashlib.blake2b(digest_size=16)
        for key in self.model.parameter_names:
            digest.update(np.ascontiguousarray(params[key]).data)  # a view: no copy of the weights
        if self._litert is None or self._litert[0] != digest.digest():
            self._litert = (digest.digest(), LiteRTRunner(to_tflite(self.model, params)))
        return self._litert[1]

    def evaluate(
        self, params: Mapping[str, NDArray[Any]], x: NDArray[Any], y: NDArray[Any], *, batch_size: int = 1000,
        loss: Literal["softmax_cross_entropy", "mse"] = "softmax_cross_entropy",
    ) -> EvalResult:
        """Mean softmax cross-entropy and accuracy of the model on ``(x, y)``; with ``loss="mse"``
        the mean squared error of its outputs against the targets ``y`` (over every output value,
        as the trainer's loss) and no accuracy."""
        if loss not in ("softmax_cross_entropy", "mse"):
            raise ValueError(f"unknown loss {loss!r}")
        labels = np.asarray(y)
        if labels.shape[:1] != np.shape(x)[:1]:
            raise DataError("bad_labels", f"{np.shape(x)[0]} inputs but {labels.shape} labels")
        num_examples = int(labels.shape[0])
        regression = loss == "mse"
        if num_examples == 0:
            return EvalResult(0.0, None if regression else 0.0, 0)
        loss_sum = 0.0
        correct = 0
        for start in range(0, num_examples, batch_size):
            outputs = self.predict(params, np.asarray(x)[start : start + batch_size], batch_size=batch_size)
            batch_labels = labels[start : start + batch_size]
            if regression:
                if outputs.size != batch_labels.size:
                    raise DataError("bad_targets", f"targets of shape {batch_labels.shape[1:]} for outputs of "
                                                   f"shape {outputs.shape[1:]}")
                error = outputs.astype(np.float64).reshape(-1) - batch_labels.astype(np.float64).reshape(-1)
                loss_sum += float(np.square(error).sum()) / (outputs.size / outputs.shape[0])
                continue
            losses, _ = softmax_cross_entropy(outputs, batch_labels)
            loss_sum += float(losses.sum(dtype=np.float64))
            correct += int((outputs.argmax(axis=1) == batch_labels).sum())
        return EvalResult(loss_sum / num_examples, None if regression else correct / num_examples, num_examples)
