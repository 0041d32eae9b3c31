"""server.rpc.wire: large ModelInferRequests keep raw_input_contents in the received bytes, and read the same."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from server.protocol import tensors
from server.rpc import codec, wire

LIMITS = tensors.Limits(max_elements=1 << 22, max_rank=8, max_tensors=8)


def _request(*arrays: np.ndarray) -> pb.ModelInferRequest:
    """A request as tritonclient builds it: every field, several inputs, parameters on the request."""
    message = pb.ModelInferRequest(model_name="m", model_version="2", id="req-7")
    message.parameters["priority"].int64_param = 3
    for index, array in enumerate(arrays):
        message.inputs.add(name=f"in{index}", datatype="FP32", shape=list(array.shape))
        message.raw_input_contents.append(array.tobytes())
    message.outputs.add(name="out").parameters["classification"].int64_param = 2
    return message


def test_small_request_is_plain_protobuf() -> None:
    data = _request(np.ones((1, 4), np.float32)).SerializeToString()
    assert isinstance(wire.parse_model_infer(data), pb.ModelInferRequest)


def test_large_request_decodes_like_protobuf_without_copying_tensors() -> None:
    rng = np.random.default_rng(0)
    image, small = rng.random((1, 3, 224, 224), np.float32), rng.random((1, 5), np.float32)
    message = _request(image, small)
    data = message.SerializeToString()
    parsed = wire.parse_model_infer(data)
    assert isinstance(parsed, wire.RawViewRequest)
    assert all(view.obj is data for view in parsed.raw_input_contents)  # views into the received buffer
    ours = codec.decode_request(parsed, LIMITS)
    theirs = codec.decode_request(pb.ModelInferRequest.FromString(data), LIMITS)
    assert (ours.model_name, ours.model_version, ours.id) == ("m", "2", "req-7")
    assert ours.parameters == theirs.parameters == {"priority": 3}
    assert [o.classification for o in ours.outputs] == [2]
    for got, want, array in zip(ours.inputs, theirs.inputs, (image, small), strict=True):
        assert got.name == want.name and got.datatype == want.datatype
        np.testing.assert_array_equal(got.array, array)
    assert np.shares_memory(ours.inputs[0].array, np.frombuffer(data, np.uint8))


def test_raw_entries_keep_their_order_wherever_they_are_on_the_wire() -> None:
    """Fields may come in any order; the raw entries still pair with the inputs by position."""
    first, second = np.full((1, 20000), 1, np.float32), np.full((1, 20000), 2, np.float32)
    message = _request(first, second)
    raw = list(message.raw_input_contents)
    del message.raw_input_contents[:]
    head = pb.ModelInferRequest(raw_input_contents=[raw[0]]).SerializeToString()
    tail = pb.ModelInferRequest(raw_input_contents=[raw[1]]).SerializeToString()
    parsed = wire.parse_model_infer(head + message.SerializeToString() + tail)
    decoded = codec.decode_request(parsed, LIMITS)
    assert [float(t.array[0, 0]) for t in decoded.inputs] == [1.0, 2.0]


@pytest.mark.parametrize("cut", [1, 100, 70_000], ids=["header", "inputs", "tensor"])
def test_truncated_request_fails_as_protobuf_does(cut: int) -> None:
    data = _request(np.ones((1, 40000), np.float32)).SerializeToString()
    truncated = data[:-cut]
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(truncated)
    with pytest.raises(DecodeError):
        wire.parse_model_infer(truncated)


def test_garbage_fails_as_protobuf_does() -> None:
    data = bytes([0x0F]) * wire.ZERO_COPY_MIN_BYTES  # wire type 7: not a protobuf message
    with pytest.raises(DecodeError):
        wire.parse_model_infer(data)
