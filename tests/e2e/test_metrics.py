"""Prometheus metrics on the real server: exact counts (requests_total counts every request, failures_total the
failed ones, decode failures included), rejections apart from failures, agreement with the statistics endpoint, a
valid exposition (promtool), and a real Prometheus server scraping us."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server.metrics import FAILURE_REASONS
from tests.conftest import ServerProcess
from tests.models import fixtures


def tool(name: str) -> str | None:
    """A binary from the venv (make test puts promtool and prometheus there), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _infer_n(server: ServerProcess, n: int, model: str = "mlp") -> None:
    client = grpcclient.InferenceServerClient(server.grpc_address)
    tensor = grpcclient.InferInput("x", [2, 8], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 8), np.float32))
    for _ in range(n):
        client.infer(model, [tensor])


@pytest.fixture
def metrics_server(start_server, tmp_path: Path) -> ServerProcess:
    fixtures.write_model(tmp_path, "mlp", fixtures.float_mlp())
    fixtures.write_model(
        tmp_path,
        "slow",
        fixtures.slow_model(256, 200),
        config="max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 1 } }",
    )
    return start_server(tmp_path)


def test_counters_grow_by_exactly_n_and_agree_with_stats(metrics_server: ServerProcess) -> None:
    url = metrics_server.http_url
    before = scrape(url)
    _infer_n(metrics_server, 7)
    bad = httpx.post(
        f"{url}/v2/models/mlp/infer",
        json={"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": [0] * 8}]},
    )
    assert bad.status_code == 400
    after = scrape(url)
    ids = {"model": "mlp", "version": "1"}
    assert (
        value(after, "optiserve_inference_requests_total", **ids)
        - value(before, "optiserve_inference_requests_total", **ids)
        == 8
    )
    assert value(after, "optiserve_inferences_total", **ids) - value(before, "optiserve_inferences_total", **ids) == 14
    invalid = value(after, "optiserve_inference_failures_total", **ids, reason="invalid")
    assert invalid - value(before, "optiserve_inference_failures_total", **ids, reason="invalid") == 1
    assert value(after, "optiserve_request_duration_seconds_count", **ids) >= 8
    stats = httpx.get(f"{url}/v2/models/mlp/stats").json()["model_stats"][0]
    outcomes = sum(stats["inference_stats"][kind]["count"] for kind in ("success", "fail", "rejected"))
    assert outcomes == value(after, "optiserve_inference_requests_total", **ids)
    assert stats["inference_count"] == value(after, "optiserve_inferences_total", **ids)
    assert stats["execution_count"] == value(after, "optiserve_executions_total", **ids)
    assert stats["inference_stats"]["fail"]["count"] == invalid
    assert value(after, "optiserve_model_state", model="mlp", version="1", state="READY") == 1
    assert value(after, "optiserve_pending_requests", **ids) == 0
    assert value(after, "process_resident_memory_bytes") > 0


BINARY_HEADER = b'{"inputs":[{"name":"x","shape":[1,8],"datatype":"FP32","parameters":{"binary_data_size":32}}]}'
# Requests to the known model "mlp" that fail while decoded or checked, each kind a 400 on HTTP.
BAD_HTTP: list[tuple[bytes, dict[str, str]]] = [
    (b'{"inputs": [', {}),  # not JSON
    (orjson.dumps({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.5] * 15}]}), {}),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP99", "data": [0] * 8}]}), {}),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": [0] * 8}]}), {}),
    (BINARY_HEADER + bytes(32), {"Inference-Header-Content-Length": "x"}),  # bad binary header
    (BINARY_HEADER + bytes(31), {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}),  # short binary
]


