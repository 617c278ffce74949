"""Assembling a device daemon from its configuration (shared by the CLI and the simulator)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path

from unus_edge._blas import set_blas_threads
from unus_edge.config import DeviceConfig
from unus_edge.data import Dataset, LocalData
from unus_edge.device._daemon import Device
from unus_edge.device._pace import Pace
from unus_edge.device._training import check_dataset
from unus_edge.nn import Graph, set_gemm_threads
from unus_edge.onnx_io import fingerprint
from unus_edge.strategies import load_client_strategies
from unus_edge.transport import MqttTransport, connect_unless_stopped
from unus_edge.zoo import resolve_model

__all__ = ["run_device"]

logger = logging.getLogger("unus_edge.device")


def local_data(config: DeviceConfig, graph: Graph) -> LocalData:
    """The device's own data source, read as ``device.data_format`` says (images at the model's size)."""
    settings = config.device
    shape = (graph.model.inputs[0].shape if graph.model.inputs else None) or ()
    height, width = (shape[-2], shape[-1]) if len(shape) >= 3 else (28, 28)
    size = (height, width) if isinstance(height, int) and isinstance(width, int) else (28, 28)
    features = tuple(name.strip() for name in settings.csv_features.split(",") if name.strip())
    return LocalData(Path(settings.data).expanduser(), holdout=settings.holdout, seed=settings.model_seed,
                     data_format=settings.data_format, label_column=settings.csv_label, feature_columns=features,
                     image_size=size, task=settings.task)


async def run_device(
    config: DeviceConfig,
    *,
    dataset: Dataset | None = None,
    held_out: Dataset | None = None,
    shutdown_trigger: asyncio.Event | None = None,
    exit_when_finished: bool = False,
    compute_slots: asyncio.Semaphore | None = None,
    pace: Pace | None = None,
) -> Device:
    """Run a device until shutdown (or the job's end with ``exit_when_finished``).

    Sizes the process's BLAS pool and onnxruntime's product kernels to ``device.blas_threads``
    first (process-wide: in-process devices share them, and each sets the same value).
    ``compute_slots``, shared by the devices of one process, bounds how many of them train at
    once (the simulator passes one), and ``pace`` makes a simulated device as slow as its
    profile (:mod:`unus_edge.profiles`).
    """
    if config.device.blas_threads:
        set_blas_threads(config.device.blas_threads)
    set_gemm_threads(config.device.blas_threads or os.cpu_count() or 1)  # 0: one per core, as OpenBLAS
    load_client_strategies(config.device.client_strategies)
    model = resolve_model(config.device.model, seed=config.device.model_seed)
    graph = Graph(model)
    local = None if dataset is not None else local_data(config, graph)
    data = local.train if local is not None else dataset
    assert data is not None
    check_dataset(graph, data, config.device.data if dataset is None else "the device's data")
    session = secrets.token_hex(8)
    options = Device.connect_options(config, session)
    transport = MqttTransport(options)
    device = Device(config, transport, graph=graph, fingerprint=fingerprint(model), dataset=data, session=session,
                    shutdown_trigger=shutdown_trigger, exit_when_finished=exit_when_finished,
                    compute_slots=compute_slots)
    device.local_data = local
    device.held_out = local.held_out if local is not None else held_out
    if pace is not None:
        device.pace = pace
    # The first connection may retry for as long as the broker is unreachable: a shutdown
    # (SIGTERM from systemd) must end that wait too, not only a running daemon (issue 14).
    try:
        if not await connect_unless_stopped(transport, device.shutdown_trigger):
            logger.info("device %s: stopped while waiting for its broker", config.device.id)
            return device
        await device.run()
    finally:
        await transport.close()  # also after a stop during the first connection: no socket left behind
    return device

