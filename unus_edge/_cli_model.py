"""The commands of the trained model: ``unus-edge predict`` (on the device) and ``unus-edge release``.

Private to :mod:`unus_edge.cli`, which registers them. Imports are lazy where they are heavy,
so ``unus-edge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unus_edge._cli_common import JOB_FLAGS, overrides
from unus_edge.errors import UnusError

if TYPE_CHECKING:
    from unus_edge.config import DeviceConfig
    from unus_edge.device import StoredRelease
    from unus_edge.messages import Prediction

__all__ = ["cmd_predict", "cmd_release"]


def _image_size(release: StoredRelease) -> tuple[int, int]:
    """The image size the release's model takes (28 x 28 when its input is not an image)."""
    shape = (release.model.inputs[0].shape if release.model.inputs else None) or ()
    height, width = (shape[-2], shape[-1]) if len(shape) >= 3 else (28, 28)
    return (height, width) if isinstance(height, int) and isinstance(width, int) else (28, 28)


def cmd_predict(args: argparse.Namespace) -> int:
    from unus_edge.config import load_device_config
    from unus_edge.data import load_inputs
    from unus_edge.device import load_release, predict

    config = load_device_config(args.config, overrides=args.set or [])
    folder = args.release_dir or config.device.release_dir
    if not folder:
        raise UnusError("no release folder: set device.release_dir in the device's configuration or pass --release-dir")
    release = load_release(Path(folder).expanduser())
    if args.mqtt:
        return _predict_over_mqtt(args, config, release)
    size = _image_size(release)
    features = tuple(name.strip() for name in config.device.csv_features.split(",") if name.strip())
    names, x = load_inputs(Path(args.input), label_column=config.device.csv_label, feature_columns=features,
                           image_size=size)
    classes, probabilities = predict(release, x)
    for name, label, row in zip(names, classes, probabilities, strict=True):
        answer: dict[str, object] = {"input": name}
        if release.task == "regression":
            answer["prediction"] = [float(value) for value in row.reshape(-1)]
        else:
            answer.update({"class": int(label), "probability": round(float(row[label]), 6)})
        print(json.dumps({**answer, "model_version": release.version, "job": release.meta.get("job")}))
    return 0


def _predict_over_mqtt(args: argparse.Namespace, config: DeviceConfig, release: StoredRelease) -> int:
    """``predict --mqtt``: ask the running daemon (``device.serve_predictions``) instead."""
    from unus_edge.data import load_inputs
    from unus_edge.device import ask_prediction
    from unus_edge.transport import MqttTransport

    names, x = load_inputs(Path(args.input), label_column=config.device.csv_label, image_size=_image_size(release))
    # The applications' identity ([predict] in device.toml), not the daemon's: one identity
    # holds one connection on a broker that takes the username as the client id.
    options = config.predict.broker(config.broker).connect_options(
        client_id=f"unus-predict-{config.device.id}-{secrets.token_hex(4)}", clean_session=True)

    async def ask() -> Prediction:
        async with MqttTransport(options) as transport, asyncio.timeout(args.timeout):
            return await ask_prediction(transport, config.device.job, config.device.id, x)

    try:
        answer = asyncio.run(ask())
    except TimeoutError as error:
        raise UnusError(f"no prediction from device {config.device.id} within {args.timeout:.0f} s: is its daemon "
                        "running with device.serve_predictions = true?") from error
    if answer.error:
        raise UnusError(f"device {config.device.id} could not predict: {answer.error}")
    values = np.asarray(answer.tensors["y"])
    for index, name in enumerate(names):
        line: dict[str, object] = {"input": name, "model_version": answer.model_version}
        if answer.task == "regression":
            line["prediction"] = [float(v) for v in values[index].reshape(-1)]
        else:
            label = answer.classes[index]
            line.update({"class": label, "probability": round(float(values[index][label]), 6)})
        print(json.dumps(line))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from unus_edge import topics
    from unus_edge.aggregator import publish_release, release_from_checkpoint
    from unus_edge.config import load_job_config

    config = load_job_config(args.config, overrides=overrides(args, JOB_FLAGS))
    release = release_from_checkpoint(config, Path(args.checkpoint) if args.checkpoint else None)
    asyncio.run(publish_release(config, release, force=args.force))
    print(f"released job {config.job.name}'s model version {release.version} (round {release.server_round}) "
          f"on {topics.release(config.job.name)}")
    return 0
