"""The wire codec: round trips, conformance with cbor2, every limit, and a fuzz property."""

from __future__ import annotations

import math
import struct
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unus_edge import codec
from unus_edge.codec import DTYPES, Envelope, Limits, SparseTensor, decode, dumps, encode, loads
from unus_edge.errors import CodecError

# ------------------------------------------------------------------------------ round trips

dtype_names = st.sampled_from(sorted(DTYPES))


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = np.dtype(draw(dtype_names))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    return draw(hnp.arrays(dtype, shape))


@given(st.dictionaries(st.text(min_size=1, max_size=20), arrays(), max_size=5))
@settings(max_examples=200, deadline=None)
def test_dense_tensors_round_trip_bit_exactly(tensors: dict[str, np.ndarray[Any, Any]]) -> None:
    envelope = Envelope("update", "job-1", {"server_round": 3}, tensors)
    decoded = decode(encode(envelope))
    assert decoded.kind == "update"
    assert decoded.body == {"server_round": 3}
    assert set(decoded.tensors) == set(tensors)
    for name, array in tensors.items():
        got = decoded.tensors[name]
        assert isinstance(got, np.ndarray)
        assert got.dtype == array.dtype
        assert got.shape == array.shape
        assert got.tobytes() == array.tobytes()  # bit-exact, NaN payloads included
        assert not got.flags.writeable


def test_big_endian_and_non_contiguous_arrays_are_normalised() -> None:
    big = np.arange(12, dtype=">f4").reshape(3, 4)
    strided = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2]
    decoded = decode(encode(Envelope("update", "j", {}, {"big": big, "strided": strided}))).tensors
    np.testing.assert_array_equal(decoded["big"], big)
    np.testing.assert_array_equal(decoded["strided"], strided)


@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=8),
    data=st.data(),
)
@settings(max_examples=100, deadline=None)
def test_sparse_tensors_round_trip(shape: tuple[int, ...], data: st.DataObject) -> None:
    dense = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-5, 5, width=32)))
    indices = data.draw(st.sets(st.integers(0, dense.size - 1), max_size=dense.size))
    sparse = SparseTensor.from_dense(dense, np.array(sorted(indices), dtype=np.int64))
    decoded = decode(encode(Envelope("update", "j", {}, {"w": sparse}))).tensors["w"]
    assert isinstance(decoded, SparseTensor)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded.indices, sparse.indices)
    np.testing.assert_array_equal(decoded.values, sparse.values)
    expected = np.zeros_like(dense).reshape(-1)
    expected[sorted(indices)] = dense.reshape(-1)[sorted(indices)]
    np.testing.assert_array_equal(decoded.to_dense(), expected.reshape(shape))


def test_sparse_bytes_shrink_with_the_number_of_entries() -> None:
    dense = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    sizes = []
    for fraction in (1.0, 0.1, 0.01, 0.001):
        count = int(dense.size * fraction)
        sparse = SparseTensor.from_dense(dense, np.argsort(-np.abs(dense))[:count])
        sizes.append(len(encode(Envelope("update", "j", {}, {"w": sparse}))))
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[1] < 0.11 * sizes[0] * 1.01  # 10% of the entries, ~10% of the bytes
    assert sizes[3] < 1000  # 100 entries: 800 bytes of indices + values plus a small header


def test_wire_overhead_is_tiny_for_a_million_parameters() -> None:
    weights = np.zeros((1000, 1000), dtype=np.float32)
    payload = encode(Envelope("update", "job", {"server_round": 1}, {"fc.weight": weights}))
    overhead = len(payload) - weights.nbytes
    assert 0 < overhead < 0.001 * weights.nbytes


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
))
@settings(max_examples=300, deadline=None)
def test_conforms_to_cbor2_both_ways(value: Any) -> None:
    def normal(item: Any) -> Any:
        if isinstance(item, memoryview):
            return bytes(item)
        if isinstance(item, list):
            return [normal(x) for x in item]
        if isinstance(item, dict):
            return {k: normal(v) for k, v in item.items()}
        return item

    assert cbor2.loads(dumps(value)) == value  # what we write, cbor2 reads
    assert normal(loads(cbor2.dumps(value))) == value  # what cbor2 writes (subset), we read
    assert normal(loads(cbor2.dumps(value, canonical=True))) == value  # shortest floats too


def test_encoding_is_deterministic() -> None:
    envelope = Envelope("task", "j", {"b": 1, "a": [1.5, "x"]}, msg_id="m", timestamp=1.0)
    assert encode(envelope) == encode(envelope)


# ------------------------------------------------------------------------------ malformed input


def reason_of(payload: bytes, **limits: int) -> str:
    with pytest.raises(CodecError) as caught:
        decode(payload, limits=Limits(**limits))
    return caught.value.reason


