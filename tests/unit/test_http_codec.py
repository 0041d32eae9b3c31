"""server.http.codec: V2 JSON bodies, Triton's binary tensor extension, compression, and tritonclient interop."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http

from server.errors import InvalidInput, PayloadTooLarge
from server.http import codec
from server.protocol import datatypes, tensors
from server.protocol.inference import InferenceRequest, InferenceResponse, OutputTensor, RequestedOutput

LIMITS = tensors.Limits(max_elements=1 << 20, max_rank=8, max_tensors=8)


def _binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, str]:
    """A binary-extension body and its Inference-Header-Content-Length value."""
    json_part = orjson.dumps(header)
    return json_part + b"".join(blobs), str(len(json_part))


def _decode(body: bytes, header_length: str | None = None, limits: tensors.Limits = LIMITS) -> InferenceRequest:
    return codec.decode_request(body, header_length, "model", "1", limits)


def _object_array(values: list[bytes], shape: list[int]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


# --- decode: JSON only ----------------------------------------------------------------------------------------


def test_decode_json_only_request() -> None:
    body = orjson.dumps(
        {
            "id": "req-1",
            "parameters": {"binary_data_output": True, "custom": 3},
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6.5]},
                {"name": "ids", "datatype": "INT64", "shape": [2, 2], "data": [[1, -2], [3, 2**62]]},
                {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "\u00e9t\u00e9"]},
                {"name": "mask", "datatype": "BOOL", "shape": [1, 2], "data": [[True, False]]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        }
    )
    request = _decode(body)
    assert (request.model_name, request.model_version, request.id) == ("model", "1", "req-1")
    assert request.parameters == {"binary_data_output": True, "custom": 3}
    assert [(t.name, t.datatype.name, t.array.shape) for t in request.inputs] == [
        ("x", "FP32", (2, 3)),
        ("ids", "INT64", (2, 2)),
        ("text", "BYTES", (2,)),
        ("mask", "BOOL", (1, 2)),
    ]
    x, ids, text, mask = (t.array for t in request.inputs)
    np.testing.assert_array_equal(x, np.array([[1, 2, 3], [4, 5, 6.5]], dtype=np.float32))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(ids, np.array([[1, -2], [3, 2**62]], dtype=np.int64))
    assert text.tolist() == [b"a", "\u00e9t\u00e9".encode()]
    assert mask.dtype == np.bool_ and mask.tolist() == [[True, False]]
    assert request.outputs == [RequestedOutput("y", False), RequestedOutput("z", None)]


def test_decode_defaults_id_parameters_outputs() -> None:
    request = _decode(b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [7]}]}')
    assert (request.id, request.parameters, request.outputs) == ("", {}, [])


def test_non_string_id_is_stringified() -> None:
    request = _decode(b'{"id": 12, "inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [7]}]}')
    assert request.id == "12"


# --- decode: binary and mixed ---------------------------------------------------------------------------------


def test_decode_binary_request() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    words = _object_array([b"", b"\xff\x00", "\u65e5".encode()], [3])
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
            {
                "name": "w",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(tensors.to_raw(words))},
            },
        ]
    }
    body, header_length = _binary_body(header, tensors.to_raw(x), tensors.to_raw(words))
    request = _decode(body, header_length)
    np.testing.assert_array_equal(request.inputs[0].array, x)
    assert request.inputs[1].array.tolist() == words.tolist()


def test_decode_mixed_json_and_binary_inputs() -> None:
    b = np.array([[10, 20]], dtype=np.int64)
    c = np.array([1.5, -1], dtype=np.float16)
    header = {
        "inputs": [
            {"name": "a", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]},
            {"name": "b", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": 16}},
            {"name": "j", "datatype": "BYTES", "shape": [1], "data": ["json"]},
            {"name": "c", "datatype": "FP16", "shape": [2], "parameters": {"binary_data_size": 4}},
        ]
    }
    body, header_length = _binary_body(header, b.tobytes(), c.tobytes())
    request = _decode(body, header_length)
    a, b_out, j, c_out = (t.array for t in request.inputs)
    assert a.tolist() == [1, 2, 3] and a.dtype == np.int32
    np.testing.assert_array_equal(b_out, b)
    assert j.tolist() == [b"json"]
    assert c_out.dtype == np.float16 and c_out.tobytes() == c.tobytes()


def test_header_length_equal_to_body_means_no_binary_section() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}'
    assert _decode(body, str(len(body))).inputs[0].array.tolist() == [1]


@pytest.mark.parametrize("delta", [1, 1000])
def test_header_length_larger_than_body(delta: int) -> None:
    body, _ = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
        b"\x00" * 4,
    )
    with pytest.raises(InvalidInput, match=r"Inference-Header-Content-Length: \d+ is outside"):
        _decode(body, str(len(body) + delta))


@pytest.mark.parametrize("value", ["-1", "abc", "", "1.5"])
def test_header_length_not_a_valid_size(value: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        _decode(b'{"inputs": []}', value)


def test_header_length_cutting_the_json_is_invalid_json() -> None:
    body, header_length = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
        b"\x00" * 4,
    )
    with pytest.raises(InvalidInput, match="not valid JSON"):
        _decode(body, str(int(header_length) - 2))


def test_leftover_binary_bytes() -> None:
    body, header_length = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
        b"\x00" * 4,
        b"extra",
    )
    with pytest.raises(InvalidInput, match=r"binary data has 5 bytes that no input's binary_data_size claims"):
        _decode(body, header_length)


def test_binary_bytes_with_only_json_inputs_are_leftover() -> None:
    body, header_length = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, b"\x00" * 4
    )
    with pytest.raises(InvalidInput, match="binary data has 4 bytes"):
        _decode(body, header_length)


@pytest.mark.parametrize("size", [9, -1, "4", 4.0])
def test_binary_data_size_past_the_end_or_not_an_int(size: Any) -> None:
    body, header_length = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": size}}]},
        b"\x00" * 8,
    )
    with pytest.raises(InvalidInput, match=r"input 'x': binary_data_size .* runs past"):
        _decode(body, header_length)


def test_binary_data_size_past_the_end_for_second_input() -> None:
    header = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
        ]
    }
    body, header_length = _binary_body(header, b"\x00" * 12)
    with pytest.raises(InvalidInput, match=r"input 'b': binary_data_size 8 runs past the 4 binary bytes left"):
        _decode(body, header_length)


def test_binary_data_size_without_header_length() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}
    )
    with pytest.raises(InvalidInput, match=r"input 'x': binary_data_size 4 runs past the 0 binary bytes left"):
        _decode(body)
    with pytest.raises(InvalidInput, match="not valid JSON"):
        _decode(body + b"\x00" * 4)  # without the header length the whole body is read as JSON


def test_binary_size_disagreeing_with_shape() -> None:
    body, header_length = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 8}}]},
        b"\x00" * 8,
    )
    with pytest.raises(InvalidInput, match=r"input 'x': data has 2 elements but shape implies 3"):
        _decode(body, header_length)


# --- decode: malformed documents -------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{", b'{"inputs": [}', b"", b"\xff\xfe", b"{'inputs': []}"])
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="request body is not valid JSON"):
        _decode(body)


@pytest.mark.parametrize(("body", "kind"), [(b"[]", "list"), (b'"x"', "str"), (b"1", "int"), (b"null", "NoneType")])
def test_non_object_json(body: bytes, kind: str) -> None:
    with pytest.raises(InvalidInput, match=f"request body must be a JSON object, got {kind}"):
        _decode(body)


@pytest.mark.parametrize("body", [b"{}", b'{"inputs": []}', b'{"inputs": {"name": "x"}}', b'{"inputs": null}'])
def test_missing_or_empty_inputs(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="inputs: must be a non-empty list"):
        _decode(body)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ("x", r"inputs\[0\]: must be a JSON object"),
        ({"datatype": "FP32", "shape": [1], "data": [1]}, r"inputs\[0\]\.name: must be a non-empty string"),
        ({"name": "", "datatype": "FP32", "shape": [1], "data": [1]}, r"inputs\[0\]\.name"),
        ({"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}, r"input 'x' datatype: unknown datatype"),
        ({"name": "x", "shape": [1], "data": [1]}, r"input 'x' datatype: unknown datatype 'None'"),
        ({"name": "x", "datatype": "FP32", "shape": [1]}, r"input 'x': needs 'data' or a 'binary_data_size'"),
        ({"name": "x", "datatype": "FP32", "data": [1]}, r"input 'x': shape must be a list of integers"),
        ({"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}, r"input 'x': data has 1 elements"),
    ],
)
def test_malformed_input_tensor(tensor: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _decode(orjson.dumps({"inputs": [tensor]}))


def test_too_many_inputs_or_outputs() -> None:
    limits = tensors.Limits(max_elements=100, max_rank=4, max_tensors=2)
    tensor = {"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}
    with pytest.raises(PayloadTooLarge, match="inputs: 3 tensors exceed the limit of 2"):
        _decode(orjson.dumps({"inputs": [tensor] * 3}), limits=limits)
    with pytest.raises(PayloadTooLarge, match="outputs: 3 entries exceed the limit of 2"):
        _decode(orjson.dumps({"inputs": [tensor], "outputs": [{"name": "y"}] * 3}), limits=limits)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [({"name": "y"}, "outputs: must be a list"), ([{"name": 3}], r"outputs\[0\]"), (["y"], r"outputs\[0\]")],
)
def test_malformed_outputs(outputs: Any, message: str) -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}], "outputs": outputs})
    with pytest.raises(InvalidInput, match=message):
        _decode(body)


def test_parameters_must_be_an_object() -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}], "parameters": [1]})
    with pytest.raises(InvalidInput, match="parameters: must be a JSON object"):
        _decode(body)


# --- encode_response -----------------------------------------------------------------------------------------------


def _response(id_: str = "") -> InferenceResponse:
    return InferenceResponse(
        "model",
        "1",
        [
            OutputTensor("f", datatypes.BY_NAME["FP32"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4),
            OutputTensor("i", datatypes.BY_NAME["INT64"], np.array([[2**40], [-3]], dtype=np.int64)),
            OutputTensor("s", datatypes.BY_NAME["BYTES"], _object_array([b"x", "\u00e9".encode(), b""], [1, 3])),
            OutputTensor("h", datatypes.BY_NAME["FP16"], np.array([0.5, -2.0], dtype=np.float16)),
            OutputTensor("g", datatypes.BY_NAME["BF16"], np.array([1.5, 256.0], dtype=ml_dtypes.bfloat16)),
            OutputTensor("b", datatypes.BY_NAME["BOOL"], np.array([True, False])),
        ],
        id=id_,
    )


def _request(outputs: list[RequestedOutput] | None = None, **parameters: Any) -> InferenceRequest:
    return InferenceRequest("model", "1", [], outputs or [], parameters=parameters)


def _parse_binary_response(body: bytes, header_length: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our own reader of a V2 response: JSON header, then each binary output in order."""
    doc = orjson.loads(body if header_length is None else body[:header_length])
    arrays: dict[str, np.ndarray] = {}
    offset = len(body) if header_length is None else header_length
    for out in doc["outputs"]:
        dtype = datatypes.BY_NAME[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = tensors.from_list(out["data"], dtype, out["shape"], out["name"], LIMITS)
        else:
            arrays[out["name"]] = tensors.from_raw(body[offset : offset + size], dtype, out["shape"], "o", LIMITS)
            offset += size
    assert offset == len(body), "binary section has bytes that no output claims"
    return doc, arrays


def test_encode_json_by_default() -> None:
    response = _response()
    body, header_length = codec.encode_response(response, _request())
    assert header_length is None
    doc = orjson.loads(body)
    assert (doc["model_name"], doc["model_version"]) == ("model", "1")
    assert "id" not in doc
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert [o["name"] for o in doc["outputs"]] == ["f", "i", "s", "h", "g", "b"]
    assert outputs["f"] == {"name": "f", "datatype": "FP32", "shape": [2, 3], "data": [0, 0.25, 0.5, 0.75, 1, 1.25]}
    assert outputs["i"]["data"] == [2**40, -3]
    assert outputs["s"]["data"] == ["x", "\u00e9", ""]
    assert outputs["h"]["data"] == [0.5, -2.0] and outputs["h"]["datatype"] == "FP16"
    assert outputs["g"]["data"] == [1.5, 256.0] and outputs["g"]["datatype"] == "BF16"
    assert outputs["b"]["data"] == [True, False]
    assert all("parameters" not in o for o in doc["outputs"])


def test_encode_all_binary_and_parse_back() -> None:
    response = _response("abc")
    body, header_length = codec.encode_response(response, _request(binary_data_output=True))
    assert header_length is not None and header_length < len(body)
    doc, arrays = _parse_binary_response(body, header_length)
    assert doc["id"] == "abc"
    assert all("data" not in o and o["parameters"]["binary_data_size"] >= 0 for o in doc["outputs"])
    for out in response.outputs:
        assert arrays[out.name].shape == out.array.shape
        assert arrays[out.name].dtype == out.array.dtype
        if out.datatype.name == "BYTES":
            assert arrays[out.name].tolist() == out.array.tolist()
        else:
            assert arrays[out.name].tobytes() == out.array.tobytes()


def test_per_output_binary_flag_overrides_the_default() -> None:
    response = _response()
    request = _request([RequestedOutput("f", True), RequestedOutput("s", True), RequestedOutput("i", False)])
    body, header_length = codec.encode_response(response, request)
    doc, arrays = _parse_binary_response(body, header_length)
    binary = {o["name"] for o in doc["outputs"] if "parameters" in o}
    assert binary == {"f", "s"}
    np.testing.assert_array_equal(arrays["f"], response.outputs[0].array)
    assert arrays["s"].tolist() == response.outputs[2].array.tolist()

    request = _request([RequestedOutput("f", False), RequestedOutput("h", None)], binary_data_output=True)
    body, header_length = codec.encode_response(response, request)
    doc, arrays = _parse_binary_response(body, header_length)
    assert {o["name"] for o in doc["outputs"] if "data" in o} == {"f"}
    assert arrays["h"].tobytes() == response.outputs[3].array.tobytes()


def test_id_echoed() -> None:
    body, _ = codec.encode_response(_response("req-\u00e9"), _request())
    assert orjson.loads(body)["id"] == "req-\u00e9"


def test_dumps_handles_numpy_and_int_keys() -> None:
    assert orjson.loads(codec.dumps({1: np.array([1, 2]), "a": np.float32(0.5)})) == {"1": [1, 2], "a": 0.5}


# --- compression ---------------------------------------------------------------------------------------------------


PAYLOAD = b'{"inputs": []}' * 100


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("GZIP ", gzip.compress),
        ("deflate", zlib.compress),
        ("identity", lambda data: data),
        ("", lambda data: data),
    ],
)
def test_decompress(encoding: str, compress: Any) -> None:
    assert codec.decompress(compress(PAYLOAD), encoding, len(PAYLOAD)) == PAYLOAD


