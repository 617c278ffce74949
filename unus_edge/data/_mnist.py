"""Finding the data folder, loading MNIST, and the ``load_dataset`` entry point.

Decisions
---------
* Where the data lives is a *setting*, never a default path baked into the code:
  :func:`resolve_data_dir` returns the explicit value (a ``--data-dir`` flag or the
  ``evaluation.data_dir`` config key, passed in by the caller), else ``$UNUS_DATA_DIR``, else
  ``None``. An empty string counts as "not set".
* MNIST files may be raw or gzipped (``train-images-idx3-ubyte`` or ``...ubyte.gz``); when
  both exist the raw file wins (no decompression on a Raspberry Pi). A missing or malformed
  file raises :class:`DataError` naming it and listing what an MNIST folder must hold.
* Memory: the uint8 images (47 MB for the training set) are converted to float32 exactly once,
  straight into the final ``(n, 1, 28, 28)`` array (188 MB); ``num_examples`` truncates *before*
  that conversion, so a small subset never pays for the full set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from unus_edge.data._dataset import Dataset, PathLike, as_path, data_error, decode_pixels
from unus_edge.data._idx import read_idx
from unus_edge.data._synthetic import synthetic

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_NUM_EXAMPLES",
    "MNIST_FILES",
    "load_dataset",
    "load_mnist",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)

#: The environment variable naming the folder that holds the datasets.
DATA_DIR_ENV = "UNUS_DATA_DIR"

#: split -> (images file, labels file), without the optional ``.gz`` suffix.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Size of each split when ``num_examples`` is not given (MNIST's own sizes).
DEFAULT_NUM_EXAMPLES: dict[str, int] = {"train": 60_000, "test": 10_000}

_IMAGE_SHAPE = (28, 28)
_NUM_CLASSES = 10
_EXPECTED_LISTING = ", ".join(f"{name}[.gz]" for pair in MNIST_FILES.values() for name in pair)


def resolve_data_dir(explicit: PathLike | None = None) -> Path | None:
    """The data folder: ``explicit`` if given, else ``$UNUS_DATA_DIR``, else the fetch cache of
    MNIST (``~/.cache/unus-edge/mnist``) if it holds the files, else ``None``.

    ``explicit`` is what the user passed (``--data-dir`` or the ``evaluation.data_dir`` config key).
    Empty strings count as unset. ``~`` is expanded. The folder is not checked here.
    """
    if explicit is not None and os.fspath(explicit) != "":
        return as_path(explicit).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    from unus_edge.data._fetch import cache_dir

    cached = cache_dir("mnist")  # where `unus-edge data fetch mnist` puts it
    return cached if (cached / f"{MNIST_FILES['train'][0]}.gz").is_file() else None


def _check_split(split: str) -> None:
    if split not in MNIST_FILES:
        raise data_error("bad_split", f"split must be 'train' or 'test', got {split!r}")


def _find_file(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    try:
        present = sorted(entry.name for entry in data_dir.iterdir())
    except OSError:
        present = []
    shown = ", ".join(present[:20]) + (" ..." if len(present) > 20 else "") if present else "nothing"
    raise data_error(
        "missing_file",
        f"neither {name} nor {name}.gz exists; an MNIST folder holds {_EXPECTED_LISTING} (this folder holds: {shown})",
        path=data_dir / name,
    )


def _check_mnist_arrays(images: NDArray[Any], labels: NDArray[Any], images_path: Path, labels_path: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != _IMAGE_SHAPE:
        raise data_error(
            "bad_shape",
            f"expected uint8 images of shape (n, 28, 28), got {images.dtype} {images.shape}",
            path=images_path,
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise data_error(
            "bad_shape", f"expected uint8 labels of shape (n,), got {labels.dtype} {labels.shape}", path=labels_path
        )
    if labels.shape[0] != images.shape[0]:
        raise data_error(
            "length_mismatch",
            f"{labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}",
            path=labels_path,
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise data_error("bad_labels", f"label {int(labels.max())} is not a digit 0-9", path=labels_path)


def load_mnist(
    data_dir: PathLike | None,
    split: Literal["train", "test"],
    *,
    num_examples: int | None = None,
) -> Dataset:
    """Load an MNIST split from ``data_dir`` as float32 ``(n, 1, 28, 28)`` in ``[0, 1]``.

    ``data_dir`` ``None`` falls back to ``$UNUS_DATA_DIR`` (see :func:`resolve_data_dir`).
    ``num_examples`` keeps the first ``num_examples`` examples of the split.
    Raises :class:`DataError` naming the missing or malformed file.
    """
    _check_split(split)
    folder = resolve_data_dir(data_dir)
    if folder is None:
        raise data_error(
            "no_data_dir",
            f"no MNIST folder given: pass --data-dir, set the evaluation.data_dir config key or set {DATA_DIR_ENV}",
        )
    if not folder.is_dir():
        raise data_error("not_a_directory", "the MNIST folder does not exist or is not a folder", path=folder)
    images_name, labels_name = MNIST_FILES[split]
    images_path = _find_file(folder, images_name)
    labels_path = _find_file(folder, labels_name)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    _check_mnist_arrays(images, labels, images_path, labels_path)
    available = int(labels.shape[0])
    count = available if num_examples is None else _check_num_examples(num_examples, available)
    x = decode_pixels(images[:count].reshape(count, 1, *_IMAGE_SHAPE))
    del images  # the uint8 buffer can go as soon as the float32 copy exists
    y = labels[:count].astype(np.int64)
    logger.info("loaded MNIST %s: %d examples from %s", split, count, folder)
    return Dataset(x=x, y=y, num_classes=_NUM_CLASSES)


def _check_num_examples(num_examples: int, available: int | None) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 1:
        raise data_error("bad_num_examples", f"num_examples must be an integer >= 1, got {num_examples!r}")
    if available is not None and num_examples > available:
        raise data_error("bad_num_examples", f"num_examples={num_examples} but the split has {available}")
    return int(num_examples)


def load_dataset(
    name: Literal["mnist", "synthetic", "digits"],
    split: Literal["train", "test"],
    *,
    data_dir: PathLike | None = None,
    seed: int = 0,
    num_examples: int | None = None,
) -> Dataset:
    """Load a dataset by name: ``"mnist"`` (from the data folder), ``"digits"`` (shipped in the
    package, :mod:`unus_edge.data._digits`) or ``"synthetic"``.

    * ``mnist``: ``data_dir`` (else ``$UNUS_DATA_DIR``); ``num_examples`` keeps the first ones;
      ``seed`` is ignored (the files fix the examples).
    * ``synthetic``: generated from ``seed``; ``num_examples`` defaults to MNIST's split size
      (60 000 train, 10 000 test); ``data_dir`` is ignored.
    """
    _check_split(split)
    if name == "mnist":
        return load_mnist(data_dir, split, num_examples=num_examples)
    if name == "synthetic":
        count = DEFAULT_NUM_EXAMPLES[split] if num_examples is None else _check_num_examples(num_examples, None)
        return synthetic(count, seed=seed, split=split)
    if name == "digits":
        from unus_edge.data._digits import load_digits

        digits = load_digits(split)
        if num_examples is None:
            return digits
        count = _check_num_examples(num_examples, len(digits))
        return Dataset(digits.x[:count], digits.y[:count], digits.num_classes)
    raise data_error("unknown_dataset", f"dataset must be 'mnist', 'digits' or 'synthetic', got {name!r}")
