"""Shared fixtures: data directory discovery, free ports, brokers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
