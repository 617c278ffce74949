"""A device's own data, in the formats its sensors and tools write (issue 16).

``device.data`` names one of:

* ``npz``: a partition file (:func:`~unus_edge.data.save_partition`, ``unus-edge data split``);
* ``csv``: a CSV file with a header row, one example per row: the label column
  (``device.csv_label``, default ``label``, non-negative integers) and the feature columns
  (``device.csv_features``, comma-separated names; default every other column), numbers.
  With ``device.task = "regression"`` the label columns (``csv_label``, comma-separated: one
  target or several) hold any finite numbers, the targets the model fits (mean squared error);
* ``images``: a folder with one subfolder per class (``0``, ``1``... or names, sorted), each
  holding grayscale or colour images (PNG, JPEG, BMP, PGM; read as grayscale) of the size the
  model takes; needs Pillow (``pip install pillow``);
* ``idx``: a folder with one ``*images-idx3-ubyte[.gz]`` file and its ``*labels-idx1-ubyte[.gz]``
  (MNIST's format; ``train-`` files are preferred when a folder holds several), or the images
  file itself.

``device.data_format = "auto"`` (the default) tells them apart by the path: a ``.npz`` or
``.csv`` file, a folder with IDX files, or any other folder (images). Pixel values are scaled
to [0, 1]. A regression source is a CSV file or an ``npz`` written with float targets; images and
IDX hold classes. Every malformed input is a :class:`~unus_edge.errors.DataError` that names the file,
the row or the image, and the reason: nothing is skipped silently.

A folder or file can grow: :meth:`LocalData.refresh` notices a changed source (names, sizes and
modification times) and reads it again. ``holdout`` keeps a seeded fraction of the examples
aside for evaluation (:attr:`LocalData.held_out`); the rest is :attr:`LocalData.train`.
"""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from unus_edge.data._dataset import REGRESSION, Dataset, data_error
from unus_edge.data._files import load_partition, save_partition
from unus_edge.data._idx import read_idx

__all__ = [
    "FORMATS",
    "TASKS",
    "LocalData",
    "detect_format",
    "holdout_split",
    "load_inputs",
    "load_source",
    "write_source",
]

FORMATS = ("npz", "csv", "images", "idx")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm"}


def detect_format(path: Path) -> str:
    """The format of ``path`` from its name and, for a folder, its contents."""
    if path.is_dir():
        return "idx" if any(path.glob("*images-idx3-ubyte*")) else "images"
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".csv":
        return "csv"
    if "-idx3-ubyte" in path.name:
        return "idx"
    if not path.exists():
        raise data_error("not_found", "no such file or folder", path=path)
    raise data_error("unknown_format", "not a .npz or .csv file, an IDX file or a folder: set device.data_format "
                                       f"({', '.join(FORMATS)})", path=path)


TASKS = ("classification", "regression")


def load_source(path: Path, *, data_format: str = "auto", label_column: str = "label",
                feature_columns: tuple[str, ...] = (), image_size: tuple[int, int] = (28, 28),
                task: str = "classification") -> Dataset:
    """Read a device's data source into a :class:`Dataset` (see the module docstring); ``task``
    says whether its labels are classes or regression targets, and a source that holds the other
    kind is refused (``task_mismatch``)."""
    if task not in TASKS:
        raise data_error("bad_task", f"device.task must be {' or '.join(TASKS)}, not {task!r}", path=path)
    found = detect_format(path) if data_format == "auto" else data_format
    regression = task == "regression"
    if found == "npz":
        data = load_partition(path)
        if data.is_regression != regression:
            held = "regression targets" if data.is_regression else f"{data.num_classes} classes"
            raise data_error("task_mismatch", f"the file holds {held}; device.task is {task!r}", path=path)
        return data
    if found == "csv":
        if regression:
            return _load_csv_targets(path, label_column, feature_columns)
        return _load_csv(path, label_column, feature_columns)
    if regression and found in ("images", "idx"):
        raise data_error("task_mismatch", f"{found} sources hold classes; a regression source is a CSV file "
                                          "or an .npz with float targets", path=path)
    if found == "images":
        return _load_images(path, image_size)
    if found == "idx":
        return _load_idx(path)
    raise data_error("unknown_format", f"device.data_format must be auto or one of {', '.join(FORMATS)}, "
                                       f"not {found!r}", path=path)


