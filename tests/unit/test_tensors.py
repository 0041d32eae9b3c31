"""server.protocol.tensors: raw bytes <-> numpy, JSON lists <-> numpy, and the shape/size checks done before
allocating."""

from __future__ import annotations

import struct
import time
import tracemalloc

import ml_dtypes
import numpy as np
import orjson
import pytest

from server.errors import InvalidInput, PayloadTooLarge
from server.protocol import datatypes, tensors

LIMITS = tensors.Limits(max_elements=1 << 20, max_rank=8, max_tensors=16)
SHAPE = [2, 3]


def _sample(name: str) -> np.ndarray:
    """A [2, 3] array of ``name`` that exercises the type's extremes."""
    dtype = datatypes.BY_NAME[name]
    if name == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if name == "BYTES":
        values = [b"", b"abc", "h\u00e9llo \u65e5\u672c".encode(), b"\x00\xff\xfe", b"x" * 300, b"\n"]
        array = np.empty(6, dtype=object)
        array[:] = values
        return array.reshape(SHAPE)
    if dtype.numpy.kind in "iu":
        info = np.iinfo(dtype.numpy)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=dtype.numpy)
    if name == "BF16":
        return np.array([[0.0, -1.5, 3.0], [256.0, -0.0078125, 1e30]], dtype=ml_dtypes.bfloat16)
    if name == "FP16":
        return np.array([[0.0, -1.5, 65504.0], [6.1035e-05, 0.333251953125, -2.0]], dtype=np.float16)
    return np.array([[0.0, -1.5, 3.25], [1e-30, 123456.5, -7.0]], dtype=dtype.numpy)


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.reshape(-1).tolist() == expected.reshape(-1).tolist()
        assert all(isinstance(item, bytes) for item in actual.reshape(-1))
    else:
        # byte-identical, which also compares -0.0 and NaN payloads exactly
        assert actual.tobytes() == expected.tobytes()


ALL_TYPES = sorted(datatypes.BY_NAME)


def test_every_wire_datatype_is_covered() -> None:
    assert set(ALL_TYPES) == {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
        "BYTES",
    }


@pytest.mark.parametrize("name", ALL_TYPES)
def test_binary_round_trip(name: str) -> None:
    dtype = datatypes.BY_NAME[name]
    array = _sample(name)
    raw = tensors.to_raw(array)
    if name != "BYTES":
        assert len(raw) == array.size * dtype.itemsize
    decoded = tensors.from_raw(raw, dtype, SHAPE, "input 'x'", LIMITS)
    _assert_same(decoded, array)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_binary_round_trip_from_memoryview_slice(name: str) -> None:
    """The HTTP codec hands from_raw a memoryview slice of the body, not bytes."""
    array = _sample(name)
    raw = tensors.to_raw(array)
    body = memoryview(b"HEAD" + raw + b"TAIL")
    decoded = tensors.from_raw(body[4 : 4 + len(raw)], datatypes.BY_NAME[name], SHAPE, "x", LIMITS)
    _assert_same(decoded, array)


def test_bytes_wire_format_is_little_endian_length_prefixed() -> None:
    array = np.array([b"", b"ab", "\u00e9".encode()], dtype=object)
    assert tensors.to_raw(array) == b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00ab" + b"\x02\x00\x00\x00\xc3\xa9"
    decoded = tensors.from_raw(b"\x03\x00\x00\x00xyz\x00\x00\x00\x00", datatypes.BY_NAME["BYTES"], [2], "x", LIMITS)
    assert decoded.tolist() == [b"xyz", b""]


def test_to_raw_encodes_str_and_fixed_width_string_arrays_as_utf8() -> None:
    expected = struct.pack("<I", 2) + "\u00e9".encode() + struct.pack("<I", 1) + b"a"
    assert tensors.to_raw(np.array(["\u00e9", "a"])) == expected
    assert tensors.to_raw(np.array(["\u00e9", "a"], dtype=object)) == expected
    assert tensors.to_raw(np.array([b"\xc3\xa9", b"a"])) == expected


def test_from_raw_does_not_copy_numeric_data() -> None:
    buffer = bytearray(np.arange(6, dtype=np.int32).tobytes())
    decoded = tensors.from_raw(memoryview(buffer), datatypes.BY_NAME["INT32"], SHAPE, "x", LIMITS)
    buffer[0] = 42
    assert decoded[0, 0] == 42


def test_to_raw_is_row_major_for_non_contiguous_arrays() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3).T
    assert tensors.to_raw(array) == np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize("name", ALL_TYPES)
