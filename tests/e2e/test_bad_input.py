"""Bad requests get the protocol's error (right status, a message naming the field), and the server
stays live after each one."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess

GOOD_INPUT = {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}


def post_infer(server: ServerProcess, body: bytes | dict, model: str = "mlp", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.http_url}/v2/models/{model}/infer", content=content, timeout=10, **kw)


BAD_REQUESTS = [
    ("unknown input name", {"inputs": [{**GOOD_INPUT, "name": "nope"}]}, 400, "nope"),
    ("wrong datatype", {"inputs": [{**GOOD_INPUT, "datatype": "FP64"}]}, 400, "FP64"),
    ("unknown datatype", {"inputs": [{**GOOD_INPUT, "datatype": "FLOAT99"}]}, 400, "FLOAT99"),
    ("count differs from shape", {"inputs": [{**GOOD_INPUT, "data": [1.0] * 7}]}, 400, "7 elements"),
    ("negative dim", {"inputs": [{**GOOD_INPUT, "shape": [-1, 8]}]}, 400, "negative"),
    ("wrong rank", {"inputs": [{**GOOD_INPUT, "shape": [8]}]}, 400, "rank"),
    ("wrong fixed dim", {"inputs": [{**GOOD_INPUT, "shape": [2, 4]}]}, 400, "dim 1"),
    (
        "batch over max_batch_size",
        {"inputs": [{**GOOD_INPUT, "shape": [33, 8], "data": [0.0] * 264}]},
        400,
        "max_batch",
    ),
    ("missing inputs", {"outputs": []}, 400, "inputs"),
    ("data of wrong type", {"inputs": [{**GOOD_INPUT, "data": ["a"] * 8}]}, 400, "FP32"),
    ("unknown output", {"inputs": [GOOD_INPUT], "outputs": [{"name": "zzz"}]}, 400, "zzz"),
    ("shape not a list", {"inputs": [{**GOOD_INPUT, "shape": "1,8"}]}, 400, "shape"),
]


@pytest.mark.parametrize(("case", "body", "status", "mentions"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_json_requests(server: ServerProcess, case: str, body: dict, status: int, mentions: str) -> None:
    response = post_infer(server, body)
    assert response.status_code == status, response.text
    assert mentions in response.json()["error"]
    assert server.is_live()


def test_unknown_model_and_version_are_404(server: ServerProcess) -> None:
    response = post_infer(server, {"inputs": [GOOD_INPUT]}, model="ghost")
    assert response.status_code == 404 and "ghost" in response.json()["error"]
    response = httpx.post(f"{server.http_url}/v2/models/mlp/versions/9/infer", json={"inputs": [GOOD_INPUT]})
    assert response.status_code == 404 and "9" in response.json()["error"]
    assert httpx.get(f"{server.http_url}/v2/models/ghost").status_code == 404
    assert httpx.get(f"{server.http_url}/v2/models/ghost/config").status_code == 404
    assert httpx.get(f"{server.http_url}/v2/models/ghost/stats").status_code == 404
    assert server.is_live()


def test_malformed_json_is_400(server: ServerProcess) -> None:
    for body in (b"{not json", b"[1, 2]", b""):
        response = post_infer(server, body)
        assert response.status_code == 400, body
        assert "JSON" in response.json()["error"] or "inputs" in response.json()["error"]
    assert server.is_live()


def test_huge_shape_with_one_element_is_fast_400(server: ServerProcess) -> None:
    started = time.monotonic()
    response = post_infer(server, {"inputs": [{**GOOD_INPUT, "shape": [1000000000], "data": [1.0]}]})
    assert response.status_code == 400
    assert time.monotonic() - started < 2.0
    binary_header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1000000000, 8], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}
    ).encode()
    response = post_infer(
        server, binary_header + b"\0\0\0\0", headers={"Inference-Header-Content-Length": str(len(binary_header))}
    )
    assert response.status_code == 400
    assert server.is_live()


def test_binary_header_longer_than_body(server: ServerProcess) -> None:
    header = json.dumps({"inputs": [{**GOOD_INPUT, "data": None, "parameters": {"binary_data_size": 32}}]}).encode()
    body = header + np.zeros(8, np.float32).tobytes()
    response = post_infer(server, body, headers={"Inference-Header-Content-Length": str(len(body) + 100)})
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]
    response = post_infer(server, body, headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    short = header + b"\0" * 16
    response = post_infer(server, short, headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400 and "binary_data_size" in response.json()["error"]
    assert server.is_live()


def test_framework_errors_use_the_error_body(server: ServerProcess) -> None:
    response = httpx.get(f"{server.http_url}/v2/no/such/route")
    assert response.status_code == 404 and "error" in response.json()
    response = httpx.get(f"{server.http_url}/v2/models/mlp/infer")
    assert response.status_code == 405 and "error" in response.json()


def test_grpc_errors_have_the_right_codes(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_address)
    tensor = grpcclient.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 8), np.float32))
    with pytest.raises(InferenceServerException) as missing:
        client.infer("ghost", [tensor])
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    wrong = grpcclient.InferInput("x", [1, 8], "FP64")
    wrong.set_data_from_numpy(np.ones((1, 8), np.float64))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("mlp", [wrong])
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT" and "FP64" in bad.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.infer("mlp", [tensor], model_version="7")
    assert version.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_server_live()


def test_limits_give_413(start_server, model_repo: Path) -> None:
    small = start_server(model_repo, "--max-request-bytes", "2048", "--max-grpc-message-bytes", "4096")
    big = {"inputs": [{"name": "x", "shape": [32, 8], "datatype": "FP32", "data": [0.123456789] * 256}]}
    response = post_infer(small, big)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    client = grpcclient.InferenceServerClient(small.grpc_address)
    tensor = grpcclient.InferInput("x", [32, 8], "FP32")
    tensor.set_data_from_numpy(np.ones((32, 8), np.float32) * np.arange(8, dtype=np.float32))
    huge = grpcclient.InferInput("x", [2000, 8], "FP32")
    huge.set_data_from_numpy(np.ones((2000, 8), np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("mlp", [huge])
    assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert small.is_live()


def test_tensor_element_cap(start_server, model_repo: Path) -> None:
    capped = start_server(model_repo, "--max-tensor-elements", "16")
    response = post_infer(capped, {"inputs": [{"name": "x", "shape": [3, 8], "datatype": "FP32", "data": [0.0] * 24}]})
    assert response.status_code == 413 and "24 elements" in response.json()["error"]
    with grpc.insecure_channel(capped.grpc_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
    assert capped.is_live()


# Numbers arrive as text (URL parts, gRPC strings, headers). str.isdigit() accepts all but the ASCII-only ones
# below, and int() then raised (500 / INTERNAL, and a dropped keep-alive connection) or read fullwidth digits as
# numbers. One strict ASCII rule (server/protocol/numbers.py) makes each of them a 400 / INVALID_ARGUMENT naming
# the field.
NOT_ASCII_NUMBERS = [
    pytest.param("\u00b2", id="superscript-two"),
    pytest.param("\u2460", id="circled-one"),
    pytest.param("\uff11", id="fullwidth-one"),
    pytest.param("\u0661", id="arabic-indic-one"),
    pytest.param("+1", id="plus-sign"),
    pytest.param("1_0", id="underscore"),
    pytest.param("-1", id="minus-sign"),
    pytest.param(str(2**63), id="int64-overflow"),
    pytest.param("9" * 300, id="three-hundred-digits"),
]
BAD_VERSIONS = [*NOT_ASCII_NUMBERS, pytest.param(" 1", id="leading-space"), pytest.param("1 ", id="trailing-space")]
VERSION_ROUTES = [
    pytest.param("GET", "", id="metadata"),
    pytest.param("GET", "/ready", id="ready"),
    pytest.param("GET", "/config", id="config"),
    pytest.param("GET", "/stats", id="stats"),
    pytest.param("GET", "/optimization", id="optimization"),
    pytest.param("POST", "/infer", id="infer"),
]


def _keep_alive_exchange(server: ServerProcess, method: str, path: str, body: bytes = b"", **headers: Any) -> Any:
    """One request on a fresh keep-alive connection, then a second on the same socket: the first's response
    and whether the connection survived it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            conn.putheader(name.replace("_", "-"), value)
        conn.endheaders(body)
        response = conn.getresponse()
        payload = json.loads(response.read())
        sock = conn.sock
        conn.request("GET", "/v2/health/live")
        again = conn.getresponse()
        again.read()
        return response.status, payload, sock is not None and conn.sock is sock and again.status == 200
    finally:
        conn.close()