def load_inputs(path: Path, *, label_column: str = "label", feature_columns: tuple[str, ...] = (),
                image_size: tuple[int, int] = (28, 28)) -> tuple[list[str], Any]:
    """Inputs to predict on, without labels: ``(names, x)``. ``path`` is an image, a folder of
    images (all of them, sorted, subfolders included), a CSV file (the feature columns; a label
    column is ignored if present) or a ``.npz`` file with ``x``. Names say which row is which."""
    if path.is_dir() or path.suffix.lower() in _IMAGE_SUFFIXES:
        files = (sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) if path.is_dir()
                 else [path])
        if not files:
            raise data_error("empty", f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))})", path=path)
        return [str(file.relative_to(path) if path.is_dir() else file.name) for file in files], \
            np.stack([_read_image(file, image_size) for file in files])[:, None]
    if path.suffix == ".csv":
        rows = _csv_rows(path)
        header = rows[0]
        names = list(feature_columns) or [name for name in header if name != label_column]
        missing = [name for name in names if name not in header]
        if missing:
            raise data_error("bad_column", f"no feature column {', '.join(missing)!r}", path=path)
        return [f"row {number}" for number in range(2, len(rows) + 1)], _features(rows, header, names, path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                x = np.asarray(archive["x"])
        except (OSError, KeyError, ValueError) as error:
            raise data_error("unreadable", f"not an .npz with an array x ({error})", path=path) from error
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        return [f"x[{index}]" for index in range(len(x))], x
    raise data_error("unknown_format", "inputs are an image, a folder of images, a .csv or a .npz file", path=path)


def _csv_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise data_error("unreadable", str(error), path=path) from error
    if not rows:
        raise data_error("empty", "no header row", path=path)
    rows[0] = [name.strip() for name in rows[0]]
    return rows


def _features(rows: list[list[str]], header: list[str], names: list[str], path: Path, what: str = "feature") -> Any:
    at = [header.index(name) for name in names]
    x = np.empty((len(rows) - 1, len(names)), np.float32)
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise data_error("bad_row", f"row {number}: {len(row)} fields, the header has {len(header)}", path=path)
        for column, index in enumerate(at):
            try:
                x[number - 2, column] = float(row[index])
            except ValueError:
                raise data_error("bad_row", f"row {number}, column {names[column]!r}: {row[index]!r} is not a number",
                                 path=path) from None
    if not np.isfinite(x).all():
        line = int(np.argwhere(~np.isfinite(x))[0][0]) + 2
        raise data_error("bad_row", f"row {line}: a {what} is NaN or infinite", path=path)
    return x


def _read_image(file: Path, size: tuple[int, int]) -> Any:
    try:
        from PIL import Image
    except ImportError as error:
        raise data_error("missing_dependency", "reading images needs Pillow: pip install pillow",
                         path=file) from error
    try:
        with Image.open(file) as image:
            gray = np.asarray(image.convert("L"), np.float32)
    except OSError as error:
        raise data_error("bad_image", f"not a readable image ({error})", path=file) from error
    if gray.shape != size:
        raise data_error("bad_image", f"{gray.shape[1]}x{gray.shape[0]} pixels; the model takes {size[1]}x{size[0]}",
                         path=file)
    return gray / 255.0


def write_source(data: Dataset, path: Path, data_format: str) -> Path:
    """Write ``data`` as a device source :func:`load_source` reads back: ``csv`` (``path`` a file:
    ``label`` then ``x0``... flattened), ``idx`` or ``images`` (``path`` a folder; pixels in [0, 1]
    are stored as 0-255), or ``npz``. Returns the path written."""
    if data_format == "npz":
        save_partition(path, data)
        return path
    if data_format == "csv":
        flat = data.x.reshape(len(data), -1)
        temporary = path.with_name(path.name + ".tmp")
        targets = data.y.reshape(len(data), -1) if data.is_regression else data.y[:, None]
        names = ["label"] if targets.shape[1] == 1 else [f"label{i}" for i in range(targets.shape[1])]
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([*names, *(f"x{i}" for i in range(flat.shape[1]))])
            for label, row in zip(targets.tolist(), flat.tolist(), strict=True):
                writer.writerow([*(repr(v) if data.is_regression else v for v in label),
                                 *(f"{value:.9g}" if data.is_regression else f"{value:.6g}" for value in row)])
        os.replace(temporary, path)
        return path
    if data.is_regression:
        raise data_error("task_mismatch", f"{data_format} sources hold classes: write regression data as csv or npz",
                         path=path)
    pixels = np.clip(np.rint(data.x.reshape(len(data), *data.x.shape[-2:]) * 255), 0, 255).astype(np.uint8)
    path.mkdir(parents=True, exist_ok=True)
    if data_format == "idx":
        for name, array in (("train-images-idx3-ubyte.gz", pixels), ("train-labels-idx1-ubyte.gz",
                                                                     data.y.astype(np.uint8))):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(path / name, "wb") as handle:
                handle.write(header + array.tobytes())
        return path
    if data_format == "images":
        from PIL import Image

        for index, (image, label) in enumerate(zip(pixels, data.y.tolist(), strict=True)):
            folder = path / str(label)
            folder.mkdir(exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:06d}.png")
        return path
    raise data_error("unknown_format", f"cannot write {data_format!r}: one of {', '.join(FORMATS)}", path=path)


def _label(text: str, where: str, path: Path) -> int:
    try:
        value = float(text)
    except ValueError:
        raise data_error("bad_label", f"{where}: label {text!r} is not a number", path=path) from None
    if value < 0 or value != int(value):
        raise data_error("bad_label", f"{where}: label {text!r} must be an integer >= 0", path=path)
    return int(value)


def _load_csv(path: Path, label_column: str, feature_columns: tuple[str, ...]) -> Dataset:
    rows = _csv_rows(path)
    header = rows[0]
    if label_column not in header:
        raise data_error("bad_column", f"no label column {label_column!r} (columns: {', '.join(header)}); "
                                       "set device.csv_label", path=path)
    names = list(feature_columns) or [name for name in header if name != label_column]
    missing = [name for name in names if name not in header]
    if missing or not names:
        raise data_error("bad_column", f"no feature column {', '.join(missing)!r}" if missing else "no feature column",
                         path=path)
    label_at = header.index(label_column)
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise data_error("bad_row", f"row {number}: {len(row)} fields, the header has {len(header)}", path=path)
    y = np.array([_label(row[label_at], f"row {number}", path) for number, row in enumerate(rows[1:], start=2)],
                 np.int64)
    x = _features(rows, header, names, path)
    return Dataset(x, y, int(y.max()) + 1 if len(y) else 1)


def _load_csv_targets(path: Path, label_column: str, feature_columns: tuple[str, ...]) -> Dataset:
    """A regression CSV: the target columns (``label_column``, comma-separated) and the features."""
    rows = _csv_rows(path)
    header = rows[0]
    targets = [name.strip() for name in label_column.split(",") if name.strip()]
    absent = [name for name in targets if name not in header]
    if absent or not targets:
        raise data_error("bad_column", f"no target column {', '.join(absent) or label_column!r} (columns: "
                                       f"{', '.join(header)}); set device.csv_label", path=path)
    names = list(feature_columns) or [name for name in header if name not in targets]
    missing = [name for name in names if name not in header]
    if missing or not names:
        raise data_error("bad_column", f"no feature column {', '.join(missing)!r}" if missing else "no feature column",
                         path=path)
    x = _features(rows, header, names, path)
    y = _features(rows, header, targets, path, what="target")
    return Dataset(x, y[:, 0].copy() if len(targets) == 1 else y, REGRESSION)


def _load_images(folder: Path, size: tuple[int, int]) -> Dataset:
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise data_error("empty", "no class subfolders (one per class, e.g. 0/, 1/ ...)", path=folder)
    numeric = all(name.isdigit() for name in classes)
    images: list[Any] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        label = int(name) if numeric else index
        for file in sorted((folder / name).iterdir()):
            if file.suffix.lower() in _IMAGE_SUFFIXES:
                images.append(_read_image(file, size))
                labels.append(label)
    if not images:
        raise data_error("empty", f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in the class folders", path=folder)
    x = np.stack(images).astype(np.float32)[:, None]
    y = np.asarray(labels, np.int64)
    return Dataset(x, y, max(int(y.max()) + 1, len(classes)))


def _load_idx(path: Path) -> Dataset:
    if path.is_dir():
        candidates = sorted(path.glob("*images-idx3-ubyte*"), key=lambda p: (not p.name.startswith("train"), p.name))
        if not candidates:
            raise data_error("not_found", "no *images-idx3-ubyte[.gz] file", path=path)
        path = candidates[0]
    labels_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if not labels_path.exists():
        raise data_error("not_found", f"no labels file {labels_path.name} beside the images", path=path)
    images, labels = read_idx(path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise data_error("bad_shape", f"images {images.shape} and labels {labels.shape} do not pair up", path=path)
    x = (images.astype(np.float32) / 255.0)[:, None]
    y = labels.astype(np.int64)
    return Dataset(x, y, int(y.max()) + 1 if len(y) else 1)


def holdout_split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """``(train, held_out)``: a seeded ``fraction`` of the examples aside (none when 0)."""
    if not fraction or len(data) < 2:
        return data, None
    order = np.random.default_rng(seed).permutation(len(data))
    cut = max(1, round(fraction * len(data)))
    kept, aside = np.sort(order[cut:]), np.sort(order[:cut])
    return (Dataset(data.x[kept], data.y[kept], data.num_classes),
            Dataset(data.x[aside], data.y[aside], data.num_classes))


class LocalData:
    """A device's data source, its held-out split, and whether it changed since it was read."""

    def __init__(self, path: Path, *, holdout: float = 0.0, seed: int = 0, **options: Any) -> None:
        if not 0.0 <= holdout < 1.0:
            raise data_error("bad_holdout", f"device.holdout must be in [0, 1), not {holdout}")
        self.path = path
        self.holdout = holdout
        self.seed = seed
        self.options = options
        self._signature = self._fingerprint()
        self.train, self.held_out = self._split(load_source(path, **options))

    def refresh(self) -> bool:
        """Read the source again if it changed (files added, replaced, removed); whether it did."""
        signature = self._fingerprint()
        if signature == self._signature:
            return False
        self.train, self.held_out = self._split(load_source(self.path, **self.options))
        self._signature = signature
        return True

    def _split(self, data: Dataset) -> tuple[Dataset, Dataset | None]:
        return holdout_split(data, self.holdout, self.seed)

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        paths = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        found = []
        for file in paths:
            try:
                stat = file.stat()
            except OSError:
                continue
            found.append((os.fspath(file.relative_to(self.path) if self.path.is_dir() else file.name), stat.st_size,
                          stat.st_mtime_ns))
        return tuple(found)
