"""The framework-free floor: McMahan's 2NN trained by hand in plain NumPy.

What a competent engineer writes without any framework: float32, the forward and backward
passes of ``784-200-200-10`` with ReLU spelled out, softmax cross-entropy, plain SGD. It uses
the zoo's parameter layout (``fcK.weight`` of shape ``(out, in)``, as ONNX ``Gemm`` with
``transB=1``) and the engine's batch order (a permutation per epoch from the first of two
streams spawned from the seed), so both train the same model on the same batches and their
results can be compared to the last digits.

Nothing here is clever on purpose: it allocates its temporaries like ordinary NumPy code. The
engine must be at least as fast (``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]

LAYERS = ("fc1", "fc2", "fc3")


def _step(w: list[Array], b: list[Array], x: Array, y: Array, learning_rate: float) -> float:
    """One SGD step on the batch ``(x, y)``; returns the batch's mean loss."""
    n = x.shape[0]
    h1 = x @ w[0].T
    h1 += b[0]
    np.maximum(h1, 0, out=h1)
    h2 = h1 @ w[1].T
    h2 += b[1]
    np.maximum(h2, 0, out=h2)
    z = h2 @ w[2].T
    z += b[2]
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(np.mean(np.log(total[:, 0]) - z[rows, y], dtype=np.float64))
    e /= total
    e[rows, y] -= 1.0
    e *= 1.0 / n  # dL/dz
    dw3 = e.T @ h2
    db3 = e.sum(axis=0)
    dh2 = e @ w[2]
    dh2 *= h2 > 0
    dw2 = dh2.T @ h1
    db2 = dh2.sum(axis=0)
    dh1 = dh2 @ w[1]
    dh1 *= h1 > 0
    dw1 = dh1.T @ x
    db1 = dh1.sum(axis=0)
    for weight, bias, dw, db in ((w[0], b[0], dw1, db1), (w[1], b[1], dw2, db2), (w[2], b[2], dw3, db3)):
        weight -= learning_rate * dw
        bias -= learning_rate * db
    return loss


def train_reference(
    params: Mapping[str, Array], x: Array, y: Array, *, epochs: int, batch_size: int, learning_rate: float, seed: int
) -> tuple[dict[str, Array], float, int]:
    """Train a copy of the 2NN's ``params``; the trained parameters, the mean loss and the steps."""
    w = [np.array(params[f"{name}.weight"], dtype=np.float32) for name in LAYERS]
    b = [np.array(params[f"{name}.bias"], dtype=np.float32) for name in LAYERS]
    inputs = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    labels = np.asarray(y)
    shuffle_seed, _ = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(shuffle_seed)
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = rng.permutation(len(inputs))
        for start in range(0, len(inputs), batch_size):
            index = order[start : start + batch_size]
            total += _step(w, b, np.take(inputs, index, axis=0), np.take(labels, index, axis=0),
                           learning_rate) * len(index)
            steps += 1
    trained = {f"{name}.weight": w[i] for i, name in enumerate(LAYERS)}
    trained |= {f"{name}.bias": b[i] for i, name in enumerate(LAYERS)}
    seen = len(inputs) * epochs
    return trained, total / seen if seen else 0.0, steps
