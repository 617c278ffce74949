"""Shared fixtures: data directory discovery, free ports, brokers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unus_edge._blas import set_blas_threads

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """One BLAS thread for the test process itself, as a device daemon has (``device.blas_threads``).

    CI machines are loaded: with OpenBLAS's pool of one thread per core, a small matrix product
    stalled 39x under 8 CPU burners on 2 cores (1.7 s against 66 s for the same 20,000 products).
    Child processes are left as users start them: device daemons size their own pool.
    """
    set_blas_threads(1)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST folder from ``UNUS_DATA_DIR``; tests that need real data skip without it."""
    value = os.environ.get("UNUS_DATA_DIR", "")
    if not value:
        pytest.skip("UNUS_DATA_DIR is not set: no real MNIST for this test (make test sets it when present)")
    path = Path(value)
    if not (path / "train-labels-idx1-ubyte.gz").exists() and not (path / "train-labels-idx1-ubyte").exists():
        pytest.skip(f"UNUS_DATA_DIR={path} holds no MNIST IDX files")
    return path


@pytest.fixture(params=["numpy", "onnxruntime"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with NumPy's products, then with onnxruntime's for every product, however small.

    ``MIN_WORK = 0`` sends even a test's tiny shapes through the onnxruntime kernels, so the
    gradient and oracle tests check both code paths of ``unus_edge/nn/_mlas.py``.
    """
    from unus_edge.nn import _mlas

    if request.param == "numpy":
        monkeypatch.setattr(_mlas, "_state", {**_mlas._state, "forced_numpy": True})
    else:
        pytest.importorskip("onnxruntime")
        monkeypatch.setattr(_mlas, "_state", {**_mlas._state, "forced_numpy": False})
        monkeypatch.setattr(_mlas, "MIN_WORK", 0)
        assert _mlas.gemm_backend() == "onnxruntime"
    return str(request.param)
