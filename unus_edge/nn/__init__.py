"""The on-device training engine: a NumPy interpreter with reverse-mode autodiff over ONNX graphs.

No PyTorch, TensorFlow or onnxruntime-training: a device needs numpy only. When onnxruntime
is installed, the large float32 matrix products and the convolution's input gradient run in
its MLAS kernels (``_mlas``, 1.5-1.9x OpenBLAS here); :func:`set_gemm_backend` turns that off. A :class:`Graph`
validates and plans an :class:`~unus_edge.onnx_io.OnnxModel` once; :func:`train` runs
mini-batch SGD over it with optional :class:`TrainHook` callbacks. See ``docs/engine.md`` for the
supported ops, how gradients are routed, determinism and measured performance.

Module layout: ``_base`` (op protocol and registry), ``_ops`` (dense, elementwise, activations,
dropout), ``_shape`` (reshaping ops, Constant), ``_conv`` (Conv and pooling), ``_norm``
(BatchNormalization), ``_mlas`` (onnxruntime's kernels for the products), ``_graph``
(planning, forward and backward), ``_train`` (losses, SGD, hooks, the training loop).
"""

from __future__ import annotations

from unus_edge.nn._base import OPS
from unus_edge.nn._graph import Graph, Tape
from unus_edge.nn._mlas import gemm_backend, set_gemm_backend, set_gemm_threads
from unus_edge.nn._train import (
    LOSSES,
    SGD,
    Loss,
    TrainConfig,
    TrainHook,
    TrainResult,
    loss_and_grad,
    loss_value_and_grad,
    train,
)

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(OPS))

__all__ = [
    "LOSSES",
    "SGD",
    "SUPPORTED_OPS",
    "Graph",
    "Loss",
    "Tape",
    "TrainConfig",
    "TrainHook",
    "TrainResult",
    "gemm_backend",
    "loss_and_grad",
    "loss_value_and_grad",
    "set_gemm_backend",
    "set_gemm_threads",
    "train",
]
