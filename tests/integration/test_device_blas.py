"""A device daemon sizes the BLAS pool from ``device.blas_threads`` when it starts.

The SSP rejoin test took 168 s instead of 4.4 s under load with OpenBLAS's default pool
(docs/open-work.md); the daemon, not the environment it was started in, decides.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.brokers import AmqttBroker
from unus_edge._blas import blas_threads, set_blas_threads
from unus_edge.config import BrokerSettings, DeviceConfig, DeviceSettings
from unus_edge.data import Dataset, load_dataset
from unus_edge.device import run_device


def start_device(threads: int) -> int | None:
    """Run a device that stops at once; the pool size it left."""
    data = load_dataset("synthetic", "train", seed=0, num_examples=20)

    async def scenario() -> None:
        broker = AmqttBroker()
        await broker.start()
        try:
            stop = asyncio.Event()
            stop.set()  # shut down as soon as it is up
            config = DeviceConfig(DeviceSettings(id="blas", job="blas", blas_threads=threads),
                                  BrokerSettings(url=broker.url))
            async with asyncio.timeout(60):
                await run_device(config, dataset=Dataset(data.x, data.y, data.num_classes), shutdown_trigger=stop)
        finally:
            await broker.stop()

    asyncio.run(scenario())
    return blas_threads()


@pytest.mark.parametrize("threads", [1, 3])
def test_the_daemon_sets_the_pool_it_is_configured_with(threads: int) -> None:
    before = blas_threads()
    if before is None:
        pytest.skip("this NumPy does not use OpenBLAS")
    set_blas_threads(2)  # neither value under test
    try:
        assert start_device(threads) == threads
    finally:
        set_blas_threads(before)


def test_zero_leaves_the_pool_as_it_was() -> None:
    before = blas_threads()
    if before is None:
        pytest.skip("this NumPy does not use OpenBLAS")
    set_blas_threads(2)
    try:
        assert start_device(0) == 2
    finally:
        set_blas_threads(before)
