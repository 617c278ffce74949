"""Datasets, partitions and per-device partition files.

* :class:`Dataset`: float32 examples ``x`` (images ``(n, 1, 28, 28)`` in ``[0, 1]``), int64
  labels ``y``, ``num_classes``; validated on construction, arrays read-only.
* Sources: :func:`load_mnist` (IDX files, raw or gzip, via :func:`read_idx`),
  :func:`synthetic` (deterministic MNIST-shaped stand-in), :func:`load_dataset` (by name).
  :func:`resolve_data_dir` turns a flag/config value or ``$UNUS_DATA_DIR`` into the data folder;
  :func:`fetch_dataset` downloads MNIST or Fashion-MNIST, checked, into :func:`cache_dir`.
* Partitions: :func:`partition` with schemes ``iid``, ``shards`` (McMahan et al. 2017) and
  ``dirichlet`` (Hsu et al. 2019) -> disjoint int64 index arrays covering every example once.
* A device's own data: :class:`LocalData` and :func:`load_source` (``.npz``, CSV, a folder of
  images, IDX; a held-out split; re-read when it changes).
* Files: :func:`save_partition` / :func:`load_partition` (``.npz``, atomic, never pickled) and
  :func:`split_to_directory` (``device_000.npz`` ... plus ``manifest.json``).

Every failure is a :class:`unus_edge.errors.DataError` with a stable ``reason`` code. The full
description of formats and schemes is ``docs/data.md``.
"""

from __future__ import annotations

from unus_edge.data._dataset import REGRESSION, Dataset, label_histogram
from unus_edge.data._fetch import SOURCES, cache_dir, fetch_dataset, verify_file
from unus_edge.data._files import load_partition, save_partition
from unus_edge.data._idx import read_idx
from unus_edge.data._mnist import load_dataset, load_mnist, resolve_data_dir
from unus_edge.data._partition import (
    Scheme,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from unus_edge.data._sources import (
    FORMATS,
    LocalData,
    detect_format,
    holdout_split,
    load_inputs,
    load_source,
    write_source,
)
from unus_edge.data._split import ProgressCallback, split_to_directory
from unus_edge.data._synthetic import synthetic

__all__ = [
    "FORMATS",
    "REGRESSION",
    "SOURCES",
    "Dataset",
    "LocalData",
    "ProgressCallback",
    "Scheme",
    "cache_dir",
    "detect_format",
    "fetch_dataset",
    "holdout_split",
    "label_histogram",
    "load_dataset",
    "load_inputs",
    "load_mnist",
    "load_partition",
    "load_source",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "read_idx",
    "resolve_data_dir",
    "save_partition",
    "split_to_directory",
    "synthetic",
    "verify_file",
    "write_source",
]