def test_json_decode_flat_and_nested(name: str) -> None:
    dtype = datatypes.BY_NAME[name]
    array = _sample(name)
    if name == "BYTES":
        # JSON carries BYTES as strings, so only UTF-8 text can travel this way
        texts = ["", "abc", "h\u00e9llo \u65e5\u672c", "\u0000", "x" * 300, "\n"]
        nested = [texts[:3], texts[3:]]
        expected = np.empty(6, dtype=object)
        expected[:] = [t.encode("utf-8") for t in texts]
        expected = expected.reshape(SHAPE)
    else:
        nested = array.astype(np.float64).tolist() if name in ("FP16", "BF16") else array.tolist()
        expected = array
    flat = [item for row in nested for item in row]
    _assert_same(tensors.from_list(flat, dtype, SHAPE, "x", LIMITS), expected)
    _assert_same(tensors.from_list(nested, dtype, SHAPE, "x", LIMITS), expected)


@pytest.mark.parametrize("name", [n for n in ALL_TYPES if n != "BYTES"])
def test_json_response_round_trip(name: str) -> None:
    """to_list -> JSON -> from_list gives back the same values (FP16/BF16 travel as float32 numbers)."""
    dtype = datatypes.BY_NAME[name]
    array = _sample(name)
    text = orjson.dumps(tensors.to_list(array), option=orjson.OPT_SERIALIZE_NUMPY)
    _assert_same(tensors.from_list(orjson.loads(text), dtype, SHAPE, "x", LIMITS), array)


def test_to_list_bytes_gives_strings() -> None:
    array = np.array([b"abc", "\u00e9".encode(), b"\xff"], dtype=object)
    assert tensors.to_list(array) == ["abc", "\u00e9", "\ufffd"]


def test_json_scalar_for_single_element() -> None:
    decoded = tensors.from_list(5, datatypes.BY_NAME["INT32"], [1], "x", LIMITS)
    assert decoded.tolist() == [5] and decoded.dtype == np.int32


def test_zero_element_tensors() -> None:
    assert tensors.from_raw(b"", datatypes.BY_NAME["FP32"], [0, 4], "x", LIMITS).shape == (0, 4)
    assert tensors.from_raw(b"", datatypes.BY_NAME["BYTES"], [2, 0], "x", LIMITS).shape == (2, 0)
    assert tensors.from_list([], datatypes.BY_NAME["INT64"], [0], "x", LIMITS).shape == (0,)


# --- shape checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode", ["raw", "list"])
def test_negative_dim(decode: str) -> None:
    fp32 = datatypes.BY_NAME["FP32"]
    with pytest.raises(InvalidInput, match=r"input 'x'.*negative"):
        if decode == "raw":
            tensors.from_raw(b"\x00" * 8, fp32, [-1, 2], "input 'x'", LIMITS)
        else:
            tensors.from_list([1.0, 2.0], fp32, [-1, 2], "input 'x'", LIMITS)


@pytest.mark.parametrize("shape", [[2.0], ["2"], [True], [None], "2", None, 2, {"0": 2}, [[2]]])
def test_shape_must_be_a_list_of_ints(shape: object) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': shape must be a list of integers"):
        tensors.from_raw(b"\x00" * 8, datatypes.BY_NAME["FP32"], shape, "input 'x'", LIMITS)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"shape must be a list of integers"):
        tensors.from_list([1.0, 2.0], datatypes.BY_NAME["FP32"], shape, "input 'x'", LIMITS)  # type: ignore[arg-type]


def test_rank_over_limit() -> None:
    limits = tensors.Limits(max_elements=100, max_rank=3, max_tensors=4)
    assert tensors.check_shape([1, 1, 1], "x", limits) == 1
    with pytest.raises(InvalidInput, match=r"rank 4 exceeds the limit of 3"):
        tensors.from_raw(b"\x00" * 4, datatypes.BY_NAME["FP32"], [1, 1, 1, 1], "x", limits)
    with pytest.raises(InvalidInput, match=r"rank 4 exceeds"):
        tensors.from_list([1.0], datatypes.BY_NAME["FP32"], [1, 1, 1, 1], "x", limits)


@pytest.mark.parametrize("name", ["FP32", "INT8", "BYTES", "BOOL"])
def test_element_count_mismatch(name: str) -> None:
    dtype = datatypes.BY_NAME[name]
    raw = tensors.to_raw(_sample(name))  # 6 elements
    with pytest.raises(InvalidInput, match=r"input 'x': data has 6 elements but shape implies 4"):
        tensors.from_raw(raw, dtype, [2, 2], "input 'x'", LIMITS)
    data = {"BYTES": ["a", "b", "c"], "BOOL": [True, False, True]}.get(name, [1, 2, 3])
    with pytest.raises(InvalidInput, match=r"data has 3 elements but shape implies 4"):
        tensors.from_list(data, dtype, [4], "input 'x'", LIMITS)


def test_raw_size_not_a_multiple_of_itemsize() -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': 7 bytes is not a multiple of FP32's 4"):
        tensors.from_raw(b"\x00" * 7, datatypes.BY_NAME["FP32"], [2], "input 'x'", LIMITS)


