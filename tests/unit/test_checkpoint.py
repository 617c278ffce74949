"""Checkpoints: round trip, atomic replacement, and clear errors on corruption."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from unus_edge.aggregator import CHECKPOINT_FILE, Checkpoint, DeviceRecord, load_checkpoint, save_checkpoint
from unus_edge.errors import JobError


def sample(version: int = 3) -> Checkpoint:
    rng = np.random.default_rng(1)
    rng.standard_normal(5)
    return Checkpoint(
        job="mnist", fingerprint="sha256:ab", server_round=version, version=version,
        params={"w": np.full((2, 2), version, np.float32), "b": np.arange(3, dtype=np.float32)},
        rng_state=dict(rng.bit_generator.state),
        devices=[DeviceRecord("d1", "s1", 600, "Linux", "0.1.0", 1.0, True, 2.0, 3, 0.25, 3)],
        history=[{"server_round": 1, "eval_accuracy": 0.9}], dedup=[("m1", True, ""), ("m2", False, "stale_base")],
    )


def test_round_trip(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, sample())
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert (loaded.job, loaded.server_round, loaded.version) == ("mnist", 3, 3)
    np.testing.assert_array_equal(loaded.params["w"], np.full((2, 2), 3, np.float32))
    assert loaded.params["w"].flags.writeable
    restored = np.random.default_rng(0)
    restored.bit_generator.state = loaded.rng_state
    expected = np.random.default_rng(1)
    expected.standard_normal(5)
    assert restored.random() == expected.random()  # the 128-bit PCG64 state survived
    assert loaded.devices[0].rounds_contributed == 3
    assert loaded.dedup == [("m1", True, ""), ("m2", False, "stale_base")]
    assert load_checkpoint(tmp_path / "empty") is None


def test_a_crash_during_a_write_leaves_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, sample(version=3))

    def crash(source: object, destination: object) -> None:
        raise OSError("power lost before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        save_checkpoint(tmp_path, sample(version=4))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.version == 3  # the temporary file never replaced the valid one
    save_checkpoint(tmp_path, sample(version=5))  # and the next save still works
    assert load_checkpoint(tmp_path).version == 5  # type: ignore[union-attr]


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, sample())
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(JobError, match="corrupt"):
        load_checkpoint(tmp_path)
