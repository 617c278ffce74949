"""unus-edge: federated learning for edge and IoT devices over MQTT.

Devices keep their data and train locally with a NumPy engine over ONNX graphs; an asyncio
aggregator on a gateway combines their updates; an MQTT broker connects the two.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from unus_edge.errors import UnusError

try:
    __version__ = version("unus-edge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["UnusError", "__version__"]
