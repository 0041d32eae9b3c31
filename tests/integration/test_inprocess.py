"""In-process tier: the composition root's pieces (manager, data plane, FastAPI app, inference fast path,
grpc.aio on port 0) wired in one event loop, driven by httpx's ASGI transport and a gRPC stub. The FastAPI
inference route and the fast path in front of it must answer identically."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server import tensors
from server.auth import AccessPolicy
from server.dataplane import DataPlane
from server.http.app import create_http_app
from server.http.fast import InferFastPath
from server.models import ModelManager
from server.repository import Repository
from server.rpc.service import create_grpc_server
from server.settings import Settings
from tests.models import fixtures

BODY = {"id": "r1", "inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.25] * 16}]}
BAD = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP64", "data": [0.25] * 16}]}


async def _stack(repo: Path, tmp: Path) -> tuple[ModelManager, Any, Any, grpc.aio.Server, int]:
    settings = Settings(model_repository=repo, default_precision="none", cache_dir=tmp / "cache")
    manager = ModelManager(Repository(repo), settings)
    await manager.load_all()
    dataplane = DataPlane(manager)
    fastapi_app = create_http_app(dataplane, settings)
    limits = tensors.Limits(settings.max_tensor_elements, settings.max_tensor_rank, settings.max_inputs)
    fast = InferFastPath(
        fastapi_app, dataplane, settings.max_request_bytes, limits, AccessPolicy.from_settings(settings)
    )
    grpc_server = create_grpc_server(dataplane, settings)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    return manager, fastapi_app, fast, grpc_server, port


async def _post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(path, content=json.dumps(body))
        return response.status_code, response.json()


def test_fastapi_route_and_fast_path_agree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> None:
        manager, fastapi_app, fast, grpc_server, port = await _stack(repo, tmp_path)
        try:
            for body in (BODY, BAD):
                via_fastapi = await _post(fastapi_app, "/v2/models/mlp/infer", body)
                via_fast = await _post(fast, "/v2/models/mlp/infer", body)
                assert via_fastapi == via_fast
            status, payload = await _post(fast, "/v2/models/mlp/infer", BODY)
            assert status == 200 and payload["id"] == "r1" and payload["outputs"][0]["shape"] == [2, 4]
            status, payload = await _post(fast, "/v2/models/ghost/infer", BODY)
            assert status == 404 and "ghost" in payload["error"]
            # Everything that is not inference falls through the fast path to FastAPI.
            transport = httpx.ASGITransport(app=fast)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert (await client.get("/v2/health/ready")).json() == {"ready": True}
                assert (await client.get("/v2/models/mlp/config")).json()["max_batch_size"] == 32
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = pb.ModelInferRequest(model_name="mlp")
                request.inputs.add(name="x", datatype="FP32", shape=[2, 8])
                request.raw_input_contents.append(np.full((2, 8), 0.25, np.float32).tobytes())
                reply = await stub.ModelInfer(request)
                grpc_out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 4)
                np.testing.assert_allclose(
                    grpc_out.ravel(), payload_values(await _post(fast, "/v2/models/mlp/infer", BODY))
                )
        finally:
            await grpc_server.stop(0)
            await manager.close(1)

    asyncio.run(scenario())


def payload_values(result: tuple[int, dict[str, Any]]) -> list[float]:
    return list(result[1]["outputs"][0]["data"])


def test_disconnected_client_is_not_answered(tmp_path: Path) -> None:
    """The fast path's watcher drops a request whose client went away while it was queued."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> list[dict[str, Any]]:
        manager, _, fast, grpc_server, _ = await _stack(repo, tmp_path)
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": json.dumps(BODY).encode(), "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            return {"type": "http.disconnect"}  # the client is gone as soon as its body is read

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        version = manager.get("mlp")
        gate = asyncio.Event()
        original = version.batcher.submit

        async def slow_submit(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()  # never released: the request stays "queued" until cancelled
            return await original(*args, **kwargs)

        version.batcher.submit = slow_submit  # type: ignore[method-assign]
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v2/models/mlp/infer",
            "headers": [],
            "client": ("127.0.0.1", 1),
        }
        try:
            await asyncio.wait_for(fast(scope, receive, send), 5)
        finally:
            await grpc_server.stop(0)
            await manager.close(1)
        return sent

    assert asyncio.run(scenario()) == []


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/mlp/versions/1/infer"])
def test_fast_path_matches_both_infer_paths(path: str) -> None:
    from server.http.fast import INFER_PATH

    match = INFER_PATH.fullmatch(path)
    assert match is not None and match.group(1) == "mlp"
    assert INFER_PATH.fullmatch("/v2/models/mlp/infer/extra") is None