def test_decompress_unsupported_encoding() -> None:
    with pytest.raises(InvalidInput, match="Content-Encoding 'br' is not supported"):
        codec.decompress(b"x", "br", 100)


# Explicit ids: a bytes value becomes part of the test id, and gzip's header holds a timestamp (mtime=0 pins it).
@pytest.mark.parametrize(
    ("encoding", "body"),
    [("gzip", b"not gzip at all"), ("deflate", gzip.compress(b"x", mtime=0))],
    ids=["gzip-not-gzip", "deflate-given-gzip"],
)
def test_decompress_garbage(encoding: str, body: bytes) -> None:
    with pytest.raises(InvalidInput, match=f"body is not valid {encoding}"):
        codec.decompress(body, encoding, 100)


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_decompressed_size_cap(encoding: str, compress: Any) -> None:
    limit = 64 * 1024
    assert len(codec.decompress(compress(b"\x00" * limit), encoding, limit)) == limit
    with pytest.raises(PayloadTooLarge, match=f"exceeds the limit of {limit} bytes"):
        codec.decompress(compress(b"\x00" * (limit + 1)), encoding, limit)


def test_gzip_bomb_is_refused_without_inflating_it() -> None:
    limit = 64 * 1024
    bomb = gzip.compress(b"\x00" * (32 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            codec.decompress(bomb, "gzip", limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"decompress allocated {peak} bytes for a {limit}-byte limit"


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_truncated_compressed_body_is_invalid(encoding: str, compress: Any) -> None:
    body = compress(bytes(range(256)) * 64)
    with pytest.raises(InvalidInput, match=encoding):
        codec.decompress(body[: len(body) // 2], encoding, 1 << 20)


# --- interop with tritonclient ------------------------------------------------------------------------------------


def _triton_input(name: str, datatype: str, array: np.ndarray, binary: bool) -> Any:
    tensor = triton_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


TRITON_INPUTS = {
    "FP32": np.array([[1.5, -2.25, 3.0e-8], [0.0, 1e30, -7.0]], dtype=np.float32),
    "INT64": np.array([[2**62, -(2**62), 0]], dtype=np.int64),
    "BYTES": _object_array([b"", "h\u00e9llo".encode(), b"plain"], [3, 1]),
    "FP16": np.array([0.5, -1.0, 65504.0, 0.0999755859375], dtype=np.float16),
    "BF16": np.array([1.5, -256.0], dtype=ml_dtypes.bfloat16),
    "BOOL": np.array([[True], [False]]),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_decode_tritonclient_request(binary: bool) -> None:
    names = [n for n in TRITON_INPUTS if binary or n != "BF16"]  # tritonclient sends BF16 only in binary
    inputs = [_triton_input(f"in_{n}", n, TRITON_INPUTS[n], binary) for n in names]
    outputs = [triton_http.InferRequestedOutput("out0", binary_data=True), triton_http.InferRequestedOutput("out1")]
    outputs.append(triton_http.InferRequestedOutput("out2", binary_data=False))
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="my-id"
    )
    assert (json_size is not None) == binary
    request = _decode(body, None if json_size is None else str(json_size))
    assert request.id == "my-id"
    assert [o.name for o in request.outputs] == ["out0", "out1", "out2"]
    assert [o.binary for o in request.outputs] == [True, True, False]
    for tensor, name in zip(request.inputs, names, strict=True):
        expected = TRITON_INPUTS[name]
        assert (tensor.name, tensor.datatype.name, tensor.array.shape) == (f"in_{name}", name, expected.shape)
        if name == "BYTES":
            assert tensor.array.tolist() == expected.tolist()
        else:
            assert tensor.array.dtype == expected.dtype
            assert tensor.array.tobytes() == expected.tobytes()


def test_decode_tritonclient_request_without_outputs_asks_binary() -> None:
    inputs = [_triton_input("x", "FP32", TRITON_INPUTS["FP32"], True)]
    body, json_size = triton_http.InferenceServerClient.generate_request_body(inputs)
    request = _decode(body, str(json_size))
    assert request.outputs == [] and request.parameters.get("binary_data_output") is True
    encoded, header_length = codec.encode_response(
        InferenceResponse("model", "1", [OutputTensor("y", datatypes.BY_NAME["FP32"], request.inputs[0].array)]),
        request,
    )
    assert header_length is not None
    result = triton_http.InferenceServerClient.parse_response_body(encoded, header_length=header_length)
    assert result.get_output("y")["parameters"]["binary_data_size"] == TRITON_INPUTS["FP32"].nbytes
    np.testing.assert_array_equal(result.as_numpy("y"), TRITON_INPUTS["FP32"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_parses_our_response(binary: bool) -> None:
    response = _response("rid")
    body, header_length = codec.encode_response(response, _request(binary_data_output=binary))
    assert (header_length is not None) == binary
    result = triton_http.InferenceServerClient.parse_response_body(body, header_length=header_length)
    assert result.get_response()["id"] == "rid"
    for out in response.outputs:
        got = result.as_numpy(out.name)
        assert got.shape == out.array.shape, out.name
        if out.datatype.name == "BYTES":
            expected = out.array.tolist() if binary else np.vectorize(bytes.decode)(out.array).tolist()
            assert got.tolist() == expected
        elif out.datatype.name in ("FP16", "BF16"):
            np.testing.assert_array_equal(got.astype(np.float32), out.array.astype(np.float32))
        else:
            assert got.dtype == out.array.dtype
            np.testing.assert_array_equal(got, out.array)


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "\u2460", "\uff11", "\u0661", "+1", " 1", "1_0", str(2**63), "9" * 5000],
    ids=[
        "superscript-two",
        "circled-one",
        "fullwidth-one",
        "arabic-indic-one",
        "plus",
        "space",
        "underscore",
        "int64-overflow",
        "five-thousand-digits",
    ],
)
def test_header_length_accepts_ascii_digits_only(value: str) -> None:
    """str.isdigit() took the first four: int() then raised ValueError (a 500) or read fullwidth "1" as 1."""
    body = b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}' + b"\x00"
    with pytest.raises(InvalidInput, match=r"Inference-Header-Content-Length: .* ASCII digits"):
        _decode(body, value)
