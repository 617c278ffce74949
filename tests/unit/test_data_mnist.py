"""Loading MNIST (real and fake folders), the data-folder setting and load_dataset."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from unus_edge.data import load_dataset, load_mnist, resolve_data_dir
from unus_edge.errors import DataError

TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}[array.dtype]
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fake_mnist(folder: Path, *, num_train: int = 30, num_test: int = 10, compressed: bool = True) -> Path:
    """A tiny MNIST folder: image i is filled with the value i, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = (np.arange(count, dtype=np.int64)[:, None, None] * np.ones((1, 28, 28), np.int64)).astype(np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            content = idx_bytes(array)
            if compressed:
                (folder / f"{name}.gz").write_bytes(gzip.compress(content))
            else:
                (folder / name).write_bytes(content)
    return folder


# -- real MNIST -----------------------------------------------------------------------------


def test_real_mnist_train(mnist_dir: Path) -> None:
    dataset = load_mnist(mnist_dir, "train")
    assert len(dataset) == 60_000
    assert dataset.x.shape == (60_000, 1, 28, 28)
    assert dataset.x.dtype == np.float32
    assert dataset.y.dtype == np.int64
    assert dataset.num_classes == 10
    assert float(dataset.x.min()) == 0.0
    assert float(dataset.x.max()) == 1.0
    assert dataset.label_histogram().tolist() == TRAIN_LABEL_COUNTS
    assert dataset.x.flags.c_contiguous


def test_real_mnist_test_split_and_subset(mnist_dir: Path) -> None:
    test = load_mnist(mnist_dir, "test")
    assert test.x.shape == (10_000, 1, 28, 28)
    first = load_mnist(mnist_dir, "test", num_examples=100)
    np.testing.assert_array_equal(first.x, test.x[:100])
    np.testing.assert_array_equal(first.y, test.y[:100])


def test_real_mnist_through_the_environment(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNUS_DATA_DIR", str(mnist_dir))
    assert len(load_dataset("mnist", "test", num_examples=10)) == 10


# -- fake folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_fake_folder(tmp_path: Path, compressed: bool) -> None:
    folder = fake_mnist(tmp_path / "mnist", compressed=compressed)
    train = load_mnist(folder, "train")
    assert len(train) == 30
    assert train.y.tolist() == [i % 10 for i in range(30)]
    # image i holds the pixel value i everywhere: decoded as i / 255, in float32
    np.testing.assert_array_equal(train.x[:, 0, 0, 0], np.arange(30, dtype=np.float32) / np.float32(255))
    assert len(load_mnist(str(folder), "test")) == 10


def test_raw_file_wins_over_gz(tmp_path: Path) -> None:
    folder = fake_mnist(tmp_path / "m", num_train=30, compressed=True)
    fake_mnist(tmp_path / "raw", num_train=20, compressed=False)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(tmp_path / "raw" / name, folder / name)
    assert len(load_mnist(folder, "train")) == 20


def test_missing_file_names_it_and_lists_the_expected_content(tmp_path: Path) -> None:
    folder = fake_mnist(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(load_mnist(folder, "train")) == 30  # the other split is unaffected
    with pytest.raises(DataError) as caught:
        load_mnist(folder, "test")
    error = caught.value
    assert error.reason == "missing_file"
    assert error.path == str(folder / "t10k-labels-idx1-ubyte")
    assert "train-images-idx3-ubyte[.gz]" in str(error)  # what the folder should hold
    assert "t10k-images-idx3-ubyte.gz" in str(error)  # what it does hold


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path, "train")
    assert caught.value.reason == "missing_file"
    assert "holds: nothing" in str(caught.value)
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path / "absent", "train")
    assert caught.value.reason == "not_a_directory"


def test_no_folder_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNUS_DATA_DIR", raising=False)
    with pytest.raises(DataError) as caught:
        load_mnist(None, "train")
    assert caught.value.reason == "no_data_dir"
    assert "UNUS_DATA_DIR" in str(caught.value)


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    folder = fake_mnist(tmp_path / "m")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip, not idx")
    with pytest.raises(DataError) as caught:
        load_mnist(folder, "train")
    assert caught.value.reason == "bad_magic"
    assert caught.value.path == str(folder / "train-images-idx3-ubyte.gz")


def test_label_count_mismatch(tmp_path: Path) -> None:
    folder = fake_mnist(tmp_path / "m")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(29, np.uint8))))
    with pytest.raises(DataError) as caught:
        load_mnist(folder, "train")
    assert caught.value.reason == "length_mismatch"


@pytest.mark.parametrize(
    ("images", "labels", "reason"),
    [
        (np.zeros((3, 28, 27), np.uint8), np.zeros(3, np.uint8), "bad_shape"),
        (np.zeros((3, 28, 28), np.int8), np.zeros(3, np.uint8), "bad_shape"),
        (np.zeros((3, 28, 28), np.uint8), np.zeros((3, 1), np.uint8), "bad_shape"),
        (np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 10], np.uint8), "bad_labels"),
    ],
)
def test_wrong_content(tmp_path: Path, images: np.ndarray, labels: np.ndarray, reason: str) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path, "train")
    assert caught.value.reason == reason


@pytest.mark.parametrize("num_examples", [0, 31, -1, True])
def test_bad_num_examples(tmp_path: Path, num_examples: int) -> None:
    folder = fake_mnist(tmp_path / "m")
    with pytest.raises(DataError) as caught:
        load_mnist(folder, "train", num_examples=num_examples)
    assert caught.value.reason == "bad_num_examples"


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_mnist(fake_mnist(tmp_path / "m"), "validation")  # type: ignore[arg-type]
    assert caught.value.reason == "bad_split"


# -- the data-folder setting -----------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNUS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir("") == tmp_path / "env"  # an empty flag is "not given"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("UNUS_DATA_DIR", "")
    assert resolve_data_dir() is None
    monkeypatch.delenv("UNUS_DATA_DIR")
    assert resolve_data_dir(None) is None
    cached = tmp_path / "cache" / "unus-edge" / "mnist"  # where `unus-edge data fetch mnist` puts it
    cached.mkdir(parents=True)
    (cached / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert resolve_data_dir() == cached
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"  # a flag still wins


def test_resolve_data_dir_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir("~/mnist") == tmp_path / "mnist"


# -- load_dataset ----------------------------------------------------------------------------


def test_load_dataset_mnist_from_explicit_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNUS_DATA_DIR", raising=False)
    folder = fake_mnist(tmp_path / "m")
    assert len(load_dataset("mnist", "train", data_dir=folder)) == 30
    assert len(load_dataset("mnist", "test", data_dir=folder, num_examples=4)) == 4


def test_load_dataset_synthetic_defaults_and_size() -> None:
    small = load_dataset("synthetic", "test", seed=3, num_examples=50)
    assert len(small) == 50
    assert small.x.shape == (50, 1, 28, 28)
    assert len(load_dataset("synthetic", "test")) == 10_000


@pytest.mark.parametrize(
    ("name", "split", "reason"),
    [("cifar", "train", "unknown_dataset"), ("synthetic", "dev", "bad_split")],
)
def test_load_dataset_errors(name: str, split: str, reason: str) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset(name, split)  # type: ignore[arg-type]
    assert caught.value.reason == reason
