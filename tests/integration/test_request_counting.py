"""Every inference request is counted once, whatever ends it and whichever edge took it: the HTTP inference
endpoint (server/http/fast.py), gRPC ModelInfer and ModelStreamInfer. ``optiserve_inference_requests_total`` counts
every request and ``optiserve_inference_failures_total`` the failed ones, so failures / requests is the error
ratio; a request that fails while it is decoded (bad JSON, wrong element count, unknown datatype, a bad binary
header) is a failure of its model like any other. Requests that never reach a served version (unknown model or
version) count under model="" (client-supplied names are not labels)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server.metrics import FAILURE_REASONS
from tests.integration.stack import serving
from tests.models import fixtures

GOOD = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.25] * 16}]}
BINARY_HEADER = b'{"inputs":[{"name":"x","shape":[1,8],"datatype":"FP32","parameters":{"binary_data_size":32}}]}'
# (body, headers) pairs that fail while decoded or validated: each a 400 for the known model "mlp".
HTTP_BAD: list[tuple[bytes, dict[str, str]]] = [
    (b'{"inputs": [', {}),  # not JSON
    (json.dumps({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.25] * 15}]}).encode(), {}),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP99", "data": [0] * 8}]}).encode(), {}),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": [0] * 8}]}).encode(), {}),
    (BINARY_HEADER + bytes(32), {"Inference-Header-Content-Length": "abc"}),  # bad binary header
    (BINARY_HEADER + bytes(31), {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}),  # short binary
]


def _sample(registry: Any, name: str, **labels: str) -> float:
    return float(registry.get_sample_value(name, labels) or 0.0)


def _grpc_request(elements: int = 16, datatype: str = "FP32", model: str = "mlp") -> Any:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype=datatype, shape=[2, 8])
    request.raw_input_contents.append(np.full(elements, 0.25, np.float32).tobytes())
    return request


GRPC_BAD = [_grpc_request(elements=15), _grpc_request(datatype="FP99"), _grpc_request(datatype="FP64")]


async def _http(app: Any, path: str, body: bytes, headers: dict[str, str]) -> int:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return (await client.post(path, content=body, headers=headers)).status_code


async def _grpc_unary(stub: Any, request: Any) -> bool:
    try:
        await stub.ModelInfer(request)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc
        return False
    return True


async def _grpc_stream(stub: Any, requests: list[Any]) -> list[bool]:
    async def send() -> AsyncIterator[Any]:
        for request in requests:
            yield request

    return [not reply.error_message async for reply in stub.ModelStreamInfer(send())]


def test_every_request_counts_once_on_every_edge(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> None:
        async with serving(repo, tmp_path) as (server, port):
            reg = server.metrics.registry
            ids = {"model": "mlp", "version": "1"}
            outcomes: list[bool] = []
            good = json.dumps(GOOD).encode()
            for _ in range(3):
                assert await _http(server.asgi_app, "/v2/models/mlp/infer", good, {}) == 200
                outcomes.append(True)
            for body, headers in HTTP_BAD:
                assert await _http(server.asgi_app, "/v2/models/mlp/infer", body, headers) == 400, (body, headers)
                outcomes.append(False)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for request in [_grpc_request(), _grpc_request(), *GRPC_BAD]:
                    outcomes.append(await _grpc_unary(stub, request))
                streamed = await _grpc_stream(stub, [_grpc_request(), *GRPC_BAD, _grpc_request()])
                outcomes.extend(streamed)
                assert streamed.count(False) == len(GRPC_BAD)
                # Never reaching a version: counted under model="", not under a name a client made up.
                assert not await _grpc_unary(stub, _grpc_request(model="ghost"))
            assert await _http(server.asgi_app, "/v2/models/ghost/infer", good, {}) == 404
            assert await _http(server.asgi_app, "/v2/models/mlp/versions/9/infer", good, {}) == 404

            failed = outcomes.count(False)
            assert _sample(reg, "optiserve_inference_requests_total", **ids) == len(outcomes)
            assert _sample(reg, "optiserve_inference_failures_total", **ids, reason="invalid") == failed
            total_failed = sum(
                _sample(reg, "optiserve_inference_failures_total", **ids, reason=r) for r in FAILURE_REASONS
            )
            assert total_failed == failed
            assert _sample(reg, "optiserve_request_duration_seconds_count", **ids) == len(outcomes)
            stats = server.models.get("mlp").stats.to_json("mlp", "1")["inference_stats"]
            assert stats["success"]["count"] == outcomes.count(True) and stats["fail"]["count"] == failed

            unrouted = {"model": "", "version": ""}
            assert _sample(reg, "optiserve_inference_requests_total", **unrouted) == 3
            assert _sample(reg, "optiserve_inference_failures_total", **unrouted, reason="not_found") == 3
            names = {s.labels.get("model") for f in reg.collect() for s in f.samples if "model" in s.labels}
            assert "ghost" not in names

    asyncio.run(scenario())


def test_a_client_that_goes_away_counts_as_canceled(tmp_path: Path) -> None:
    """The inference endpoint drops a queued request whose client disconnected: a request, and a ``canceled`` one."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())

    async def scenario() -> None:
        messages = [{"type": "http.request", "body": json.dumps(GOOD).encode(), "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            raise AssertionError(f"nobody is listening, yet the server sent {message}")

        scope = {"type": "http", "method": "POST", "path": "/v2/models/mlp/infer", "headers": [], "client": None}
        async with serving(repo, tmp_path) as (server, _):
            version = server.models.get("mlp")
            version.batcher.submit = _never(asyncio.Event())  # type: ignore[method-assign]
            await asyncio.wait_for(server.asgi_app(scope, receive, send), 5)
        ids = {"model": "mlp", "version": "1"}
        assert _sample(server.metrics.registry, "optiserve_inference_requests_total", **ids) == 1
        assert _sample(server.metrics.registry, "optiserve_inference_failures_total", **ids, reason="canceled") == 1

    asyncio.run(scenario())


def _never(gate: asyncio.Event) -> Callable[..., Awaitable[Any]]:
    async def submit(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()  # never set: the request stays queued until its client goes away

    return submit
