"""Partition files (.npz): round trips, atomic writes, and refusal of every kind of bad file."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unus_edge.data import Dataset, load_partition, save_partition
from unus_edge.data._dataset import decode_pixels
from unus_edge.errors import DataError


def image_dataset(num_examples: int = 20, num_classes: int = 10) -> Dataset:
    pixels = np.random.default_rng(0).integers(0, 256, (num_examples, 1, 28, 28), dtype=np.uint8)
    labels = np.arange(num_examples, dtype=np.int64) % num_classes
    return Dataset(x=decode_pixels(pixels), y=labels, num_classes=num_classes)


def write_npz(path: Path, **arrays: Any) -> Path:
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def valid_arrays(num_examples: int = 4) -> dict[str, Any]:
    return {
        "x": np.zeros((num_examples, 1, 28, 28), np.uint8),
        "y": np.arange(num_examples, dtype=np.int64) % 10,
        "num_classes": np.array(10, np.int64),
        "format_version": np.array(1, np.int64),
    }


def assert_refused(path: Path, reason: str, **kwargs: Any) -> DataError:
    with pytest.raises(DataError) as caught:
        load_partition(path, **kwargs)
    assert caught.value.reason == reason, str(caught.value)
    assert caught.value.path == str(path)
    return caught.value


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_image_data_round_trips_bit_exact_as_uint8(tmp_path: Path, compress: bool) -> None:
    dataset = image_dataset()
    path = tmp_path / "device_000.npz"
    save_partition(path, dataset, compress=compress)
    with np.load(path, allow_pickle=False) as archive:
        assert archive["x"].dtype == np.uint8
        assert archive["y"].dtype == np.int64
        assert int(archive["num_classes"]) == 10
        assert int(archive["format_version"]) == 1
    loaded = load_partition(path)
    np.testing.assert_array_equal(loaded.x, dataset.x)  # bit-exact float32
    np.testing.assert_array_equal(loaded.y, dataset.y)
    assert loaded.num_classes == 10
    assert loaded.x.dtype == np.float32


def test_compression_shrinks_the_file(tmp_path: Path) -> None:
    pixels = np.zeros((200, 1, 28, 28), np.uint8)
    pixels[:, :, 10:18, 10:18] = np.arange(200, dtype=np.uint8)[:, None, None, None]
    dataset = Dataset(x=decode_pixels(pixels), y=np.zeros(200, np.int64), num_classes=10)
    save_partition(tmp_path / "packed.npz", dataset)
    save_partition(tmp_path / "stored.npz", dataset, compress=False)
    assert (tmp_path / "packed.npz").stat().st_size < (tmp_path / "stored.npz").stat().st_size / 2


def test_non_8bit_data_is_stored_as_float32(tmp_path: Path) -> None:
    x = np.linspace(0.0, 1.0, 5 * 7, dtype=np.float32).reshape(5, 7)
    dataset = Dataset(x=x, y=np.array([0, 1, 2, 0, 1], np.int64), num_classes=3)
    path = tmp_path / "features.npz"
    save_partition(path, dataset)
    with np.load(path, allow_pickle=False) as archive:
        assert archive["x"].dtype == np.float32
    loaded = load_partition(path)
    np.testing.assert_array_equal(loaded.x, x)
    assert loaded.feature_shape == (7,)


def test_empty_partition_round_trips(tmp_path: Path) -> None:
    dataset = image_dataset(0)
    save_partition(tmp_path / "empty.npz", dataset)
    assert len(load_partition(tmp_path / "empty.npz")) == 0


def test_str_path_and_name_without_npz_suffix(tmp_path: Path) -> None:
    path = tmp_path / "partition.bin"
    save_partition(str(path), image_dataset(3))
    assert path.exists()
    assert not (tmp_path / "partition.bin.npz").exists()
    assert len(load_partition(str(path))) == 3


# -- atomic writes ----------------------------------------------------------------------------


def test_overwrite_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    save_partition(path, image_dataset(5))
    save_partition(path, image_dataset(7))
    assert len(load_partition(path)) == 7
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["p.npz"]


def test_a_failing_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.npz"
    save_partition(path, image_dataset(5))

    def broken_fsync(handle_number: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(DataError) as caught:
        save_partition(path, image_dataset(7))
    monkeypatch.undo()
    assert caught.value.reason == "write_failed"
    assert "No space left" in str(caught.value)
    assert len(load_partition(path)) == 5
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["p.npz"]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        save_partition(tmp_path / "absent" / "p.npz", image_dataset(2))
    assert caught.value.reason == "write_failed"


# -- refusals ---------------------------------------------------------------------------------


def test_object_array_is_refused(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["x"] = np.array([{"a": 1}, None, "s", 3], dtype=object)
    path = tmp_path / "objects.npz"
    with path.open("wb") as handle:
        np.savez(handle, allow_pickle=True, **arrays)
    error = assert_refused(path, "object_array")
    assert "'x'" in str(error)


def test_object_array_in_any_member_is_refused(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["num_classes"] = np.array(10, dtype=object)
    path = tmp_path / "objects.npz"
    with path.open("wb") as handle:
        np.savez(handle, allow_pickle=True, **arrays)
    assert_refused(path, "object_array")


def test_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickle.npz"
    path.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01a\x94.")  # a pickled 'a'
    assert "allow_pickle" not in str(assert_refused(path, "not_npz"))  # NumPy's advice to unpickle never shows


@pytest.mark.parametrize("missing", ["x", "y"])
def test_missing_key(tmp_path: Path, missing: str) -> None:
    arrays = valid_arrays()
    del arrays[missing]
    error = assert_refused(write_npz(tmp_path / "m.npz", **arrays), "missing_key")
    assert missing in str(error)


def test_num_classes_may_come_from_the_caller(tmp_path: Path) -> None:
    arrays = valid_arrays()
    del arrays["num_classes"], arrays["format_version"]
    path = write_npz(tmp_path / "plain.npz", **arrays)
    assert_refused(path, "missing_key")
    assert load_partition(path, num_classes=10).num_classes == 10
    assert_refused(path, "bad_labels", num_classes=2)


def test_num_classes_disagreement(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "p.npz", **valid_arrays())
    assert_refused(path, "bad_num_classes", num_classes=12)
    assert load_partition(path, num_classes=10).num_classes == 10


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("x", np.zeros((4, 1, 28, 28), np.float64), "bad_dtype"),
        ("x", np.zeros((4, 1, 28, 28), np.int16), "bad_dtype"),
        ("x", np.zeros((4, 1, 28, 28), np.dtype(">f4")), "bad_dtype"),
        ("x", np.zeros(4, np.uint8), "bad_shape"),
        ("x", np.zeros((3, 1, 28, 28), np.uint8), "length_mismatch"),
        ("y", np.arange(4, dtype=np.int32), "bad_dtype"),
        ("y", np.arange(4, dtype=np.float32), "bad_dtype"),
        ("y", np.zeros((4, 1), np.int64), "bad_shape"),
        ("y", np.array([0, 1, 2, 10], np.int64), "bad_labels"),
        ("y", np.array([0, 1, -1, 2], np.int64), "bad_labels"),
        ("num_classes", np.array(0, np.int64), "bad_num_classes"),
        ("num_classes", np.array(10.0), "bad_dtype"),
        ("num_classes", np.array([10, 10], np.int64), "bad_dtype"),
        ("format_version", np.array(2, np.int64), "unsupported_version"),
        ("x", np.full((4, 3), 1.5, np.float32), "bad_values"),
        ("x", np.full((4, 3), -0.1, np.float32), "bad_values"),
        ("x", np.full((4, 3), np.nan, np.float32), "bad_values"),
    ],
)
def test_wrong_member(tmp_path: Path, key: str, value: np.ndarray, reason: str) -> None:
    arrays = valid_arrays()
    arrays[key] = value
    assert_refused(write_npz(tmp_path / "bad.npz", **arrays), reason)


def test_extra_members_are_ignored(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["comment"] = np.array("hello")
    assert len(load_partition(write_npz(tmp_path / "extra.npz", **arrays))) == 4


def test_header_claiming_more_than_the_archive_holds(tmp_path: Path) -> None:
    # Rewrite x.npy's header to announce 4000 rows (as many as y has) while it holds 4.
    arrays = valid_arrays()
    arrays["y"] = np.zeros(4000, np.int64)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, arrays["x"])
    original = buffer.getvalue()
    # Same header length: the longer shape eats three bytes of the header's space padding.
    member = original.replace(b"(4, 1, 28, 28)", b"(4000, 1, 28, 28)").replace(b"   \n", b"\n", 1)
    assert len(member) == len(original)
    assert np.lib.format.read_array_header_1_0(io.BytesIO(member[8:]))[0] == (4000, 1, 28, 28)
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member)
        for key in ("y", "num_classes"):
            member_buffer = io.BytesIO()
            np.lib.format.write_array(member_buffer, arrays[key])
            archive.writestr(f"{key}.npy", member_buffer.getvalue())
    assert_refused(path, "size_mismatch")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not_npz"),  # neither a zip nor an .npy: refused before NumPy reads it
        (b"hello, not an archive", "not_npz"),
        (b"PK\x03\x04truncated zip", "unreadable"),
    ],
)
def test_garbage_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(content)
    assert_refused(path, reason)


def test_truncated_archive(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    save_partition(path, image_dataset(50))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) * 2 // 3])
    assert_refused(path, "unreadable")


def test_corrupted_member_data(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    save_partition(path, image_dataset(50))
    content = bytearray(path.read_bytes())
    start = content.index(b"x.npy") + 200  # inside x's compressed data
    for offset in range(start, start + 32):
        content[offset] ^= 0x5A
    path.write_bytes(bytes(content))
    assert_refused(path, "unreadable")


def test_single_npy_is_not_a_partition(tmp_path: Path) -> None:
    path = tmp_path / "array.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros(3))
    assert_refused(path, "not_npz")


def test_missing_file(tmp_path: Path) -> None:
    assert_refused(tmp_path / "absent.npz", "not_found")


# -- fuzzing: any damage gives a Dataset or a DataError, never another exception ---------------


@settings(max_examples=200, deadline=None)
@given(
    compress=st.booleans(),
    cut=st.integers(min_value=0, max_value=5000),
    flips=st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 255)), max_size=4),
)
def test_damaged_partition_files_only_raise_data_error(
    tmp_path_factory: pytest.TempPathFactory, compress: bool, cut: int, flips: list[tuple[int, int]]
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    source = folder / "source.npz"
    save_partition(source, image_dataset(3), compress=compress)
    content = bytearray(source.read_bytes())
    for offset, mask in flips:
        if offset < len(content):
            content[offset] ^= mask
    path = folder / "damaged.npz"
    path.write_bytes(bytes(content[:cut] if cut < len(content) else content))
    try:
        dataset = load_partition(path)
    except DataError as error:
        error_path = error.path
    else:
        assert len(dataset) == 3
        return
    assert error_path == str(path)


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (10, b"\x63\x00"),  # compression method 99: zipfile raises NotImplementedError
        (8, b"\x01\x00"),  # "encrypted" flag: zipfile raises RuntimeError
    ],
)
def test_unsupported_zip_features_are_refused(tmp_path: Path, offset: int, value: bytes) -> None:
    path = tmp_path / "p.npz"
    save_partition(path, image_dataset(3))
    content = bytearray(path.read_bytes())
    central = content.index(b"PK\x01\x02")  # the first central-directory entry
    content[central + offset : central + offset + 2] = value
    path.write_bytes(bytes(content))
    assert_refused(path, "unreadable")
