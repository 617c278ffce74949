"""The onnxruntime kernels behind the engine's matrix products (``unus_edge/nn/_mlas.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from unus_edge.nn import _mlas

pytest.importorskip("onnxruntime")


@pytest.fixture
def every_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime for every product, however small (a private state, restored afterwards)."""
    monkeypatch.setattr(_mlas, "_state", {"kernels": None, "threads": 1, "forced_numpy": False})
    monkeypatch.setattr(_mlas, "MIN_WORK", 0)


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.usefixtures("every_product")
@pytest.mark.parametrize("layout", ["plain", "a_transposed", "b_transposed", "both_transposed", "strided"])
def test_matmul_agrees_with_numpy_for_every_operand_layout(layout: str) -> None:
    rng = np.random.default_rng(0)
    a, b = _f32(rng, 7, 5), _f32(rng, 5, 3)
    if layout in ("a_transposed", "both_transposed"):
        a = np.ascontiguousarray(a.T).T
    if layout in ("b_transposed", "both_transposed"):
        b = np.ascontiguousarray(b.T).T
    if layout == "strided":
        a = _f32(rng, 14, 10)[::2, ::2]
    result = _mlas.matmul(a, b)
    assert _mlas.gemm_backend() == "onnxruntime"
    assert result.dtype == np.float32 and result.shape == (7, 3)
    np.testing.assert_allclose(result, a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("every_product")
def test_a_matrix_times_a_stack_of_matrices() -> None:
    rng = np.random.default_rng(1)
    a, b = _f32(rng, 6, 4), _f32(rng, 3, 4, 5)
    np.testing.assert_allclose(_mlas.matmul(a, b), np.matmul(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("every_product")
def test_other_dtypes_and_ranks_stay_with_numpy_bit_for_bit() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    assert np.array_equal(_mlas.matmul(a, b), a @ b) and _mlas.matmul(a, b).dtype == np.float64
    stack, matrix = _f32(rng, 2, 4, 3), _f32(rng, 3, 2)
    assert np.array_equal(_mlas.matmul(stack, matrix), np.matmul(stack, matrix))  # a 3-D left operand


@pytest.mark.usefixtures("every_product")
def test_operands_that_do_not_match_raise_numpys_error() -> None:
    with pytest.raises(ValueError, match="matmul"):
        _mlas.matmul(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))


def test_numpy_can_be_forced_and_gives_numpys_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_mlas, "_state", {"kernels": None, "threads": 1, "forced_numpy": False})
    monkeypatch.setattr(_mlas, "MIN_WORK", 0)
    rng = np.random.default_rng(3)
    a, b = _f32(rng, 64, 300), _f32(rng, 300, 70)
    _mlas.set_gemm_backend("numpy")
    assert _mlas.gemm_backend() == "numpy"
    assert np.array_equal(_mlas.matmul(a, b), a @ b)
    _mlas.set_gemm_backend("auto")
    assert _mlas.gemm_backend() == "onnxruntime"
    with pytest.raises(ValueError, match="unknown GEMM backend"):
        _mlas.set_gemm_backend("blis")  # type: ignore[arg-type]


def test_thread_count_is_checked_and_rebuilds_the_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_mlas, "_state", {"kernels": None, "threads": 1, "forced_numpy": False})
    assert _mlas.gemm_backend() == "onnxruntime"
    first = _mlas._state["kernels"]
    with pytest.raises(ValueError, match="at least 1"):
        _mlas.set_gemm_threads(0)
    _mlas.set_gemm_threads(2)
    assert _mlas.gemm_backend() == "onnxruntime"
    assert _mlas._state["kernels"] is not first and _mlas._state["kernels"].threads == 2
