"""BatchNormalization, in training mode (batch statistics) and inference mode (running statistics).

The mode follows the engine's ``training`` flag, not the node's ``training_mode`` attribute (an
exported graph records the mode it was exported in; we train it either way).

In training mode the running mean and variance are updated **in place** in their buffers,
``running = momentum * running + (1 - momentum) * batch`` with ONNX's ``momentum`` (PyTorch's
``1 - momentum``). The running variance is updated with the *unbiased* batch variance, as
PyTorch does (the ONNX reference uses the biased one); normalisation itself uses the biased
variance, as both do. Running statistics are buffers: they get no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unus_edge.errors import ModelError
from unus_edge.nn._base import Array, Build, Grads, Op, Run, register


@register("BatchNormalization")
class BatchNormalization(Op):
    min_inputs = max_inputs = 5
    max_outputs = 5

    def __init__(self, build: Build) -> None:
        super().__init__(build)
        self.epsilon = self.attr_float("epsilon", 1e-5)
        self.momentum = self.attr_float("momentum", 0.9)
        if self.attr_int("spatial", 1) != 1:
            raise self.unsupported("spatial=0")
        self.differentiable = (True, True, True, False, False)

    def forward(self, inputs: Sequence[Array | None], run: Run) -> tuple[tuple[Array, ...], Any]:
        x, scale, bias, running_mean, running_var = inputs
        assert x is not None and scale is not None and bias is not None
        assert running_mean is not None and running_var is not None
        if x.ndim < 2 or scale.shape != (x.shape[1],):
            raise ModelError(
                f"bad_shape: BatchNormalization {self.node.name!r}: input {x.shape}, scale {scale.shape}",
                model=self.model,
            )
        axes = (0, *range(2, x.ndim))
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        if not run.training:
            inv = 1.0 / np.sqrt(running_var + self.epsilon)
            centered = x - running_mean.reshape(shape)
            y = centered * (scale * inv).reshape(shape)
            y += bias.reshape(shape)
            cache = (centered, inv, scale, axes, shape, None) if run.record else None
            return (y, running_mean, running_var, running_mean, running_var), cache
        count = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        centered = x - mean.reshape(shape)
        var = np.square(centered).mean(axis=axes)
        inv = 1.0 / np.sqrt(var + self.epsilon)
        xhat = centered * inv.reshape(shape)
        y = xhat * scale.reshape(shape)
        y += bias.reshape(shape)
        self._update(running_mean, mean)
        self._update(running_var, var * (count / (count - 1)) if count > 1 else var)
        cache = (xhat, inv, scale, axes, shape, count) if run.record else None
        return (y, running_mean, running_var, mean, inv), cache

    def _update(self, buffer: Array, batch: Array) -> None:
        if not buffer.flags.writeable:
            raise ModelError(
                f"read_only_buffer: BatchNormalization {self.node.name!r} updates its running statistics "
                "in place in training mode; pass writable parameters (read_parameters() returns copies)",
                model=self.model,
            )
        buffer *= self.momentum
        buffer += (1.0 - self.momentum) * batch

    def backward(self, dy: Array, cache: Any, needs: Sequence[bool]) -> Grads:
        normalized, inv, scale, axes, shape, count = cache
        dbias = dy.sum(axis=axes)
        if count is None:  # inference mode: an affine map per channel
            dscale = (dy * normalized).sum(axis=axes) * inv if needs[1] else None
            dx = dy * (scale * inv).reshape(shape) if needs[0] else None
            return dx, dscale, dbias if needs[2] else None, None, None
        dscale = (dy * normalized).sum(axis=axes)
        dx = None
        if needs[0]:
            dx = dy * float(count)
            dx -= dbias.reshape(shape)
            dx -= normalized * dscale.reshape(shape)
            dx *= (scale * (inv / count)).reshape(shape)
        return dx, dscale if needs[1] else None, dbias if needs[2] else None, None, None
