"""tritonclient (HTTP JSON, HTTP binary, gRPC) against the real server: outputs equal in-process onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import ServerProcess
from tests.e2e.conftest import reference_outputs, sample_inputs

MODELS = ["mlp", "int64", "multi_io", "dynamic_seq", "no_batch", "strings", "fp16", "configured", "yaml_configured"]
PROTOCOLS = ["http-json", "http-binary", "grpc"]
DATATYPES = {np.float32: "FP32", np.float16: "FP16", np.int64: "INT64", np.object_: "BYTES"}


def _datatype(array: np.ndarray) -> str:
    return DATATYPES[array.dtype.type]


def infer(server: ServerProcess, protocol: str, model: str, inputs: dict[str, np.ndarray], outputs=None, **kw):
    """Run one request with NVIDIA's client, returning {output name: array}."""
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(server.grpc_address)
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), _datatype(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
        result = client.infer(model, tensors, outputs=requested, **kw)
        names = [o.name for o in result.get_response().outputs]
    else:
        binary = protocol == "http-binary"
        client = httpclient.InferenceServerClient(server.http_address)
        tensors = []
        for name, array in inputs.items():
            tensor = httpclient.InferInput(name, list(array.shape), _datatype(array))
            tensor.set_data_from_numpy(array, binary_data=binary)
            tensors.append(tensor)
        requested = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs] if outputs else None
        result = client.infer(model, tensors, outputs=requested, **kw)
        names = [o["name"] for o in result.get_response()["outputs"]]
    return {name: result.as_numpy(name) for name in names}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
def test_outputs_match_onnxruntime(server: ServerProcess, model_repo: Path, model: str, protocol: str) -> None:
    if model == "fp16" and protocol == "http-json":
        pytest.skip("tritonclient cannot send FP16 as JSON (the V2 JSON form has no FP16 encoding)")
    inputs = sample_inputs(model, np.random.default_rng(7))
    expected = reference_outputs(model_repo / model / "1" / "model.onnx", inputs)
    got = infer(server, protocol, model, inputs)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        if want.dtype == object:
            assert [bytes(v) for v in got[name].reshape(-1)] == list(want.reshape(-1))
        else:
            assert got[name].dtype == want.dtype, name
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_subset_of_outputs_and_id(server: ServerProcess, protocol: str) -> None:
    inputs = sample_inputs("multi_io", np.random.default_rng(1))
    got = infer(server, protocol, "multi_io", inputs, outputs=["prod"], request_id="req-42")
    assert list(got) == ["prod"]
    np.testing.assert_allclose(got["prod"], inputs["a"] * inputs["b"], rtol=1e-6)


def test_id_is_echoed(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http_address)
    tensor = httpclient.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 8), np.float32))
    assert client.infer("mlp", [tensor], request_id="abc-1").get_response()["id"] == "abc-1"
    gclient = grpcclient.InferenceServerClient(server.grpc_address)
    gtensor = grpcclient.InferInput("x", [1, 8], "FP32")
    gtensor.set_data_from_numpy(np.ones((1, 8), np.float32))
    assert gclient.infer("mlp", [gtensor], request_id="abc-2").get_response().id == "abc-2"


def test_gzip_request_body(server: ServerProcess) -> None:
    inputs = sample_inputs("mlp", np.random.default_rng(3))
    plain = infer(server, "http-binary", "mlp", inputs)
    for algorithm in ("gzip", "deflate"):
        got = infer(server, "http-binary", "mlp", inputs, request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(got["y"], plain["y"])


def test_latest_version_policy(server: ServerProcess, model_repo: Path) -> None:
    inputs = sample_inputs("mlp", np.random.default_rng(5))
    expected = reference_outputs(model_repo / "versioned" / "2" / "model.onnx", inputs)["y"]
    for protocol in PROTOCOLS:
        np.testing.assert_allclose(infer(server, protocol, "versioned", inputs)["y"], expected, rtol=1e-6)
        np.testing.assert_allclose(
            infer(server, protocol, "versioned", inputs, model_version="2")["y"], expected, rtol=1e-6
        )
    client = httpclient.InferenceServerClient(server.http_address)
    assert client.is_model_ready("versioned", "2")
    assert not client.is_model_ready("versioned", "1")
