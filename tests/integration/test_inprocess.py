"""In-process tier: the composition root's pieces (manager, data plane, the HTTP edge with its inference
endpoint in front of FastAPI, grpc.aio on port 0) wired in one event loop, driven by httpx's ASGI transport and
a gRPC stub. HTTP and gRPC must answer identically."""

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

from tests.integration.stack import serving
from tests.models import fixtures

BODY = {"id": "r1", "inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.25] * 16}]}
BAD = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP64", "data": [0.25] * 16}]}
INFER_PATHS = ["/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"]


async def _post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(path, content=json.dumps(body))
        return response.status_code, response.json()


def test_http_and_grpc_agree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> None:
        async with serving(repo, tmp_path) as (server, port):
            app = server.asgi_app
            status, payload = await _post(app, "/v2/models/mlp/infer", BODY)
            assert status == 200 and payload["id"] == "r1" and payload["outputs"][0]["shape"] == [2, 4]
            assert await _post(app, "/v2/models/mlp/versions/1/infer", BODY) == (status, payload)
            status, error = await _post(app, "/v2/models/mlp/infer", BAD)
            assert status == 400 and "FP64" in error["error"]
            status, error = await _post(app, "/v2/models/ghost/infer", BODY)
            assert status == 404 and "ghost" in error["error"]
            # Everything that is not inference falls through the inference endpoint to FastAPI.
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                assert (await client.get("/v2/health/ready")).json() == {"ready": True}
                assert (await client.get("/v2/models/mlp/config")).json()["max_batch_size"] == 32
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = pb.ModelInferRequest(model_name="mlp")
                request.inputs.add(name="x", datatype="FP32", shape=[2, 8])
                request.raw_input_contents.append(np.full((2, 8), 0.25, np.float32).tobytes())
                reply = await stub.ModelInfer(request)
                grpc_out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 4)
                np.testing.assert_allclose(grpc_out.ravel(), payload["outputs"][0]["data"])

    asyncio.run(scenario())


def test_docs_document_inference_that_fastapi_never_serves(tmp_path: Path) -> None:
    """/docs lists POST .../infer (a docs-only FastAPI entry); the endpoint in front answers every such request."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> None:
        async with serving(repo, tmp_path) as (server, _):
            transport = httpx.ASGITransport(app=server.asgi_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                paths = (await client.get("/openapi.json")).json()["paths"]
                assert (await client.get("/docs")).status_code == 200
            for path in INFER_PATHS:
                operation = paths[path]["post"]
                assert operation["tags"] == ["inference"] and "application/json" in operation["requestBody"]["content"]
            # FastAPI alone has no working inference route: only the endpoint in front of it serves.
            status, error = await _post(server.http_app, "/v2/models/mlp/infer", BODY)
            assert status == 500 and "InferFastPath" in error["error"]

    asyncio.run(scenario())


def test_one_model_lookup_per_request_on_every_edge(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> None:
        async with serving(repo, tmp_path) as (server, port):
            lookups: list[tuple[str, str]] = []
            get = server.models.get

            def counted(name: str, version: str = "") -> Any:
                lookups.append((name, version))
                return get(name, version)

            server.models.get = counted  # type: ignore[method-assign]
            assert (await _post(server.asgi_app, "/v2/models/mlp/versions/1/infer", BODY))[0] == 200
            assert lookups == [("mlp", "1")]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = pb.ModelInferRequest(model_name="mlp")
                request.inputs.add(name="x", datatype="FP32", shape=[2, 8])
                request.raw_input_contents.append(np.full((2, 8), 0.25, np.float32).tobytes())
                await stub.ModelInfer(request)
            assert lookups == [("mlp", "1"), ("mlp", "")]

    asyncio.run(scenario())


def test_one_drain_flag_for_both_edges(tmp_path: Path) -> None:
    """After request_stop: not ready, inference 503 with Retry-After on HTTP and gRPC, a malformed version 400."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> None:
        async with serving(repo, tmp_path) as (server, port):
            server.request_stop()
            transport = httpx.ASGITransport(app=server.asgi_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert (await client.get("/v2/health/ready")).status_code == 503
                assert (await client.get("/v2/models/mlp/ready")).status_code == 503
                assert (await client.get("/v2/models/mlp/versions/x/ready")).status_code == 400
                reply = await client.post("/v2/models/mlp/infer", content=json.dumps(BODY))
                assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
                malformed = await client.post("/v2/models/mlp/versions/x/infer", content=json.dumps(BODY))
                assert malformed.status_code == 400 and "model version" in malformed.json()["error"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ModelInfer(pb.ModelInferRequest(model_name="mlp"))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_disconnected_client_is_not_answered(tmp_path: Path) -> None:
    """The inference endpoint's watcher drops a request whose client went away while it was queued."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": json.dumps(BODY).encode(), "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            return {"type": "http.disconnect"}  # the client is gone as soon as its body is read

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async with serving(repo, tmp_path) as (server, _):
            version = server.models.get("mlp")
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
            await asyncio.wait_for(server.asgi_app(scope, receive, send), 5)
        return sent

    assert asyncio.run(scenario()) == []


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/mlp/versions/1/infer"])
def test_the_endpoint_matches_both_infer_paths(path: str) -> None:
    from server.http.fast import INFER_PATH

    match = INFER_PATH.fullmatch(path)
    assert match is not None and match.group(1) == "mlp"
    assert INFER_PATH.fullmatch("/v2/models/mlp/infer/extra") is None