def _bad_grpc(server: ServerProcess) -> int:
    """gRPC requests to "mlp" that fail while decoded: unary and streamed. Returns how many were sent."""
    channel = grpc.insecure_channel(server.grpc_address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    wrong_count = pb.ModelInferRequest(model_name="mlp")
    wrong_count.inputs.add(name="x", datatype="FP32", shape=[2, 8])
    wrong_count.raw_input_contents.append(bytes(4 * 15))
    wrong_type = pb.ModelInferRequest(model_name="mlp")
    wrong_type.inputs.add(name="x", datatype="FP99", shape=[1, 8])
    wrong_type.raw_input_contents.append(bytes(32))
    for request in (wrong_count, wrong_type):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    replies = list(stub.ModelStreamInfer(iter([wrong_count, wrong_type]), timeout=30))
    assert len(replies) == 2 and all(reply.error_message for reply in replies)
    channel.close()
    return 4


def test_every_failed_request_counts_and_requests_total_counts_every_outcome(metrics_server: ServerProcess) -> None:
    """N good and M bad requests of every failure kind (HTTP JSON and binary decode failures, gRPC unary and
    streamed): requests_total grows by N + M, failures_total by M, so failures / requests is the error ratio.
    Requests to a model nobody loaded count under model="" and make no series of their own."""
    url = metrics_server.http_url
    before = scrape(url)
    good = 5
    _infer_n(metrics_server, good)
    for body, headers in BAD_HTTP:
        response = httpx.post(f"{url}/v2/models/mlp/infer", content=body, headers=headers)
        assert response.status_code == 400, (body, headers, response.text)
    bad = len(BAD_HTTP) + _bad_grpc(metrics_server)
    for _ in range(2):
        assert httpx.post(f"{url}/v2/models/ghost/infer", content=b"{}").status_code == 404
    after = scrape(url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ids = {"model": "mlp", "version": "1"}
    assert grew("optiserve_inference_requests_total", **ids) == good + bad
    failed = sum(grew("optiserve_inference_failures_total", **ids, reason=reason) for reason in FAILURE_REASONS)
    assert failed == bad
    assert grew("optiserve_inference_failures_total", **ids, reason="invalid") == bad
    unrouted = {"model": "", "version": ""}
    assert grew("optiserve_inference_requests_total", **unrouted) == 2
    assert grew("optiserve_inference_failures_total", **unrouted, reason="not_found") == 2
    assert not [key for key in after if ("model", "ghost") in key[1]], "a client-supplied name became a series"
    stats = httpx.get(f"{url}/v2/models/mlp/stats").json()["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] == value(after, "optiserve_inference_failures_total", **ids, reason="invalid")


def test_rejections_are_not_failures(metrics_server: ServerProcess) -> None:
    url = metrics_server.http_url
    body = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.5] * 256}]}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post(f"{url}/v2/models/slow/infer", json=body) for _ in range(20))
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert 503 in statuses
    after = scrape(url)
    ids = {"model": "slow", "version": "1"}
    assert value(after, "optiserve_inference_failures_total", **ids, reason="rejected") == statuses.count(503)
    assert value(after, "optiserve_inference_failures_total", **ids, reason="backend") == 0
    assert value(after, "optiserve_inference_requests_total", **ids) == len(statuses)  # every outcome counts
    stats = httpx.get(f"{url}/v2/models/slow/stats").json()["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] == 0 and stats["rejected"]["count"] == statuses.count(503)


def test_exposition_passes_promtool(metrics_server: ServerProcess) -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make test unpacks it from Debian's 'prometheus')")
    _infer_n(metrics_server, 2)
    text = httpx.get(f"{metrics_server.http_url}/metrics").text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_can_be_turned_off_or_moved(start_server, tmp_path: Path) -> None:
    fixtures.write_model(tmp_path, "mlp", fixtures.float_mlp())
    off = start_server(tmp_path, "--no-metrics")
    assert httpx.get(f"{off.http_url}/metrics").status_code == 404
    port = _free_port()
    moved = start_server(tmp_path, "--metrics-port", str(port))
    _infer_n(moved, 3)
    assert (
        value(scrape(f"http://127.0.0.1:{port}"), "optiserve_inference_requests_total", model="mlp", version="1") == 3
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _every_shipped_query_answers(api: str) -> None:
    """Each PromQL expression of the Grafana dashboard and of the recording rules, evaluated by the real
    Prometheus on what it scraped from the real server, returns data (and not only NaN) where traffic flowed."""
    from tests.deploy.test_manifests import prometheus_queries, rules_file_queries

    queries = {name: q for name, q in prometheus_queries().items() if name.startswith("dashboard")}
    queries |= {f"rule {i}": q for i, q in enumerate(rules_file_queries()) if "up{" not in q}
    for name, query in queries.items():
        response = httpx.get(api, params={"query": query.replace("[1m]", "[30s]").replace("[5m]", "[30s]")}).json()
        assert response["status"] == "success", (name, response)
        if "Failures" in name or " > " in query or " == 0" in query or "LOADING" in query:
            continue  # no failures happened and no alert fires: empty is the right answer
        results = response["data"]["result"]
        assert results, f"{name}: no data for {query}"
        assert any(float(r["value"][1]) == float(r["value"][1]) for r in results), f"{name}: only NaN for {query}"


def test_real_prometheus_scrapes_us(metrics_server: ServerProcess, tmp_path: Path) -> None:
    binary = tool("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (make test unpacks it from Debian's 'prometheus')")
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: optiserve\n    static_configs: [{{targets: ['127.0.0.1:{metrics_server.http_port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        _infer_n(metrics_server, 25)
        deadline = time.monotonic() + 60
        total = None
        while time.monotonic() < deadline:
            try:
                data = httpx.get(api, params={"query": 'optiserve_inference_requests_total{model="mlp"}'}).json()
                if data["data"]["result"]:
                    total = float(data["data"]["result"][0]["value"][1])
                    if total == 25:
                        break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        assert total == 25
        _infer_n(metrics_server, 25)
        time.sleep(2.5)
        query = (
            'histogram_quantile(0.5, sum by (le) (rate(optiserve_request_duration_seconds_bucket{model="mlp"}[1m])))'
        )
        result = httpx.get(api, params={"query": query}).json()["data"]["result"]
        assert result and 0 < float(result[0]["value"][1]) < 1.0
        _every_shipped_query_answers(api)
    finally:
        proc.terminate()
        proc.wait(10)