@pytest.mark.parametrize(("method", "suffix"), VERSION_ROUTES)
@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_version_on_every_http_route_is_400(server: ServerProcess, version: str, method: str, suffix: str) -> None:
    path = f"/v2/models/mlp/versions/{urllib.parse.quote(version, safe='')}{suffix}"
    body = json.dumps({"inputs": [GOOD_INPUT]}).encode() if method == "POST" else b""
    status, payload, kept_alive = _keep_alive_exchange(server, method, path, body)
    assert status == 400, payload
    assert "model version" in payload["error"] and "ASCII" in payload["error"]
    assert kept_alive, "the connection was dropped after the error"


@pytest.mark.parametrize(("method", "suffix"), VERSION_ROUTES)
def test_ascii_version_still_serves(server: ServerProcess, method: str, suffix: str) -> None:
    body = json.dumps({"inputs": [GOOD_INPUT]}).encode() if method == "POST" else b""
    status, payload, kept_alive = _keep_alive_exchange(server, method, f"/v2/models/mlp/versions/1{suffix}", body)
    assert status == 200, payload
    assert kept_alive


def _grpc_version_call(stub: Any, rpc: str, version: str) -> Any:
    if rpc == "ModelInfer":
        request = pb.ModelInferRequest(model_name="mlp", model_version=version)
        request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
        request.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
        return stub.ModelInfer(request, timeout=10)
    message = {
        "ModelReady": pb.ModelReadyRequest,
        "ModelMetadata": pb.ModelMetadataRequest,
        "ModelConfig": pb.ModelConfigRequest,
        "ModelStatistics": pb.ModelStatisticsRequest,
    }[rpc]
    return getattr(stub, rpc)(message(name="mlp", version=version), timeout=10)


