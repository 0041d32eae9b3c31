"""Dynamic batching, backpressure, timeouts, reload under load and graceful drain on the real server."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from tests.models import fixtures

SLOW_SIZE = 256


@pytest.fixture(scope="module")
def slow_model():
    return fixtures.slow_model(SLOW_SIZE, 200)


def _reference(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


async def _many_clients(module, address: str, model: str, xs: list[np.ndarray]) -> list[np.ndarray]:
    client = module.InferenceServerClient(address)
    try:

        async def one(x: np.ndarray) -> np.ndarray:
            tensor = module.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = await client.infer(model, [tensor])
            return result.as_numpy("y")

        return await asyncio.gather(*(one(x) for x in xs))
    finally:
        await client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_64_concurrent_clients_are_batched_exactly(start_server, tmp_path: Path, slow_model, protocol: str) -> None:
    fixtures.write_model(tmp_path, "slow", slow_model)
    server = start_server(tmp_path)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, SLOW_SIZE)).astype(np.float32) for _ in range(64)]
    module, address = (httpaio, server.http_address) if protocol == "http" else (grpcaio, server.grpc_address)
    results = asyncio.run(_many_clients(module, address, "slow", xs))
    expected = _reference(slow_model, np.concatenate(xs))
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, expected[i : i + 1], rtol=1e-4, atol=1e-5)
    stats = httpx.get(f"{server.http_url}/v2/models/slow/stats").json()["model_stats"][0]
    assert stats["inference_count"] == 64
    assert stats["execution_count"] < stats["inference_count"]
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 1


def test_multi_sample_requests_are_split_back(start_server, tmp_path: Path, slow_model) -> None:
    fixtures.write_model(tmp_path, "slow", slow_model)
    server = start_server(tmp_path)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, SLOW_SIZE)).astype(np.float32) for n in (3, 1, 5, 2, 4, 1, 3, 2) * 4]
    results = asyncio.run(_many_clients(grpcaio, server.grpc_address, "slow", xs))
    for x, got in zip(xs, results, strict=True):
        assert got.shape == (x.shape[0], SLOW_SIZE)
        np.testing.assert_allclose(got, _reference(slow_model, x), rtol=1e-4, atol=1e-5)


QUEUE_OF_TWO = """
max_batch_size: 1
dynamic_batching { default_queue_policy { max_queue_size: 2 } }
"""


def test_full_queue_rejects_fast_with_retry_after(start_server, tmp_path: Path, slow_model) -> None:
    fixtures.write_model(tmp_path, "slow", slow_model, config=QUEUE_OF_TWO)
    server = start_server(tmp_path)
    x = np.ones((1, SLOW_SIZE), np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, SLOW_SIZE], "datatype": "FP32", "data": x.ravel().tolist()}]}

    async def burst() -> list[tuple[int, float, httpx.Headers, dict]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:

            async def one() -> tuple[int, float, httpx.Headers, dict]:
                started = time.monotonic()
                response = await client.post(f"{server.http_url}/v2/models/slow/infer", json=body)
                return response.status_code, time.monotonic() - started, response.headers, response.json()

            return await asyncio.gather(*(one() for _ in range(40)))

    results = asyncio.run(burst())
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) >= 2
    for status, _elapsed, headers, payload in results:
        if status == 503:
            assert headers["retry-after"] == "1"
            assert "queue is full" in payload["error"]
        else:
            np.testing.assert_allclose(payload["outputs"][0]["data"], _reference(slow_model, x).ravel(), rtol=1e-4)
    stats = httpx.get(f"{server.http_url}/v2/models/slow/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == statuses.count(200)
    assert server.is_live()


TIMEOUTS = """
max_batch_size: 1
dynamic_batching {
  default_queue_policy { allow_timeout_override: true max_queue_size: 100 }
  priority_levels: 2
  default_priority_level: 2
}
"""


def test_queue_timeout_and_priority(start_server, tmp_path: Path, slow_model) -> None:
    fixtures.write_model(tmp_path, "slow", slow_model, config=TIMEOUTS)
    server = start_server(tmp_path)
    x = np.ones((1, SLOW_SIZE), np.float32)

    async def scenario() -> tuple[list, list]:
        client = grpcaio.InferenceServerClient(server.grpc_address)
        tensor = grpcaio.InferInput("x", [1, SLOW_SIZE], "FP32")
        tensor.set_data_from_numpy(x)

        async def one(**kw):
            try:
                return await client.infer("slow", [tensor], **kw)
            except InferenceServerException as exc:
                return exc

        background = [asyncio.ensure_future(one()) for _ in range(30)]
        await asyncio.sleep(0.01)
        timed = await asyncio.gather(*(one(timeout=1000) for _ in range(5)))  # 1 ms in a ~30 ms queue
        urgent = await asyncio.gather(*(one(priority=1) for _ in range(3)))
        rest = await asyncio.gather(*background)
        await client.close()
        return timed, urgent + rest

    timed, others = asyncio.run(scenario())
    expired = [r for r in timed if isinstance(r, InferenceServerException)]
    assert expired, "a 1 ms queue timeout behind 30 slow requests must expire"
    assert all(e.status() == "StatusCode.DEADLINE_EXCEEDED" for e in expired)
    assert not [r for r in others if isinstance(r, InferenceServerException)]
    response = httpx.post(
        f"{server.http_url}/v2/models/slow/infer",
        json={
            "inputs": [{"name": "x", "shape": [1, SLOW_SIZE], "datatype": "FP32", "data": [0.0] * SLOW_SIZE}],
            "parameters": {"priority": 9},
        },
    )
    assert response.status_code == 400 and "priority" in response.json()["error"]


def test_reload_under_load_fails_no_request(start_server, tmp_path: Path) -> None:
    fixtures.write_model(tmp_path, "m", fixtures.float_mlp(seed=1))
    server = start_server(tmp_path)
    failures: list[str] = []
    done = threading.Event()
    counts = {"ok": 0}

    def load() -> None:
        client = grpcclient.InferenceServerClient(server.grpc_address)
        tensor = grpcclient.InferInput("x", [1, 8], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 8), np.float32))
        while not done.is_set():
            try:
                client.infer("m", [tensor])
                counts["ok"] += 1
            except InferenceServerException as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        control = httpclient.InferenceServerClient(server.http_address)
        for version in (2, 3):
            time.sleep(0.3)
            fixtures.write_model(tmp_path, "m", fixtures.float_mlp(seed=version), version=version)
            control.load_model("m")
            assert control.is_model_ready("m", str(version))
        time.sleep(0.3)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert counts["ok"] > 50
    assert failures == []


def test_sigterm_drains_accepted_requests(start_server, tmp_path: Path, slow_model) -> None:
    fixtures.write_model(tmp_path, "slow", slow_model, config="max_batch_size: 1\ndynamic_batching {}")
    server = start_server(tmp_path, "--exit-timeout-s", "20")
    x = np.ones((1, SLOW_SIZE), np.float32)
    results: list[object] = []

    def client() -> None:
        c = grpcclient.InferenceServerClient(server.grpc_address)
        tensor = grpcclient.InferInput("x", [1, SLOW_SIZE], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            results.append(c.infer("slow", [tensor]).as_numpy("y"))
        except InferenceServerException as exc:
            results.append(exc)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until all 24 are accepted by the server
        stats = httpx.get(f"{server.http_url}/v2/models/slow/stats").json()["model_stats"][0]
        queued = httpx.get(f"{server.http_url}/v2/models/slow/ready")
        if queued.status_code == 200 and stats["inference_count"] >= 1:
            break
        time.sleep(0.005)
    time.sleep(0.05)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    ready = None
    try:
        ready = httpx.get(f"{server.http_url}/v2/health/ready", timeout=2).status_code
    except httpx.HTTPError:
        ready = "refused"
    for thread in threads:
        thread.join(30)
    assert server.proc.wait(30) == 0
    assert ready in (503, "refused")
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 24 and errors == [], errors
    assert "stopped" in server.log
