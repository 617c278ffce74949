"""The protobuf wire codec: round trips, conformance with the reference protobuf, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unus_edge import _protobuf as pb
from unus_edge.errors import ModelError

onnx = pytest.importorskip("onnx")

INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = pb.encode_varint(value)
    assert pb.decode_varint(encoded, 0) == (value, len(encoded))
    assert len(encoded) <= 10


@given(INT64)
def test_negative_int64_is_ten_byte_twos_complement(value: int) -> None:
    encoded = pb.encode_varint(value)
    decoded, _ = pb.decode_varint(encoded, 0)
    assert pb.to_signed64(decoded) == value
    if value < 0:
        assert len(encoded) == 10


def test_known_varint_encodings() -> None:
    assert pb.encode_varint(0) == b"\x00"
    assert pb.encode_varint(1) == b"\x01"
    assert pb.encode_varint(300) == b"\xac\x02"
    assert pb.encode_varint(-1) == b"\xff" * 9 + b"\x01"


def test_out_of_range_varint_is_rejected() -> None:
    with pytest.raises(ValueError, match="range"):
        pb.encode_varint(1 << 64)
    with pytest.raises(ValueError, match="range"):
        pb.encode_varint(-(1 << 63) - 1)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("varint"), st.integers(1, 1000), st.integers(0, (1 << 64) - 1)),
            st.tuples(st.just("bytes"), st.integers(1, 1000), st.binary(max_size=300)),
            st.tuples(st.just("float"), st.integers(1, 1000), st.floats(width=32, allow_nan=False)),
            st.tuples(st.just("double"), st.integers(1, 1000), st.floats(allow_nan=False)),
        ),
        max_size=20,
    )
)
def test_writer_reader_round_trip(fields: list[tuple[str, int, object]]) -> None:
    writer = pb.Writer()
    for kind, number, value in fields:
        if kind == "varint":
            writer.varint(number, value)  # type: ignore[arg-type]
        elif kind == "bytes":
            writer.bytes_field(number, value)  # type: ignore[arg-type]
        elif kind == "float":
            writer.fixed32_float(number, value)  # type: ignore[arg-type]
        else:
            writer.fixed64_double(number, value)  # type: ignore[arg-type]
    decoded = list(pb.iter_fields(writer.getvalue()))
    assert len(decoded) == len(fields)
    for (kind, number, value), (got_number, wire, got) in zip(fields, decoded, strict=True):
        assert got_number == number
        if kind == "varint":
            assert (wire, got) == (pb.VARINT, value)
        elif kind == "bytes":
            assert wire == pb.LEN and bytes(got) == value  # type: ignore[arg-type]
        elif kind == "float":
            assert wire == pb.FIXED32
            assert np.array([got], "<u4").view("<f4")[0] == np.float32(value)  # type: ignore[arg-type]
        else:
            assert wire == pb.FIXED64
            assert np.array([got], "<u8").view("<f8")[0] == value  # type: ignore[arg-type]
        # every field re-encodes to exactly the bytes it was read from
        assert pb.encode_field_raw(got_number, wire, got) in writer.getvalue()


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=50))
def test_packed_varints_round_trip(values: list[int]) -> None:
    writer = pb.Writer()
    writer.packed_varints(4, values)
    fields = list(pb.iter_fields(writer.getvalue()))
    if not values:
        assert fields == []
        return
    [(number, wire, payload)] = fields
    assert (number, wire) == (4, pb.LEN)
    assert pb.packed_varints(payload) == values  # type: ignore[arg-type]


@given(st.lists(st.floats(width=32, allow_nan=False), max_size=50))
def test_packed_floats_round_trip(values: list[float]) -> None:
    writer = pb.Writer()
    writer.packed_floats(7, values)
    fields = list(pb.iter_fields(writer.getvalue()))
    got = pb.packed_fixed32(fields[0][2]) if values else np.zeros(0, np.float32)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, np.asarray(values, np.float32))


def test_packed_fixed_of_wrong_length_is_truncated() -> None:
    with pytest.raises(ModelError, match="truncated"):
        pb.packed_fixed32(memoryview(b"\x00" * 6))
    with pytest.raises(ModelError, match="truncated"):
        pb.packed_fixed64(memoryview(b"\x00" * 12))


@settings(max_examples=60)
@given(
    dims=st.lists(st.integers(0, 5), max_size=3),
    name=st.text(max_size=20),
    data=st.data(),
)
def test_tensor_encoding_matches_reference_protobuf(dims: list[int], name: str, data: st.DataObject) -> None:
    """A TensorProto written field by field with our writer equals the reference serialization."""
    count = int(np.prod(dims)) if dims else 1
    values = data.draw(st.lists(st.floats(width=32, allow_nan=False), min_size=count, max_size=count))
    array = np.asarray(values, np.float32).reshape(dims)
    writer = pb.Writer()
    for dim in dims:
        writer.varint(1, dim)
    writer.varint(2, 1)
    if name:
        writer.string(8, name)
    writer.bytes_field(9, array.tobytes())
    reference = onnx.numpy_helper.from_array(array, name)
    assert writer.getvalue() == reference.SerializeToString()
    parsed = onnx.TensorProto()
    parsed.ParseFromString(writer.getvalue())
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(parsed), array)


@given(st.lists(INT64, max_size=20))
def test_packed_int64_matches_reference(values: list[int]) -> None:
    reference = onnx.TensorProto(data_type=onnx.TensorProto.INT64, int64_data=values).SerializeToString()
    writer = pb.Writer()
    writer.varint(2, onnx.TensorProto.INT64)
    writer.packed_varints(7, values)
    assert writer.getvalue() == reference
    fields = {number: value for number, _, value in pb.iter_fields(reference)}
    decoded = pb.packed_varints(fields[7]) if values else []  # type: ignore[arg-type]
    assert [pb.to_signed64(v) for v in decoded] == values


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x08", "truncated"),  # tag, then no varint
        (b"\x08\xff", "truncated"),  # unfinished varint
        (b"\x12\x05ab", "truncated"),  # length 5, 2 bytes follow
        (b"\x15\x00\x00", "truncated"),  # fixed32 with 2 bytes
        (b"\x11\x00\x00\x00", "truncated"),  # fixed64 with 3 bytes
        (b"\x0b", "bad_wire_type"),  # wire type 3 (start group)
        (b"\x0e", "bad_wire_type"),  # wire type 6
        (b"\x00\x01", "bad_field"),  # field number 0
        (b"\x08" + b"\xff" * 10 + b"\x01", "bad_varint"),  # 11-byte varint
        (b"\x08" + b"\xff" * 9 + b"\x02", "bad_varint"),  # 10th byte overflows 64 bits
    ],
)
def test_corrupt_bytes_raise_model_error(data: bytes, reason: str) -> None:
    with pytest.raises(ModelError, match=reason):
        list(pb.iter_fields(data))


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_leak_low_level_errors(data: bytes) -> None:
    try:
        for _number, _wire, value in pb.iter_fields(data):
            if isinstance(value, memoryview):
                list(pb.iter_fields(value))
    except ModelError:
        pass
