"""Matrix products for the engine: onnxruntime's MLAS kernels when installed, NumPy otherwise.

Why (measured, ``docs/engine.md``): on the 2-core AMD EPYC this project is benchmarked on,
single-threaded float32 GEMM runs at 120-184 GFLOP/s in onnxruntime's MLAS and at 54-108
GFLOP/s in the OpenBLAS 0.3.31 NumPy's wheels bundle (and in PyTorch's MKL), across the shapes a
training step makes: the CNN's im2col products, its dense layer, the 2NN's layers. A
convolutional network spends most of its step in those products, so they decide how fast it
trains; everything else in the engine stays NumPy.

How: one tiny ONNX graph per product kind (a ``Gemm`` node for each pair of transpose flags, a
``MatMul`` node for batched products), built without the ``onnx`` package and run with
``InferenceSession.run``, which releases the GIL. A transposed operand is passed as its
C-contiguous base with the transpose flag set, so transposes cost no copy. A session run costs
about 4 µs of Python work with the GIL held, against about 1 µs for NumPy's call, so products
below ``MIN_WORK`` multiply-adds stay in NumPy. The threshold is set by threads, not by one
training alone: with ten 2NN trainings at batch 10 in threads of one process (in-process
devices), sending their products (1.6M multiply-adds at most) to onnxruntime made the trainings
15-25 % slower, where one training alone got 10 % faster. The CNN's products (16M-1G) win in
threads too: two CNN trainings in two threads took 0.61-0.68 s against 0.83-0.91 s.

Only float32 operands go to onnxruntime; anything else, and every product when onnxruntime is
not installed (a 32-bit Raspberry Pi OS has no wheel), uses NumPy. ``UNUS_GEMM=numpy`` or
:func:`set_gemm_backend` forces NumPy, so the two can be compared in one run. Results differ
from NumPy's in the last bits (another summation order); each backend is deterministic for a
given thread count.

Threads: the sessions use :func:`set_gemm_threads`'s count (one by default, as
``device.blas_threads``, for the reason ``unus_edge/_blas.py`` gives), never spin waiting for
work, and allocate without onnxruntime's arena (no lock shared by the threads of in-process
devices, and no cache of freed blocks on a small board).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Literal

import numpy as np

from unus_edge._onnx_model import encode_model
from unus_edge._onnx_schema import Node, ValueInfo
from unus_edge.nn._base import Array

__all__ = ["MIN_WORK", "gemm_backend", "matmul", "set_gemm_backend", "set_gemm_threads"]

logger = logging.getLogger("unus_edge.nn")

MIN_WORK = 1 << 22  # m * k * n below which NumPy is used (see the docstring)

Backend = Literal["onnxruntime", "numpy"]

_F32 = np.dtype(np.float32)


SessionKey = tuple[str, tuple[tuple[str, int | tuple[int, ...]], ...]]


def _product_model(op_type: str, attributes: dict[str, int | tuple[int, ...]], rank: int) -> bytes:
    dims: tuple[str, ...] = tuple(f"d{i}" for i in range(rank))
    return encode_model(
        nodes=[Node(op_type, ("a", "b"), ("c",), name="kernel", attributes=attributes)],
        initializers={},
        inputs=[ValueInfo("a", _F32, None), ValueInfo("b", _F32, None)],
        outputs=[ValueInfo("c", _F32, dims if rank else None)],
        opset=17,
        graph_name="unus_edge_kernel",
    )


class _Kernels:
    """The lazily built sessions of one thread count."""

    def __init__(self, onnxruntime: Any, threads: int) -> None:
        self._ort = onnxruntime
        self.threads = threads
        self._sessions: dict[SessionKey, Any] = {}
        self._lock = threading.Lock()

    def _session(self, key: SessionKey) -> Any:
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    op_type, attributes = key[0], dict(key[1])
                    options = self._ort.SessionOptions()
                    options.intra_op_num_threads = self.threads
                    options.inter_op_num_threads = 1
                    options.log_severity_level = 3
                    options.enable_cpu_mem_arena = False
                    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
                    session = self._ort.InferenceSession(
                        _product_model(op_type, attributes, 2 if op_type == "Gemm" else 0),
                        options,
                        providers=["CPUExecutionProvider"],
                    )
                    self._sessions[key] = session
        return session

    def gemm(self, a: Array, trans_a: int, b: Array, trans_b: int) -> Array:
        key: SessionKey = ("Gemm", (("transA", trans_a), ("transB", trans_b)))
        result: Array = self._session(key).run(None, {"a": a, "b": b})[0]
        return result

    def batched(self, a: Array, b: Array) -> Array:
        result: Array = self._session(("MatMul", ())).run(None, {"a": a, "b": b})[0]
        return result



_state: dict[str, Any] = {"kernels": None, "threads": 1, "forced_numpy": os.environ.get("UNUS_GEMM") == "numpy"}


def _load(threads: int) -> _Kernels | None:
    try:
        import onnxruntime  # optional accelerator
    except ImportError:
        logger.debug("onnxruntime not installed: matrix products use NumPy")
        return None
    kernels = _Kernels(onnxruntime, threads)
    try:  # build and check one session now, so a broken install falls back here, once
        probe = np.arange(6, dtype=np.float32).reshape(2, 3)
        if not np.array_equal(kernels.gemm(probe, 0, probe, 1), probe @ probe.T):
            raise RuntimeError("a 2x3 product came out wrong")
    except Exception as error:  # noqa: BLE001 - any failure of an optional accelerator means: use NumPy
        logger.warning("onnxruntime's GEMM is unusable (%s): matrix products use NumPy", error)
        return None
    return kernels


def _kernels() -> _Kernels | None:
    if _state["forced_numpy"]:
        return None
    kernels: _Kernels | None = _state["kernels"]
    if kernels is None:
        kernels = _load(_state["threads"])
        _state["kernels"] = kernels if kernels is not None else False
    return kernels or None


def set_gemm_backend(backend: Literal["auto", "numpy"]) -> None:
    """``"numpy"`` runs every product with NumPy; ``"auto"`` uses onnxruntime when it works."""
    if backend not in ("auto", "numpy"):
        raise ValueError(f"unknown GEMM backend {backend!r}; use 'auto' or 'numpy'")
    _state["forced_numpy"] = backend == "numpy"


def set_gemm_threads(count: int) -> None:
    """The thread count of onnxruntime's products (process-wide, like the BLAS pool)."""
    if count < 1:
        raise ValueError(f"a GEMM thread count must be at least 1, not {count}")
    if count != _state["threads"]:
        _state["threads"] = count
        if _state["kernels"]:
            _state["kernels"] = None  # rebuilt with the new count at the next product


