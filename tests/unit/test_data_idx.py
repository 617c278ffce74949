"""The IDX reader: real MNIST, round trips of files written here, and every kind of bad file."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unus_edge.data import read_idx
from unus_edge.errors import DataError

# IDX dtype codes, written out independently of the reader's own table.
CODES: dict[np.dtype[Any], int] = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
         np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip

# SHA-256 of the uncompressed files, from the dataset's README.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def idx_bytes(array: np.ndarray) -> bytes:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = struct.pack(">BBBB", 0, 0, CODES[big_endian.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + big_endian.tobytes()


def write(path: Path, content: bytes, *, compressed: bool) -> Path:
    path.write_bytes(gzip.compress(content) if compressed else content)
    return path


def assert_data_error(path: Path, reason: str, **kwargs: int) -> DataError:
    with pytest.raises(DataError) as caught:
        read_idx(path, **kwargs)
    assert caught.value.reason == reason, str(caught.value)
    assert caught.value.path == str(path)
    return caught.value


# -- real MNIST ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "shape"),
    [
        ("train-images-idx3-ubyte", (60_000, 28, 28)),
        ("train-labels-idx1-ubyte", (60_000,)),
        ("t10k-images-idx3-ubyte", (10_000, 28, 28)),
        ("t10k-labels-idx1-ubyte", (10_000,)),
    ],
)
def test_real_mnist_files_read_bit_exact(mnist_dir: Path, stem: str, shape: tuple[int, ...]) -> None:
    path = mnist_dir / f"{stem}.gz"
    if not path.exists():
        path = mnist_dir / stem
    array = read_idx(path)
    assert array.shape == shape
    assert array.dtype == np.uint8
    # The array plus its header re-serialised must be the published file, byte for byte.
    assert hashlib.sha256(idx_bytes(array)).hexdigest() == MNIST_SHA256[stem]


def test_real_mnist_training_label_counts(mnist_dir: Path) -> None:
    path = mnist_dir / "train-labels-idx1-ubyte.gz"
    labels = read_idx(path if path.exists() else mnist_dir / "train-labels-idx1-ubyte")
    assert np.bincount(labels, minlength=10).tolist() == TRAIN_LABEL_COUNTS


# -- round trips ----------------------------------------------------------------------------


def native_arrays(dtype: np.dtype[Any]) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        dtype=dtype.newbyteorder("="),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": False} if dtype.kind == "f" else None,
    )


idx_arrays = st.sampled_from(list(CODES)).flatmap(native_arrays)


@settings(max_examples=60, deadline=None)
@given(array=idx_arrays, compressed=st.booleans())
def test_round_trip_every_dtype(tmp_path_factory: pytest.TempPathFactory, array: np.ndarray, compressed: bool) -> None:
    path = write(tmp_path_factory.mktemp("idx") / "a.idx", idx_bytes(array), compressed=compressed)
    result = read_idx(path)
    assert result.dtype == array.dtype.newbyteorder("=")
    assert result.dtype.isnative
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw_named_gz = write(tmp_path / "raw.gz", idx_bytes(array), compressed=False)
    gz_named_raw = write(tmp_path / "packed-ubyte", idx_bytes(array), compressed=True)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


def test_accepts_str_paths(tmp_path: Path) -> None:
    array = np.array([1, 2, 3], dtype=np.uint8)
    path = write(tmp_path / "a", idx_bytes(array), compressed=False)
    np.testing.assert_array_equal(read_idx(str(path)), array)


# -- bad files --------------------------------------------------------------------------------

GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))  # header is 4 + 3 * 4 = 16 bytes


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "truncated"),
        (b"\x00\x00\x08", "truncated"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad_magic"),
        (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad_magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad_dtype"),
        (b"\x00\x00\x08\x00", "bad_header"),
        (GOOD[:10], "truncated"),  # inside the dimension sizes
        (GOOD[:-1], "truncated"),  # payload one byte short
        (GOOD[:16], "truncated"),  # no payload at all
        (GOOD + b"\x00", "size_mismatch"),  # one byte of trailing data
        (b"\x00\x00\x0c\x01" + struct.pack(">I", 3) + b"\x00" * 11, "truncated"),  # int32: 12 bytes needed
    ],
)
def test_malformed_files_raise_data_error(tmp_path: Path, content: bytes, reason: str, compressed: bool) -> None:
    assert_data_error(write(tmp_path / "bad", content, compressed=compressed), reason)


@pytest.mark.parametrize("compressed", [False, True])
def test_absurd_header_is_refused_before_allocating(tmp_path: Path, compressed: bool) -> None:
    # 3 x (2**32 - 1) float64: ~6e29 bytes announced by a 40-byte file.
    content = b"\x00\x00\x0e\x03" + struct.pack(">3I", *(3 * [2**32 - 1])) + b"\x00" * 8
    error = assert_data_error(write(tmp_path / "huge", content, compressed=compressed), "too_large")
    assert "max_bytes" in str(error)


def test_max_bytes_is_honoured(tmp_path: Path) -> None:
    path = write(tmp_path / "a", GOOD, compressed=True)
    assert_data_error(path, "too_large", max_bytes=23)
    assert read_idx(path, max_bytes=24).shape == (2, 3, 4)


def test_gzip_bomb_stops_at_announced_size(tmp_path: Path) -> None:
    # The header announces 24 bytes; the stream then inflates to 64 MiB of zeros.
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(GOOD[:16])
        zeros = bytes(1 << 20)
        for _ in range(64):
            stream.write(zeros)
    assert_data_error(path, "size_mismatch")


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])
    assert_data_error(path, "bad_gzip")


def test_corrupt_gzip_stream(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress(idx_bytes(np.arange(4000, dtype=np.uint8) % 7)))
    packed[-6] ^= 0xFF  # inside the CRC-32 / size trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(packed))
    assert_data_error(path, "bad_gzip")


def test_garbage_after_gzip_magic(tmp_path: Path) -> None:
    path = tmp_path / "junk.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    assert_data_error(path, "bad_gzip")


def test_missing_file(tmp_path: Path) -> None:
    error = assert_data_error(tmp_path / "nope", "not_found")
    assert "nope" in str(error)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    assert_data_error(tmp_path, "unreadable")


# -- fuzzing: any damage gives an array or a DataError, never another exception ---------------

FUZZ_SOURCE = idx_bytes(np.arange(2 * 5 * 6, dtype=np.int32).reshape(2, 5, 6))


@settings(max_examples=300, deadline=None)
@given(
    compressed=st.booleans(),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=4),
)
def test_damaged_files_only_raise_data_error(
    tmp_path_factory: pytest.TempPathFactory, compressed: bool, cut: int, flips: list[tuple[int, int]]
) -> None:
    content = bytearray(gzip.compress(FUZZ_SOURCE) if compressed else FUZZ_SOURCE)
    for offset, mask in flips:
        if offset < len(content):
            content[offset] ^= mask
    path = tmp_path_factory.mktemp("fuzz") / "damaged"
    path.write_bytes(bytes(content[: max(cut, 1) if cut < len(content) else len(content)]))
    try:
        array = read_idx(path)
    except DataError as error:
        error_path = error.path
    else:
        assert isinstance(array, np.ndarray)
        return
    assert error_path == str(path)
