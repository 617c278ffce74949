"""Deterministic per-device training seeds, shared by the aggregator and the devices."""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["device_seed"]


def device_seed(job_seed: int, step: int, device_id: str) -> int:
    """The training seed of one device for one round (sync) or one clock (SSP: ``c_i + 1``)."""
    sequence = np.random.SeedSequence([job_seed, step, zlib.crc32(device_id.encode())])
    return int(sequence.generate_state(1)[0])
