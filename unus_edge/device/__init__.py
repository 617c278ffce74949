"""The device daemon (``unus-edge device --config device.toml``): core dependencies only."""

from __future__ import annotations

from unus_edge.device._daemon import Device
from unus_edge.device._pace import NO_PACE, NoPace, Pace
from unus_edge.device._release import StoredRelease, load_release, predict, store_release
from unus_edge.device._serve import ask_prediction
from unus_edge.device._setup import run_device
from unus_edge.device._training import Abandoned, LocalResult, StopHook, train_task

__all__ = [
    "NO_PACE",
    "Abandoned",
    "Device",
    "LocalResult",
    "NoPace",
    "Pace",
    "StopHook",
    "StoredRelease",
    "ask_prediction",
    "load_release",
    "predict",
    "run_device",
    "store_release",
    "train_task",
]