def envelope_document(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"schema": 1, "kind": "update", "job": "j", "msg_id": "m", "ts": 1.0, "body": {}}
    document.update(overrides)
    return document


def tensor(dtype: str = "float32", shape: list[int] | None = None, data: bytes | None = None) -> dict[str, Any]:
    shape = [2] if shape is None else shape
    size = math.prod(shape) * np.dtype(dtype).itemsize
    return {"dtype": dtype, "shape": shape, "data": b"\0" * size if data is None else data}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "truncated"),
        (b"\x9f\xff", "indefinite_length"),  # indefinite array
        (b"\x1c", "bad_head"),  # reserved additional information 28
        (b"\xc1\x00", "tag_not_allowed"),  # tag 1 (epoch time)
        (b"\xd8\x23\x61a", "tag_not_allowed"),  # tag 35 (regex: cbor2 would compile it)
        (b"\xf7", "simple_not_allowed"),  # undefined
        (b"\x01\x02", "trailing_bytes"),
        (b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", "truncated"),  # claims 2**64-1 array items
        (b"\xbb\x00\x00\x00\x10\x00\x00\x00\x00", "truncated"),  # claims 2**36 map entries
        (b"\x5b\x00\x00\x00\x10\x00\x00\x00\x00", "truncated"),  # claims a 64 GiB byte string
        (b"\x62\xc3\x28", "bad_utf8"),
        (b"\xa1\x01\x02", "bad_key"),  # integer map key
        (b"\xa2\x61a\x01\x61a\x02", "duplicate_key"),
        (b"\x83\x01\x02", "truncated"),
        (b"\x01", "bad_envelope"),  # not a map
    ],
)
def test_malformed_cbor_is_rejected_with_its_reason(payload: bytes, reason: str) -> None:
    assert reason_of(payload) == reason


def test_every_limit_is_enforced() -> None:
    assert reason_of(dumps(envelope_document()), max_payload_bytes=10) == "too_large"
    deep: Any = 0
    for _ in range(20):
        deep = [deep]
    assert reason_of(dumps(envelope_document(body={"x": deep})), max_depth=16) == "too_deep"
    assert reason_of(dumps(envelope_document(body={"x": list(range(500))})), max_items=100) == "too_many_items"
    assert reason_of(dumps(envelope_document(body={"x": "y" * 200})), max_string_bytes=100) == "string_too_long"
    many = {f"t{i}": tensor() for i in range(5)}
    assert reason_of(dumps(envelope_document(tensors=many)), max_tensors=4) == "too_many_tensors"
    big = {"a": tensor(shape=[10, 10]), "b": tensor(shape=[10, 10])}
    assert reason_of(dumps(envelope_document(tensors=big)), max_elements=150) == "too_many_elements"


def test_a_huge_claimed_shape_is_refused_before_any_allocation() -> None:
    # A sparse tensor claiming 2**40 elements with one entry: to_dense() would allocate 4 TiB.
    sparse = {
        "dtype": "float32", "shape": [2**20, 2**20], "index_dtype": "int64",
        "indices": struct.pack("<q", 5), "values": struct.pack("<f", 1.0),
    }
    assert reason_of(dumps(envelope_document(tensors={"w": sparse}))) == "too_many_elements"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (envelope_document(schema=2), "unsupported_schema"),
        (envelope_document(schema="1"), "bad_envelope"),
        (envelope_document(kind=""), "bad_envelope"),
        (envelope_document(job=7), "bad_envelope"),
        (envelope_document(ts=math.inf), "bad_envelope"),
        (envelope_document(ts=True), "bad_envelope"),
        (envelope_document(body=[1]), "bad_envelope"),
        (envelope_document(extra=1), "bad_envelope"),
        (envelope_document(tensors=[1]), "bad_tensor"),
        (envelope_document(tensors={"w": 1}), "bad_tensor"),
        (envelope_document(tensors={"w": tensor(dtype="complex64")}), "bad_dtype"),
        (envelope_document(tensors={"w": tensor(dtype="object")}), "bad_dtype"),
        (envelope_document(tensors={"w": {**tensor(), "shape": [-1]}}), "bad_shape"),
        (envelope_document(tensors={"w": {**tensor(), "shape": [2.0]}}), "bad_shape"),
        (envelope_document(tensors={"w": {**tensor(), "shape": "2"}}), "bad_shape"),
        (envelope_document(tensors={"w": tensor(data=b"\0" * 7)}), "size_mismatch"),
        (envelope_document(tensors={"w": {**tensor(), "data": "text"}}), "bad_tensor"),
        (envelope_document(tensors={"w": {**tensor(), "extra": 1}}), "bad_tensor"),
        (envelope_document(tensors={"w": tensor(dtype="bool", data=b"\x00\x02")}), "bad_tensor"),
    ],
)
def test_invalid_envelopes_and_tensors_are_rejected(document: dict[str, Any], reason: str) -> None:
    assert reason_of(dumps(document)) == reason


