"""server.rpc.codec: ModelInferRequest -> InferenceRequest and InferenceResponse -> ModelInferResponse."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput, PayloadTooLarge
from server.protocol import datatypes, tensors
from server.protocol.inference import InferenceResponse, OutputTensor
from server.rpc import codec

LIMITS = tensors.Limits(max_elements=1 << 20, max_rank=8, max_tensors=4)

# The typed InferTensorContents field of each datatype, as the KServe V2 gRPC spec defines it.
SPEC_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
RAW_ONLY = sorted(set(datatypes.BY_NAME) - set(SPEC_CONTENTS))


def _sample(name: str) -> np.ndarray:
    dtype = datatypes.BY_NAME[name]
    if name == "BOOL":
        return np.array([[True, False], [False, True]])
    if name == "BYTES":
        array = np.empty(4, dtype=object)
        array[:] = [b"", b"abc", "\u00e9\u65e5".encode(), b"\x00\xff"]
        return array.reshape(2, 2)
    if dtype.numpy.kind in "iu":
        info = np.iinfo(dtype.numpy)
        return np.array([[info.min, info.max], [0, 5]], dtype=dtype.numpy)
    return np.array([[0.5, -1.5], [2.0, 1024.0]], dtype=dtype.numpy)


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.tobytes() == expected.tobytes()


def _round_trip(message: Any) -> Any:
    """Serialize and parse, as the wire does."""
    parsed = pb.ModelInferRequest()
    parsed.ParseFromString(message.SerializeToString())
    return parsed


def test_spec_contents_cover_every_datatype_but_fp16_and_bf16() -> None:
    assert RAW_ONLY == ["BF16", "FP16"]


@pytest.mark.parametrize("name", sorted(datatypes.BY_NAME))
def test_raw_input_contents_every_datatype(name: str) -> None:
    array = _sample(name)
    message = pb.ModelInferRequest(model_name="m", model_version="2", id="req")
    message.inputs.add(name="x", datatype=name, shape=[2, 2])
    message.raw_input_contents.append(tensors.to_raw(array))
    request = codec.decode_request(_round_trip(message), LIMITS)
    assert (request.model_name, request.model_version, request.id) == ("m", "2", "req")
    assert [(t.name, t.datatype.name) for t in request.inputs] == [("x", name)]
    _assert_same(request.inputs[0].array, array)


@pytest.mark.parametrize("name", sorted(SPEC_CONTENTS))
def test_typed_contents_every_datatype(name: str) -> None:
    array = _sample(name)
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype=name, shape=[2, 2])
    getattr(tensor.contents, SPEC_CONTENTS[name]).extend(array.reshape(-1).tolist())
    request = codec.decode_request(_round_trip(message), LIMITS)
    _assert_same(request.inputs[0].array, array)


@pytest.mark.parametrize("name", RAW_ONLY)
def test_fp16_and_bf16_via_contents_are_invalid(name: str) -> None:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype=name, shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match=f"input 'x': {name} data must be sent in raw_input_contents"):
        codec.decode_request(message, LIMITS)


def test_several_inputs_raw() -> None:
    a, b = np.arange(3, dtype=np.int32), np.array([1.5], dtype=np.float16)
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="a", datatype="INT32", shape=[3])
    message.inputs.add(name="b", datatype="FP16", shape=[1, 1])
    message.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    request = codec.decode_request(_round_trip(message), LIMITS)
    _assert_same(request.inputs[0].array, a)
    _assert_same(request.inputs[1].array, b.reshape(1, 1))


@pytest.mark.parametrize("raw_count", [1, 3])
def test_mismatched_raw_count(raw_count: int) -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="a", datatype="INT32", shape=[1])
    message.inputs.add(name="b", datatype="INT32", shape=[1])
    message.raw_input_contents.extend([b"\x00" * 4] * raw_count)
    with pytest.raises(InvalidInput, match=f"raw_input_contents has {raw_count} entries for 2 inputs"):
        codec.decode_request(message, LIMITS)


@pytest.mark.parametrize("typed", ["fp32_contents", "int_contents", "empty_contents"])
def test_typed_contents_and_raw_input_contents_together_are_invalid(typed: str) -> None:
    """Triton forbids both sources for one request; the raw bytes must not silently win."""
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype="FP32", shape=[2])
    if typed == "empty_contents":
        tensor.contents.SetInParent()
    else:
        getattr(tensor.contents, typed).extend([7, 8])
    message.raw_input_contents.append(np.array([1, 2], dtype=np.float32).tobytes())
    with pytest.raises(InvalidInput, match="input 'x': contents must not be set when the request uses raw_input"):
        codec.decode_request(_round_trip(message), LIMITS)


def test_typed_contents_count_mismatch() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match=r"input 'x': data has 2 elements but shape implies 3"):
        codec.decode_request(message, LIMITS)


def test_typed_contents_in_the_wrong_field_count_as_missing() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="INT64", shape=[2]).contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidInput, match=r"input 'x': data has 0 elements but shape implies 2"):
        codec.decode_request(message, LIMITS)


def test_raw_size_mismatch() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[3])
    message.raw_input_contents.append(b"\x00" * 8)
    with pytest.raises(InvalidInput, match=r"input 'x': data has 2 elements but shape implies 3"):
        codec.decode_request(message, LIMITS)


def test_huge_shape_with_tiny_payload() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1_000_000_000])
    message.raw_input_contents.append(b"\x00" * 4)
    with pytest.raises(InvalidInput, match="shape implies 1000000000"):
        codec.decode_request(message, LIMITS)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1_000_000_000]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="shape implies 1000000000"):
        codec.decode_request(typed, LIMITS)


def test_negative_dim() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[-1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="negative dimension"):
        codec.decode_request(message, LIMITS)


def test_truncated_bytes_raw() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(b"\x05\x00\x00\x00ab")
    with pytest.raises(InvalidInput, match="input 'x': BYTES element of 5 bytes runs past the end"):
        codec.decode_request(message, LIMITS)


def test_empty_inputs_and_names_and_datatypes() -> None:
    with pytest.raises(InvalidInput, match="inputs: must be a non-empty list"):
        codec.decode_request(pb.ModelInferRequest(model_name="m"), LIMITS)
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="every tensor needs a name"):
        codec.decode_request(message, LIMITS)
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FLOAT", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="input 'x' datatype: unknown datatype 'FLOAT'"):
        codec.decode_request(message, LIMITS)


def test_too_many_tensors() -> None:
    message = pb.ModelInferRequest(model_name="m")
    for i in range(5):
        message.inputs.add(name=f"x{i}", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(PayloadTooLarge, match="at most 4"):
        codec.decode_request(message, LIMITS)
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    for i in range(5):
        message.outputs.add(name=f"y{i}")
    with pytest.raises(PayloadTooLarge, match="at most 4"):
        codec.decode_request(message, LIMITS)


def test_outputs_and_parameters() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    message.outputs.add(name="b")
    message.outputs.add(name="a")
    message.parameters["s"].string_param = "v"
    message.parameters["i"].int64_param = -5
    message.parameters["t"].bool_param = True
    message.parameters["d"].double_param = 0.25
    message.parameters["u"].uint64_param = 2**63
    request = codec.decode_request(_round_trip(message), LIMITS)
    assert [o.name for o in request.outputs] == ["b", "a"]
    assert all(o.binary is None for o in request.outputs)
    assert request.parameters == {"s": "v", "i": -5, "t": True, "d": 0.25, "u": 2**63}


def test_parameter_value_unset_is_none() -> None:
    assert codec.parameter_value(pb.InferParameter()) is None


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [("INT8", "int_contents", 300), ("UINT8", "uint_contents", 256), ("INT16", "int_contents", -40000)],
)
def test_typed_contents_out_of_range_are_invalid_input(name: str, field: str, value: int) -> None:
    message = pb.ModelInferRequest(model_name="m")
    getattr(message.inputs.add(name="x", datatype=name, shape=[1]).contents, field).append(value)
    with pytest.raises(InvalidInput, match="input 'x'"):
        codec.decode_request(message, LIMITS)


# --- encode_response -------------------------------------------------------------------------------------------


def _response() -> InferenceResponse:
    outputs = [
        OutputTensor(f"out_{name}", datatypes.BY_NAME[name], _sample(name)) for name in sorted(datatypes.BY_NAME)
    ]
    return InferenceResponse("m", "3", outputs, id="rid")


def test_encode_response_raw_contents_parse_back() -> None:
    response = _response()
    message = pb.ModelInferResponse()
    message.ParseFromString(codec.encode_response(response).SerializeToString())
    assert (message.model_name, message.model_version, message.id) == ("m", "3", "rid")
    assert len(message.outputs) == len(message.raw_output_contents) == len(response.outputs)
    for tensor, raw, out in zip(message.outputs, message.raw_output_contents, response.outputs, strict=True):
        assert (tensor.name, tensor.datatype, list(tensor.shape)) == (out.name, out.datatype.name, [2, 2])
        assert not tensor.HasField("contents")
        decoded = tensors.from_raw(raw, out.datatype, list(tensor.shape), tensor.name, LIMITS)
        _assert_same(decoded, out.array)


def test_encode_response_bytes_wire_format() -> None:
    array = np.empty(2, dtype=object)
    array[:] = [b"ab", b""]
    message = codec.encode_response(InferenceResponse("m", "1", [OutputTensor("s", datatypes.BY_NAME["BYTES"], array)]))
    assert message.raw_output_contents[0] == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert message.id == ""


def test_tritonclient_reads_our_response() -> None:
    response = _response()
    result = triton_grpc.InferResult(codec.encode_response(response))
    for out in response.outputs:
        got = result.as_numpy(out.name)
        assert got.shape == out.array.shape
        if out.datatype.name == "BYTES":
            assert got.tolist() == out.array.tolist()
        elif out.datatype.name == "BF16":
            np.testing.assert_array_equal(np.asarray(got).astype(np.float32), out.array.astype(np.float32))
        else:
            assert got.dtype == out.array.dtype
            np.testing.assert_array_equal(got, out.array)


def test_tritonclient_request_decodes() -> None:
    """A request built the way tritonclient.grpc builds it (raw contents for every input)."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    h = np.array([[1.5, 2.0]], dtype=ml_dtypes.bfloat16)
    inputs = [triton_grpc.InferInput("x", [1, 4], "FP32"), triton_grpc.InferInput("h", [1, 2], "BF16")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(h)
    message = pb.ModelInferRequest(model_name="m", id="abc")
    for tensor in inputs:
        message.inputs.append(tensor._get_tensor())
        message.raw_input_contents.append(tensor._get_content())
    request = codec.decode_request(_round_trip(message), LIMITS)
    _assert_same(request.inputs[0].array, x)
    _assert_same(request.inputs[1].array, h)
