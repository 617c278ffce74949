"""split_to_directory: device files plus manifest, re-splitting, and refusing foreign folders."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from unus_edge.data import Dataset, load_partition, split_to_directory, synthetic
from unus_edge.errors import DataError


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return synthetic(1000, seed=7)


def read_manifest(folder: Path) -> dict[str, object]:
    content = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert isinstance(content, dict)
    return content


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_split_writes_files_and_manifest_that_load_back(tmp_path: Path, dataset: Dataset, scheme: str) -> None:
    out = tmp_path / "split"
    paths = split_to_directory(dataset, out, num_parts=8, scheme=scheme, seed=3)  # type: ignore[arg-type]
    assert [path.name for path in paths] == [f"device_{index:03d}.npz" for index in range(8)]
    assert sorted(entry.name for entry in out.iterdir()) == sorted([*(p.name for p in paths), "manifest.json"])

    manifest = read_manifest(out)
    assert manifest["format"] == "unus-edge-split"
    assert manifest["scheme"] == scheme
    assert manifest["seed"] == 3
    assert manifest["num_parts"] == 8
    assert manifest["num_examples"] == 1000
    assert manifest["num_classes"] == 10
    assert manifest["feature_shape"] == [1, 28, 28]
    devices = manifest["devices"]
    assert isinstance(devices, list)
    assert len(devices) == 8

    xs, ys = [], []
    for path, device in zip(paths, devices, strict=True):
        part = load_partition(path)
        assert device["device_id"] == path.stem
        assert device["file"] == path.name
        assert device["num_examples"] == len(part)
        assert device["label_histogram"] == np.bincount(part.y, minlength=10).tolist()
        assert device["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        xs.append(part.x)
        ys.append(part.y)
    # Together the devices hold exactly the dataset's examples (compare as sorted rows).
    all_x = np.concatenate(xs).reshape(1000, -1)
    original = dataset.x.reshape(1000, -1)
    assert sorted(map(bytes, all_x)) == sorted(map(bytes, original))
    assert np.bincount(np.concatenate(ys), minlength=10).tolist() == manifest["label_histogram"]


def test_scheme_parameters_are_recorded(tmp_path: Path, dataset: Dataset) -> None:
    split_to_directory(dataset, tmp_path / "d", num_parts=4, scheme="dirichlet", seed=0, alpha=0.3)
    manifest = read_manifest(tmp_path / "d")
    assert manifest["alpha"] == 0.3
    assert manifest["min_examples"] == 10
    split_to_directory(dataset, tmp_path / "s", num_parts=4, scheme="shards", seed=0, shards_per_part=3)
    assert read_manifest(tmp_path / "s")["shards_per_part"] == 3


def test_split_is_deterministic(tmp_path: Path, dataset: Dataset) -> None:
    first = split_to_directory(dataset, tmp_path / "a", num_parts=5, scheme="dirichlet", seed=11)
    second = split_to_directory(dataset, tmp_path / "b", num_parts=5, scheme="dirichlet", seed=11)
    for one, two in zip(first, second, strict=True):
        np.testing.assert_array_equal(load_partition(one).y, load_partition(two).y)
        np.testing.assert_array_equal(load_partition(one).x, load_partition(two).x)


def test_progress_callback_and_logging(tmp_path: Path, dataset: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[int, int, str]] = []
    with caplog.at_level(logging.INFO, logger="unus_edge.data"):
        split_to_directory(
            dataset,
            tmp_path,
            num_parts=3,
            scheme="iid",
            seed=0,
            progress=lambda done, total, path: calls.append((done, total, path.name)),
        )
    assert calls == [(1, 3, "device_000.npz"), (2, 3, "device_001.npz"), (3, 3, "device_002.npz")]
    assert sum("device_001.npz" in record.getMessage() for record in caplog.records) == 1


def test_resplit_of_a_previous_split_replaces_it(tmp_path: Path, dataset: Dataset) -> None:
    split_to_directory(dataset, tmp_path, num_parts=10, scheme="iid", seed=0)
    (tmp_path / ".device_003.npz.abc123.tmp").write_bytes(b"left over by a crash")
    paths = split_to_directory(dataset, tmp_path, num_parts=4, scheme="shards", seed=1)
    names = sorted(entry.name for entry in tmp_path.iterdir())
    assert names == ["device_000.npz", "device_001.npz", "device_002.npz", "device_003.npz", "manifest.json"]
    assert read_manifest(tmp_path)["num_parts"] == 4
    assert sum(len(load_partition(path)) for path in paths) == 1000


def test_interrupted_split_without_manifest_is_recognised(tmp_path: Path, dataset: Dataset) -> None:
    split_to_directory(dataset, tmp_path, num_parts=3, scheme="iid", seed=0)
    (tmp_path / "manifest.json").unlink()
    split_to_directory(dataset, tmp_path, num_parts=3, scheme="iid", seed=0)
    assert (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize(
    "foreign",
    ["notes.txt", "device_1.npz", "device_000.npy", "subdir/"],
)
def test_foreign_folder_is_refused_and_untouched(tmp_path: Path, dataset: Dataset, foreign: str) -> None:
    if foreign.endswith("/"):
        (tmp_path / foreign).mkdir()
    else:
        (tmp_path / foreign).write_text("keep me")
    before = sorted(entry.name for entry in tmp_path.iterdir())
    with pytest.raises(DataError) as caught:
        split_to_directory(dataset, tmp_path, num_parts=2, scheme="iid", seed=0)
    assert caught.value.reason == "not_a_split"
    assert caught.value.path == str(tmp_path)
    assert "overwrite=True" in str(caught.value)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == before


def test_foreign_manifest_is_refused(tmp_path: Path, dataset: Dataset) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError) as caught:
        split_to_directory(dataset, tmp_path, num_parts=2, scheme="iid", seed=0)
    assert caught.value.reason == "not_a_split"
    (tmp_path / "manifest.json").write_text("not json")
    with pytest.raises(DataError):
        split_to_directory(dataset, tmp_path, num_parts=2, scheme="iid", seed=0)


def test_overwrite_writes_beside_foreign_files_without_deleting_them(tmp_path: Path, dataset: Dataset) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    split_to_directory(dataset, tmp_path, num_parts=2, scheme="iid", seed=0, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "manifest.json").exists()
    assert (tmp_path / "device_001.npz").exists()


def test_bad_arguments_do_not_touch_the_folder(tmp_path: Path, dataset: Dataset) -> None:
    out = tmp_path / "never"
    with pytest.raises(DataError) as caught:
        split_to_directory(dataset, out, num_parts=0, scheme="iid", seed=0)
    assert caught.value.reason == "bad_num_parts"
    with pytest.raises(DataError) as caught:
        split_to_directory(dataset, out, num_parts=2, scheme="nope", seed=0)  # type: ignore[arg-type]
    assert caught.value.reason == "unknown_scheme"
    assert not out.exists()


def test_output_path_that_is_a_file(tmp_path: Path, dataset: Dataset) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError) as caught:
        split_to_directory(dataset, tmp_path / "file", num_parts=2, scheme="iid", seed=0)
    assert caught.value.reason == "not_a_directory"


def test_many_devices_widen_the_file_names(tmp_path: Path) -> None:
    small = synthetic(1500, seed=0)
    paths = split_to_directory(small, tmp_path, num_parts=1001, scheme="iid", seed=0)
    assert paths[0].name == "device_0000.npz"
    assert paths[-1].name == "device_1000.npz"