def gemm_backend() -> Backend:
    """Which library runs this process's large float32 products."""
    return "onnxruntime" if _kernels() is not None else "numpy"


def _worth_a_kernel(a: Array, b: Array) -> bool:
    if a.dtype != _F32 or b.dtype != _F32 or a.ndim != 2 or b.ndim not in (2, 3) or a.shape[1] != b.shape[-2]:
        return False
    work: int = a.shape[0] * a.shape[1] * b.shape[-1] * (b.shape[0] if b.ndim == 3 else 1)
    return work >= MIN_WORK


def _operand(x: Array) -> tuple[Array, int]:
    """``x`` as a C-contiguous array and whether it must be transposed to give ``x`` back."""
    if x.flags.c_contiguous:
        return x, 0
    if x.T.flags.c_contiguous:
        return x.T, 1
    return np.ascontiguousarray(x), 0


def matmul(a: Array, b: Array) -> Array:
    """``a @ b``; 2-D products of float32 operands, or a 2-D ``a`` times a stack of matrices ``b``."""
    kernels = _kernels() if _worth_a_kernel(a, b) else None
    if kernels is None:
        result: Array = np.matmul(a, b)  # also what raises NumPy's error for operands that do not match
        return result
    if b.ndim == 3:
        return kernels.batched(np.ascontiguousarray(a), np.ascontiguousarray(b))
    a_base, trans_a = _operand(a)
    b_base, trans_b = _operand(b)
    return kernels.gemm(a_base, trans_a, b_base, trans_b)