def sparse_document(indices: list[int], index_dtype: str = "int32", count: int | None = None) -> dict[str, Any]:
    fmt = "<i" if index_dtype == "int32" else "<q"
    values = count if count is not None else len(indices)
    return {
        "dtype": "float32", "shape": [10], "index_dtype": index_dtype,
        "indices": b"".join(struct.pack(fmt, i) for i in indices), "values": b"\0\0\0\0" * values,
    }


@pytest.mark.parametrize(
    "document",
    [
        sparse_document([3, 3]),  # duplicate
        sparse_document([5, 2]),  # not increasing
        sparse_document([10]),  # out of range
        sparse_document([-1]),  # negative
        sparse_document([1, 2], count=3),  # values/indices disagree
        {**sparse_document([1]), "index_dtype": "uint8"},
    ],
)
def test_invalid_sparse_indices_are_rejected(document: dict[str, Any]) -> None:
    assert reason_of(dumps(envelope_document(tensors={"w": document}))) in {"bad_indices", "size_mismatch"}


def test_json_envelopes_round_trip_and_refuse_tensors_and_nan() -> None:
    envelope = Envelope("status", "j", {"device_id": "d", "online": True, "seen": 1.5})
    decoded = decode(encode(envelope, format="json"), format="json")
    assert decoded.body == envelope.body
    with pytest.raises(CodecError, match="tensors"):
        encode(Envelope("x", "j", {}, {"w": np.zeros(1)}), format="json")
    with pytest.raises(CodecError):
        encode(Envelope("x", "j", {"v": math.nan}), format="json")
    with pytest.raises(CodecError) as caught:
        decode(b'{"schema": 1, "ts": NaN}', format="json")
    assert caught.value.reason == "bad_json"
    with pytest.raises(CodecError) as caught:
        decode(b"[" * 5000 + b"]" * 5000, format="json")
    assert caught.value.reason in {"too_deep", "too_many_items"}
    with pytest.raises(CodecError) as caught:
        decode(b"\xff\xfe", format="json")
    assert caught.value.reason == "bad_json"


def test_unencodable_values_raise_codec_error() -> None:
    with pytest.raises(CodecError):
        dumps({1: "non-text key"})
    with pytest.raises(CodecError):
        dumps(2**64)
    with pytest.raises(CodecError):
        dumps(object())
    with pytest.raises(CodecError):
        encode(Envelope("u", "j", {}, {"w": np.zeros(2, dtype=np.complex64)}))


# ------------------------------------------------------------------------------ fuzz


@given(st.binary(max_size=512))
@settings(max_examples=3000, deadline=None)
def test_arbitrary_bytes_raise_only_codec_error(payload: bytes) -> None:
    for format_ in ("cbor", "json"):
        try:
            decode(payload, format=format_)  # type: ignore[arg-type]
        except CodecError:
            pass


_SEED_MESSAGES = [
    encode(Envelope("update", "job", {"server_round": 1, "metrics": {"loss": 0.5}},
                    {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.int8)})),
    encode(Envelope("update", "job", {}, {"s": SparseTensor.from_dense(np.arange(20.0, dtype=np.float32),
                                                                       np.array([1, 7, 19]))})),
    encode(Envelope("status", "job", {"device_id": "d", "state": "online"})),
]


@given(
    seed=st.sampled_from(_SEED_MESSAGES),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("sid")), max_size=8),
    cut=st.integers(0, 10_000),
)
@settings(max_examples=3000, deadline=None)
def test_mutated_messages_raise_only_codec_error(seed: bytes, edits: list[tuple[int, int, str]], cut: int) -> None:
    payload = bytearray(seed)
    for position, value, operation in edits:
        if not payload:
            break
        index = position % len(payload)
        if operation == "s":
            payload[index] = value
        elif operation == "i":
            payload.insert(index, value)
        else:
            del payload[index]
    payload = payload[: max(1, cut % (len(payload) + 1))] if cut % 3 == 0 else payload
    try:
        decoded = decode(bytes(payload))
    except CodecError:
        return
    # Whatever decodes is a structurally valid envelope.
    assert isinstance(decoded.body, dict)
    for value in decoded.tensors.values():
        assert isinstance(value, np.ndarray | SparseTensor)


def test_new_msg_ids_are_unique_hex() -> None:
    ids = {codec.new_msg_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
