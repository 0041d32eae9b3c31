"""Serve first, optimize after, on the real server: an upload is READY with the original model, answers while
the optimizer runs in the background (slowed by --optimize-delay-s), then the INT8 variant is swapped in on the
same version while concurrent clients keep sending: none of their requests fails."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from tests.conftest import ServerProcess
from tests.models import fixtures

CLIENTS = 4


def _infer(client: httpx.Client, url: str, x: np.ndarray) -> tuple[int, np.ndarray | None]:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = client.post(f"{url}/v2/models/wide/infer", json=body, timeout=30)
    if response.status_code != 200:
        return response.status_code, None
    output = response.json()["outputs"][0]
    return 200, np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_upload_serves_the_original_at_once_then_swaps_the_variant_in_under_load(start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        "OPTISERVE_DEFAULT_PRECISION": "auto",
        "OPTISERVE_CACHE_DIR": str(tmp_path / "cache"),
        "OPTISERVE_OPTIMIZE_DELAY_S": "2",
    }
    server: ServerProcess = start_server(repo, env=env)
    model = fixtures.wide_mlp()
    config = {"optimize": {"precision": "int8", "accuracy": {"top1": 0.9}}}
    files = {"model": ("model.onnx", model.SerializeToString(), "application/octet-stream")}
    started = time.monotonic()
    uploaded = httpx.post(
        f"{server.http_url}/v2/repository/models/wide/upload?wait=true",
        files=files,
        data={"config": json.dumps(config)},
        timeout=300,
    )
    assert uploaded.status_code == 201 and uploaded.json()["state"] == "READY", uploaded.text
    report_url = f"{server.http_url}/v2/models/wide/optimization"
    first = httpx.get(report_url).json()
    assert first["phase"] == "optimizing" and first["selected"] == "original", first
    assert set(first) >= {"model", "version", "device", "selected", "engine", "cache_hit", "reference", "steps"}

    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    original = session.run(None, {"x": x})[0]
    stop = threading.Event()
    results: list[tuple[float, int, np.ndarray | None]] = []

    def client() -> None:
        with httpx.Client() as http:
            while not stop.is_set():
                status, output = _infer(http, server.http_url, x)
                results.append((time.monotonic(), status, output))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    phases, reasons = {first["phase"]}, set()
    report = first
    deadline = time.monotonic() + 180
    while report["phase"] == "optimizing" and time.monotonic() < deadline:
        time.sleep(0.05)
        report = httpx.get(report_url).json()
        phases.add(report["phase"])
        rows = httpx.post(f"{server.http_url}/v2/repository/index", json={}).json()
        reasons |= {row["reason"] for row in rows if row["name"] == "wide"}
    swapped_at = time.monotonic()
    time.sleep(1.5)  # keep the clients going through the old batcher's drain
    stop.set()
    for thread in threads:
        thread.join(30)

    assert report["phase"] == "optimized" and report["selected"].startswith("int8"), report
    assert report["step"] == "" and report["steps"] and report["cache_hit"] is False
    assert any(reason.startswith("optimizing") for reason in reasons), reasons
    failures = [status for _, status, _ in results if status != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed during the swap: {set(failures)}"
    assert len(results) > CLIENTS * 10
    budget = next(s for s in report["steps"] if s["name"] == report["selected"])["thresholds"].get("cosine", 0.99)
    exact = 0
    for _, _, output in results:
        assert output is not None
        if np.allclose(output, original, rtol=1e-5, atol=1e-5):
            exact += 1
        else:
            assert _cosine(output, original) >= budget - 1e-3
    assert exact > 0, "the original model served while the optimizer ran"
    late = [output for at, _, output in results if at > swapped_at + 0.5]
    assert late and all(o is not None and not np.array_equal(o, original) for o in late), "the variant serves"
    metrics = httpx.get(f"{server.http_url}/metrics").text
    ready = _sample(metrics, "optiserve_model_time_to_ready_seconds")
    optimized = _sample(metrics, "optiserve_model_time_to_optimized_seconds")
    assert ready < optimized < time.monotonic() - started
    assert "optimizing" in server.log and "optimized" in server.log


def _sample(metrics: str, family: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(f'{family}{{model="wide",version="1"}}'))
    return float(line.split()[-1])