@pytest.mark.parametrize("name", ["FP32", "BYTES"])
def test_count_over_max_elements_is_payload_too_large(name: str) -> None:
    limits = tensors.Limits(max_elements=4, max_rank=8, max_tensors=4)
    dtype = datatypes.BY_NAME[name]
    array = np.zeros(5, dtype=np.float32) if name == "FP32" else np.array([b"a"] * 5, dtype=object)
    assert tensors.from_raw(tensors.to_raw(array[:4]), dtype, [4], "x", limits).shape == (4,)
    with pytest.raises(PayloadTooLarge, match=r"input 'x': 5 elements exceed the limit of 4"):
        tensors.from_raw(tensors.to_raw(array), dtype, [5], "input 'x'", limits)
    with pytest.raises(PayloadTooLarge, match=r"5 elements exceed the limit of 4"):
        tensors.from_list(tensors.to_list(array), dtype, [5], "input 'x'", limits)


@pytest.mark.parametrize("name", ["FP32", "FP64", "BYTES", "BOOL"])
@pytest.mark.parametrize("decode", ["raw", "list"])
@pytest.mark.parametrize("shape", [[1_000_000_000], [1 << 20, 1 << 20, 1 << 20], [1, 2**62]])
def test_huge_shape_with_tiny_payload_fails_fast_without_allocating(name: str, decode: str, shape: list[int]) -> None:
    dtype = datatypes.BY_NAME[name]
    one = _sample(name).reshape(-1)[:1]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InvalidInput, match=r"data has 1 elements but shape implies"):
            if decode == "raw":
                tensors.from_raw(tensors.to_raw(one), dtype, shape, "x", LIMITS)
            else:
                tensors.from_list(
                    tensors.to_list(one).tolist() if name != "BYTES" else ["a"], dtype, shape, "x", LIMITS
                )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 10 * 1024 * 1024, f"peak allocation {peak} bytes"


# --- BYTES framing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"\x01", b"\x01\x00\x00", b"\x01\x00\x00\x00a\x02\x00"])
def test_truncated_bytes_length_prefix(raw: bytes) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': truncated BYTES length prefix"):
        tensors.from_raw(raw, datatypes.BY_NAME["BYTES"], [1], "input 'x'", LIMITS)


@pytest.mark.parametrize(
    "raw", [struct.pack("<I", 10) + b"abc", struct.pack("<I", 0xFFFFFFFF), b"\x00" * 4 + struct.pack("<I", 2) + b"a"]
)
def test_bytes_length_past_end(raw: bytes) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': BYTES element of \d+ bytes runs past the end"):
        tensors.from_raw(raw, datatypes.BY_NAME["BYTES"], [1], "input 'x'", LIMITS)


# --- wrong JSON data types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("FP32", ["abc", "def"]),
        ("FP32", [{"a": 1}, 2.0]),
        ("FP32", [[1.0], [2.0, 3.0]]),  # ragged
        ("INT64", ["x", 1]),
        ("INT32", [[1, 2], 3]),
        ("UINT8", [300, 1]),  # out of range
        ("UINT32", [-1, 1]),
        ("INT8", [128, 0]),
        ("BYTES", [1, 2]),
        ("BYTES", [None, "a"]),
        ("BYTES", [{"a": 1}, "a"]),
    ],
)
def test_wrong_json_data_types_are_invalid_input(name: str, data: list[object]) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x'"):
        tensors.from_list(data, datatypes.BY_NAME[name], [2], "input 'x'", LIMITS)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("FP32", ["1.5", "2"]),  # strings that look like numbers are parsed
        ("FP32", [None, 1.0]),  # null becomes NaN
        ("INT32", [1.7, 2]),  # float silently truncated to 1
        ("BOOL", ["false", True]),  # "false" becomes True
    ],
)
def test_json_values_of_the_wrong_type_are_not_coerced(name: str, data: list[object]) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x'"):
        tensors.from_list(data, datatypes.BY_NAME[name], [2], "input 'x'", LIMITS)


def test_of_array_maps_numpy_dtypes() -> None:
    for name in ALL_TYPES:
        assert datatypes.of_array(_sample(name)).name == name
    assert datatypes.of_array(np.array(["a"])).name == "BYTES"
    assert datatypes.of_array(np.array([b"a"])).name == "BYTES"
    with pytest.raises(InvalidInput):
        datatypes.of_array(np.array([1 + 2j]))


def test_by_name_names_the_field() -> None:
    assert datatypes.by_name("FP32").numpy == np.float32
    with pytest.raises(InvalidInput, match=r"input 'x' datatype: unknown datatype 'FLOAT32'"):
        datatypes.by_name("FLOAT32", field="input 'x' datatype")
    with pytest.raises(InvalidInput, match="unknown datatype"):
        datatypes.by_name(None)  # type: ignore[arg-type]


def test_datatype_tables_are_consistent() -> None:
    for name, dtype in datatypes.BY_NAME.items():
        assert datatypes.BY_CONFIG_NAME[dtype.config_name] is dtype
        assert datatypes.BY_ONNX_TYPE[dtype.onnx_type] is dtype
        assert dtype.config_name == ("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")
    assert datatypes.BY_NAME["BYTES"].itemsize == 0
    assert datatypes.BY_NAME["BF16"].itemsize == 2
