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
from typing import TYPE_CHECKING, Any

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


def cmd_export(args: argparse.Namespace) -> int:
    """``unus-edge export``: a model with trained weights as ``.onnx`` or ``.tflite`` (issue 15)."""
    from unus_edge.onnx_io import Evaluator, fingerprint, model_bytes, prepare_input
    from unus_edge.zoo import resolve_model

    model = resolve_model(args.model)
    params = {name: np.asarray(model.initializers[name]) for name in model.parameter_names}
    origin = f"{args.model}'s own weights"
    if args.checkpoint:
        from unus_edge.aggregator import load_checkpoint

        checkpoint = load_checkpoint(Path(args.checkpoint).expanduser())
        if checkpoint is None:
            raise UnusError(f"no checkpoint in {args.checkpoint}")
        if checkpoint.fingerprint != fingerprint(model):
            raise UnusError(f"the checkpoint in {args.checkpoint} is of another architecture "
                            f"({checkpoint.fingerprint}) than {args.model} ({fingerprint(model)})")
        params = {name: np.asarray(value) for name, value in checkpoint.params.items()}
        origin = f"job {checkpoint.job}'s checkpoint, version {checkpoint.version} (round {checkpoint.server_round})"
    out = Path(args.out)
    if args.format == "onnx":
        if args.weights != "fp32":
            raise UnusError("--weights fp16 and int8 are for --format tflite (ONNX keeps fp32 parameters)")
        content = model_bytes(model, params)
    else:
        from unus_edge.tflite import LiteRTRunner, to_tflite

        content = to_tflite(model, params, weights=args.weights)
    temporary = out.with_name(f".{out.name}.partial")
    temporary.write_bytes(content)
    temporary.replace(out)
    line = f"wrote {out} ({args.format}, {args.weights}, {len(content) / 1e6:.2f} MB) from {origin}"
    if args.format == "tflite":
        # A check a user can read: LiteRT against the reference on random inputs of the model's shape.
        shape = model.inputs[0].shape or ()
        rows = np.random.default_rng(0).random((32, *(int(d) for d in shape[1:] if isinstance(d, int))), np.float32)
        reference = Evaluator(model).predict(params, rows)
        difference = float(np.abs(LiteRTRunner(content).run(prepare_input(model, rows)) - reference).max())
        line += f"; LiteRT's outputs are within {difference:.1e} of {Evaluator(model).backend}'s on 32 random inputs"
    print(line)
    return 0


def add_model_commands(commands: Any) -> None:
    """Register ``predict``, ``release`` and ``export`` on the CLI's subparsers."""
    predict = commands.add_parser("predict", help="predict with the trained model a finished job released "
                                  "to this device", description="One JSON line per input: class, probability, "
                                  "model version.")
    predict.add_argument("--config", required=True, metavar="TOML", help="the device's configuration")
    predict.add_argument("--input", required=True, metavar="PATH", help="an image, a folder of images, a .csv or "
                         "a .npz file (x)")
    predict.add_argument("--release-dir", metavar="DIR", help="default: device.release_dir")
    predict.add_argument("--mqtt", action="store_true", help="ask the running device daemon over MQTT "
                         "(device.serve_predictions) instead of computing here")
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (--mqtt)")
    predict.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    predict.set_defaults(handler=cmd_predict)

    release = commands.add_parser("release", help="publish the model of a stopped job's checkpoint to the fleet")
    release.add_argument("--config", metavar="TOML", help="the job's configuration file")
    release.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    release.add_argument("--broker", metavar="URL", help="broker URL (default: the job's broker.url)")
    release.add_argument("--checkpoint", metavar="DIR", help="default: checkpoint.dir of the job")
    release.add_argument("--force", action="store_true", help="publish even while the job's aggregator is online")
    release.set_defaults(handler=cmd_release)

    export = commands.add_parser("export", help="write a model with its trained weights as .tflite or .onnx",
                                 description="MODEL is a zoo name or an ONNX file (a run's or a release's "
                                 "model.onnx carries its weights); --checkpoint takes a job's weights instead.")
    export.add_argument("model", metavar="MODEL")
    export.add_argument("--format", choices=["tflite", "onnx"], default="tflite")
    export.add_argument("--weights", choices=["fp32", "fp16", "int8"], default="fp32",
                        help="tflite: weights stored as fp32, fp16 or int8 (per channel), computed in fp32")
    export.add_argument("--checkpoint", metavar="DIR", help="a job's checkpoint folder: its weights")
    export.add_argument("--out", required=True, metavar="FILE")
    export.set_defaults(handler=cmd_export)
