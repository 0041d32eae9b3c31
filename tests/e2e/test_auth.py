"""Access control on the real server, HTTP and gRPC: management from loopback only while no admin token
is set; with OPTISERVE_ADMIN_TOKEN / OPTISERVE_INFERENCE_TOKEN, bearer tokens from everyone (401 without,
403 wrong). "Elsewhere" is a real non-loopback peer: the server binds 0.0.0.0 and the client connects to
this machine's own non-loopback address, so the server sees that address as the peer."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.models import fixtures

ADMIN, INFER = "admin-t0ken", "infer-t0ken"
X = np.ones((2, 8), np.float32)
HTTP_STATUS = {"401": 401, "403": 403, "StatusCode.UNAUTHENTICATED": 401, "StatusCode.PERMISSION_DENIED": 403}


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.123", 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def http_url(server: ServerProcess, host: str) -> str:
    return f"http://{host}:{server.http_port}"


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def upload(server: ServerProcess, host: str, token: str | None, name: str = "up", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{http_url(server, host)}/v2/repository/models/{name}/upload?wait=true",
        files={"model": ("model.onnx", fixtures.float_mlp(seed=3).SerializeToString())},
        headers={**bearer(token), **headers},
        timeout=60,
    )


def triton_status(call, *args, **kwargs) -> int:
    """Run a tritonclient call; 200 when it succeeds, else the HTTP-equivalent status of its error."""
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return HTTP_STATUS.get(str(exc.status()), 400)
    return 200


def management_statuses(server: ServerProcess, host: str, token: str | None) -> dict[str, int]:
    """Upload, load (with files and without) and unload over HTTP and gRPC, from ``host``."""
    http = httpclient.InferenceServerClient(f"{host}:{server.http_port}")
    rpc = grpcclient.InferenceServerClient(f"{host}:{server.grpc_port}")
    files = {"file:1/model.onnx": fixtures.float_mlp(seed=4).SerializeToString()}
    headers = bearer(token)
    return {
        "http upload": upload(server, host, token).status_code,
        "http load files": triton_status(http.load_model, "viahttp", headers=headers, config="{}", files=files),
        "grpc load files": triton_status(rpc.load_model, "viagrpc", headers=headers, config="{}", files=files),
        "http load": triton_status(http.load_model, "m", headers=headers),
        "grpc load": triton_status(rpc.load_model, "m", headers=headers),
        "http unload": triton_status(http.unload_model, "m", headers=headers),
        "grpc unload": triton_status(rpc.unload_model, "m", headers=headers),
    }


def inference_statuses(server: ServerProcess, host: str, token: str | None) -> dict[str, int]:
    headers = bearer(token)  # copied per call: tritonclient's HTTP infer adds its own headers to the dict
    http = httpclient.InferenceServerClient(f"{host}:{server.http_port}")
    rpc = grpcclient.InferenceServerClient(f"{host}:{server.grpc_port}")
    http_in = httpclient.InferInput("x", list(X.shape), "FP32")
    http_in.set_data_from_numpy(X)
    grpc_in = grpcclient.InferInput("x", list(X.shape), "FP32")
    grpc_in.set_data_from_numpy(X)
    base = http_url(server, host)
    return {
        "http infer": triton_status(http.infer, "base", [http_in], headers=dict(headers)),
        "grpc infer": triton_status(rpc.infer, "base", [grpc_in], headers=headers),
        "http metadata": httpx.get(f"{base}/v2/models/base", headers=headers).status_code,
        "grpc metadata": triton_status(rpc.get_model_metadata, "base", headers=headers),
        "http index": httpx.post(f"{base}/v2/repository/index", headers=headers).status_code,
        "grpc stats": triton_status(rpc.get_inference_statistics, "base", headers=headers),
    }


def health_statuses(server: ServerProcess, host: str) -> dict[str, object]:
    """Health never needs a token (probes carry none)."""
    base = http_url(server, host)
    rpc = grpcclient.InferenceServerClient(f"{host}:{server.grpc_port}")
    with grpc.insecure_channel(f"{host}:{server.grpc_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return {
        "http live": httpx.get(f"{base}/v2/health/live").status_code,
        "http ready": httpx.get(f"{base}/v2/health/ready").status_code,
        "http model ready": httpx.get(f"{base}/v2/models/base/ready").status_code,
        "grpc live": rpc.is_server_live(),
        "grpc ready": rpc.is_server_ready(),
        "grpc health": check.status == health_pb2.HealthCheckResponse.SERVING,
    }


def _repo(tmp_path: Path) -> Path:
    fixtures.write_model(tmp_path, "base", fixtures.float_mlp())
    fixtures.write_model(tmp_path, "m", fixtures.float_mlp(seed=2))
    return tmp_path


def _all(statuses: dict[str, int], status: int) -> None:
    """Every call ended with ``status`` (200 stands for any success, e.g. the upload's 201)."""
    normalized = {key: 200 if 200 <= value < 300 else value for key, value in statuses.items()}
    assert normalized == dict.fromkeys(statuses, status), statuses


HEALTHY = {
    "http live": 200,
    "http ready": 200,
    "http model ready": 200,
    "grpc live": True,
    "grpc ready": True,
    "grpc health": True,
}


def test_without_tokens_management_is_loopback_only(start_server, tmp_path: Path) -> None:
    remote = non_loopback_address()
    if remote is None:
        pytest.skip("no non-loopback address on this machine to connect from")
    server = start_server(_repo(tmp_path), "--host", "0.0.0.0")
    before = sorted(p.name for p in tmp_path.iterdir())
    _all(management_statuses(server, remote, None), 403)
    _all(management_statuses(server, remote, "anything"), 403)  # no token is configured: none opens it
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused upload must leave nothing"
    _all(inference_statuses(server, remote, None), 200)
    assert health_statuses(server, remote) == HEALTHY
    _all(management_statuses(server, "127.0.0.1", None), 200)
    assert (tmp_path / "up" / "1" / "model.onnx").is_file()


def test_forwarded_for_from_a_local_proxy_is_not_loopback(start_server, tmp_path: Path) -> None:
    """uvicorn trusts X-Forwarded-For from loopback proxies, so a reverse proxy on the same host that sets
    it does not turn every client into a loopback client."""
    server = start_server(_repo(tmp_path))
    response = upload(server, "127.0.0.1", None, **{"x-forwarded-for": "203.0.113.7"})
    assert response.status_code == 403 and "203.0.113.7" in response.json()["error"]
    assert upload(server, "127.0.0.1", None).status_code == 201


def test_with_tokens(start_server, tmp_path: Path) -> None:
    env = {"OPTISERVE_ADMIN_TOKEN": ADMIN, "OPTISERVE_INFERENCE_TOKEN": INFER}
    server = start_server(_repo(tmp_path), "--host", "0.0.0.0", env=env)
    remote = non_loopback_address()
    for host in ("127.0.0.1", remote) if remote else ("127.0.0.1",):
        _all(management_statuses(server, host, None), 401)
        _all(management_statuses(server, host, "wrong"), 403)
        _all(management_statuses(server, host, INFER), 403)
        _all(inference_statuses(server, host, None), 401)
        _all(inference_statuses(server, host, "wrong"), 403)
        _all(inference_statuses(server, host, INFER), 200)
        _all(inference_statuses(server, host, ADMIN), 200)
        assert health_statuses(server, host) == HEALTHY
    assert not (tmp_path / "up").exists() and not (tmp_path / "viahttp").exists()
    _all(management_statuses(server, remote or "127.0.0.1", ADMIN), 200)
    response = upload(server, "127.0.0.1", None)
    assert response.status_code == 401 and "Bearer" in response.json()["error"]
    assert ADMIN not in response.text and INFER not in response.text
    config = httpx.get(f"{server.http_url}/v2/models/viagrpc/config", headers=bearer(INFER)).json()
    assert json.loads(json.dumps(config))["name"] == "viagrpc"