GRPC_VERSION_RPCS = ["ModelInfer", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"]


@pytest.mark.parametrize("rpc", GRPC_VERSION_RPCS)
@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_version_on_every_grpc_rpc_is_invalid_argument(server: ServerProcess, version: str, rpc: str) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            _grpc_version_call(stub, rpc, version)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert "model version" in str(error.value.details())
        assert _grpc_version_call(stub, rpc, "1") is not None  # and the same channel still serves


@pytest.mark.parametrize(
    "value",
    [
        # latin-1 is how HTTP header bytes become text: b"\xb2" is "²", which isdigit() accepted.
        pytest.param(b"\xb2", id="superscript-two-latin1"),
        pytest.param(b"\xb9", id="superscript-one-latin1"),
        *(pytest.param(str(p.values[0]).encode(), id=f"{p.id}-utf8") for p in NOT_ASCII_NUMBERS),
    ],
)
def test_bad_inference_header_content_length_is_400(server: ServerProcess, value: bytes) -> None:
    body = json.dumps({"inputs": [GOOD_INPUT]}).encode()
    status, payload, kept_alive = _keep_alive_exchange(
        server, "POST", "/v2/models/mlp/infer", body, Inference_Header_Content_Length=value
    )
    assert status == 400, payload
    assert "Inference-Header-Content-Length" in payload["error"]
    assert kept_alive


@pytest.mark.parametrize("typed", ["fp32_contents", "empty_contents"])
def test_grpc_typed_contents_with_raw_input_contents_is_invalid_argument(server: ServerProcess, typed: str) -> None:
    """Triton's protocol forbids both; the raw bytes used to win silently."""
    request = pb.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 8])
    if typed == "empty_contents":
        tensor.contents.SetInParent()
    else:
        tensor.contents.fp32_contents.extend([2.0] * 8)
    request.raw_input_contents.append(np.ones((1, 8), np.float32).tobytes())
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "contents must not be set" in str(error.value.details())
        if typed != "empty_contents":
            del request.raw_input_contents[:]
            assert stub.ModelInfer(request, timeout=10).outputs  # typed contents alone are fine
