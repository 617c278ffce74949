"""The trained model back on the device: the release store, and predictions from it (issue 16).

At the end of a finished job the aggregator publishes the trained model, retained, on
``release`` (:class:`~unus_edge.messages.Release`). A device whose ``device.release_dir`` is set
keeps it there for local applications:

* ``model.onnx``: the device's model with the release's weights (the fingerprint must be the
  device's own, and every tensor must match its model: a release is checked like a model);
* ``release.json``: job, version, round, fingerprint, accuracy, and when it was stored;
* ``model.previous.onnx`` and ``release.previous.json``: the last good release before it.

Every file is written under a temporary name, flushed to disk and renamed into place, the
previous release first: a device killed at any moment leaves either the old or the new release
complete, never a torn file (:func:`load_release` falls back to the previous one if the current
one cannot be read). :func:`predict` runs a stored release on inputs with onnxruntime when
installed, else the NumPy engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from unus_edge.errors import DataError, ModelError
from unus_edge.messages import Release
from unus_edge.onnx_io import Evaluator, OnnxModel, fingerprint, load_model, read_parameters, save_model

__all__ = ["MODEL_FILE", "StoredRelease", "already_stored", "keep_release", "load_release", "predict",
           "probabilities_of", "store_release"]

if TYPE_CHECKING:
    from unus_edge.device._daemon import Device

logger = logging.getLogger("unus_edge.device")

MODEL_FILE = "model.onnx"
_META_FILE = "release.json"
_PREVIOUS = {"model.onnx": "model.previous.onnx", "release.json": "release.previous.json"}


class StoredRelease:
    """A release as stored: its model (with the release's weights) and its metadata."""

    def __init__(self, model: OnnxModel, meta: dict[str, Any], path: Path) -> None:
        self.model = model
        self.meta = meta
        self.path = path

    @property
    def version(self) -> int:
        return int(self.meta.get("version", -1))

    @property
    def task(self) -> str:
        """``classification`` or ``regression`` (releases stored before 2026-12-04 say nothing: classes)."""
        return str(self.meta.get("task") or "classification")


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _keep_previous(folder: Path, name: str) -> None:
    current = folder / name
    if current.exists():
        _write_atomically(folder / _PREVIOUS[name], lambda target: shutil.copyfile(current, target))


def store_release(folder: str | os.PathLike[str], release: Release, model: OnnxModel) -> Path:
    """Check ``release`` against the device's ``model`` and store it in ``folder`` (``~`` expanded;
    see the module docstring)."""
    folder = Path(folder).expanduser()
    if release.fingerprint != fingerprint(model):
        raise ModelError("wrong_fingerprint", f"release {release.version} is for model {release.fingerprint}, this "
                                              f"device runs {fingerprint(model)}", model=model.name)
    from unus_edge.aggregator import check_tensors  # the same check as for any model message

    template = read_parameters(model)
    problem = check_tensors(release.tensors, template)
    if problem is not None:
        raise ModelError(problem[0], f"release {release.version}: {problem[1]}", model=model.name)
    folder.mkdir(parents=True, exist_ok=True)
    params = {name: np.asarray(value) for name, value in release.tensors.items()}
    meta = {"job": release.job, "version": release.version, "server_round": release.server_round,
            "fingerprint": release.fingerprint, "eval_accuracy": release.eval_accuracy,
            "eval_mse": release.eval_mse, "task": release.task,
            "aggregator_session": release.aggregator_session, "stored_at": time.time()}
    for name in (MODEL_FILE, _META_FILE):
        _keep_previous(folder, name)
    _write_atomically(folder / MODEL_FILE, lambda target: save_model(model, target, params))
    _write_atomically(folder / _META_FILE, lambda target: target.write_text(json.dumps(meta, indent=2) + "\n"))
    return folder / MODEL_FILE


def already_stored(folder: str | os.PathLike[str], release: Release) -> bool:
    """Whether ``folder``'s current release is ``release`` (job, version and model): the retained
    copy comes again at every reconnection, and storing it again would push the last good
    release out of ``model.previous.onnx`` for a copy of the current one."""
    try:
        meta = json.loads((Path(folder).expanduser() / _META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("job"), meta.get("version"), meta.get("fingerprint")) == (
        release.job, release.version, release.fingerprint)


async def keep_release(device: Device, release: Release) -> None:
    """Store a release that arrived (in a worker thread); a bad one is logged and changes nothing,
    and one already stored is not stored again."""
    folder = device.settings.release_dir
    if await asyncio.to_thread(already_stored, folder, release):
        logger.debug("release %d of job %s is already stored", release.version, release.job)
        return
    try:
        path = await asyncio.to_thread(store_release, folder, release, device.graph.model)
    except (ModelError, OSError) as error:
        logger.error("release %d of job %s not stored: %s", release.version, release.job, error)
        return
    score = (f"mse {release.eval_mse:.6g}" if release.eval_mse is not None else
             "accuracy -" if release.eval_accuracy is None else f"accuracy {release.eval_accuracy:.4f}")
    logger.info("release %d of job %s stored in %s (%s)", release.version, release.job, path, score)


def load_release(folder: Path) -> StoredRelease:
    """The current release in ``folder``, or the previous one if the current cannot be read."""
    failures = []
    for model_name, meta_name in ((MODEL_FILE, _META_FILE), (_PREVIOUS[MODEL_FILE], _PREVIOUS[_META_FILE])):
        try:
            model = load_model(folder / model_name)
            meta = json.loads((folder / meta_name).read_text())
        except (OSError, ValueError, ModelError) as error:
            failures.append(f"{model_name}: {error}")
            continue
        return StoredRelease(model, meta, folder / model_name)
    raise DataError("no_release", f"no readable release ({'; '.join(failures)}); a device stores one when a job "
                                  "it took part in finishes (device.release_dir)", path=str(folder))


def predict(release: StoredRelease, inputs: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """``(classes, probabilities)`` of the release's model for every row of ``inputs``; for a
    regression's release (``task``), ``(values, values)``: the model's outputs themselves."""
    logits = np.asarray(Evaluator(release.model).predict(read_parameters(release.model), inputs), np.float64)
    if release.task == "regression":
        return logits, logits
    probabilities = probabilities_of(logits)
    return probabilities.argmax(axis=1), probabilities


def probabilities_of(logits: NDArray[Any]) -> NDArray[np.float64]:
    """Softmax of each row of a classifier's outputs (shifted by the row's maximum: no overflow)."""
    if logits.ndim != 2:
        raise ModelError(f"bad_output: a classifier's outputs are (n, classes), got {logits.shape}")
    shifted = np.exp(np.asarray(logits, np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]
