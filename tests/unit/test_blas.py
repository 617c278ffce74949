"""The BLAS pool is sized at run time, through the OpenBLAS that NumPy loaded (no environment variable)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from unus_edge._blas import blas_threads, set_blas_threads


@pytest.fixture
def openblas() -> Iterator[int]:
    before = blas_threads()
    if before is None:
        pytest.skip("this NumPy does not use OpenBLAS")
    yield before
    set_blas_threads(before)


def test_the_pool_size_is_set_and_read_back(openblas: int) -> None:
    assert set_blas_threads(3)
    assert blas_threads() == 3
    assert set_blas_threads(1)
    assert blas_threads() == 1


@pytest.mark.parametrize("count", [0, -1])
def test_a_pool_of_no_threads_is_refused(count: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        set_blas_threads(count)
