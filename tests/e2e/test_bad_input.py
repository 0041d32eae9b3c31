"""Bad requests get the protocol's error (right status, a message naming the field), and the server
stays live after each one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
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
