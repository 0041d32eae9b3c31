"""Large gRPC requests (over server/rpc/wire.py's 64 KB split) through tritonclient, unary and streamed:
the tensors read in place from the received buffer give the same results as onnxruntime, BYTES included,
and a bad large request is still refused with the field named."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import ServerProcess
from tests.e2e.conftest import reference_outputs

SEQ = 40_000  # [2, 40000] FP32 = 320 KB


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, SEQ)).astype(np.float32)


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_large_unary_request_matches_onnxruntime(server: ServerProcess, model_repo) -> None:
    tokens = _tokens()
    client = grpcclient.InferenceServerClient(server.grpc_address)
    result = client.infer("dynamic_seq", [_input("tokens", tokens, "FP32")])
    expected = reference_outputs(model_repo / "dynamic_seq" / "1" / "model.onnx", {"tokens": tokens})
    for name, want in expected.items():
        np.testing.assert_allclose(result.as_numpy(name), want, rtol=1e-5, atol=1e-5)


def test_large_bytes_request_round_trips(server: ServerProcess) -> None:
    text = np.array([[bytes([65 + i]) * 20_000, b"x"] for i in range(4)], dtype=object)  # 80 KB of BYTES
    client = grpcclient.InferenceServerClient(server.grpc_address)
    result = client.infer("strings", [_input("text", text, "BYTES")])
    assert result.as_numpy("echo").tolist() == text.tolist()


def test_large_streamed_requests_match_onnxruntime(server: ServerProcess, model_repo) -> None:
    replies: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_address)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    sent = {f"r{i}": _tokens() * (i + 1) for i in range(4)}
    try:
        for request_id, tokens in sent.items():
            client.async_stream_infer("dynamic_seq", [_input("tokens", tokens, "FP32")], request_id=request_id)
        answers = [replies.get(timeout=60) for _ in sent]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in answers)
    path = model_repo / "dynamic_seq" / "1" / "model.onnx"
    for result, _ in answers:
        tokens = sent[result.get_response().id]
        np.testing.assert_allclose(result.as_numpy("scaled"), reference_outputs(path, {"tokens": tokens})["scaled"])


def test_large_request_with_wrong_size_is_refused(server: ServerProcess) -> None:
    request = pb.ModelInferRequest(model_name="dynamic_seq")
    request.inputs.add(name="tokens", datatype="FP32", shape=[2, SEQ + 1])  # claims more than the data holds
    request.raw_input_contents.append(_tokens().tobytes())
    with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens" in (err.value.details() or "")
