"""Real traffic as the optimizer's reference, on the real server in background mode: requests with a distinctive
input distribution arrive over HTTP and gRPC while the version serves its original model; the optimizer waits
for them, calibrates INT8 and runs the guard on them, the report says reference source ``traffic`` with the
sample count, and the version is then served optimized, also at once after a restart (no request data stays in
the cache folder for it). A model that opts out is optimized on generated inputs and its report says why."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import ServerProcess
from tests.models import fixtures

CONFIG = "optimize {{ precision: int8 accuracy {{ top1: 0.9 }} time_budget_s: 0.3 {extra}}}\n"
REQUESTS = 12
ROWS = 4
MIN_SAMPLES = 24


def _traffic(seed: int) -> np.ndarray:
    """Not what the optimizer would generate (N(0, 1)): positive, shifted and skewed, like real features."""
    rng = np.random.default_rng(seed)
    return (2.0 + rng.gamma(2.0, 0.75, (ROWS, 256))).astype(np.float32)


def _send(server: ServerProcess, name: str, x: np.ndarray, *, grpc: bool) -> np.ndarray:
    client: Any
    if grpc:
        client, module = grpcclient.InferenceServerClient(server.grpc_address), grpcclient
    else:
        client, module = httpclient.InferenceServerClient(server.http_address), httpclient
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    output = client.infer(name, [tensor]).as_numpy("y")
    client.close()
    return np.asarray(output)


def _report(server: ServerProcess, name: str) -> dict[str, Any]:
    return httpx.get(f"{server.http_url}/v2/models/{name}/optimization", timeout=10).json()


def _until_optimized(server: ServerProcess, name: str, timeout_s: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    report = _report(server, name)
    while report["phase"] == "optimizing" and time.monotonic() < deadline:
        time.sleep(0.2)
        report = _report(server, name)
    return report


def _index_reason(server: ServerProcess, name: str) -> str:
    """The repository index's reason for ``name`` once its background run has started (it starts on READY)."""
    deadline, reason = time.monotonic() + 10, ""
    while time.monotonic() < deadline:
        rows = httpx.post(f"{server.http_url}/v2/repository/index", json={}, timeout=10).json()
        reason = next(row["reason"] for row in rows if row["name"] == name)
        if reason.startswith("optimizing: "):
            break
        time.sleep(0.05)
    return reason


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_optimizer_calibrates_and_guards_on_real_traffic_then_serves_the_variant(
    start_server, tmp_path: Path
) -> None:
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    model = fixtures.wide_mlp()
    fixtures.write_model(repo, "wide", model, config=CONFIG.format(extra=""))
    fixtures.write_model(repo, "wide_opted_out", model, config=CONFIG.format(extra="from_traffic: false "))
    env = {
        "OPTISERVE_DEFAULT_PRECISION": "auto",
        "OPTISERVE_CACHE_DIR": str(cache),
        "OPTISERVE_OPTIMIZE_MODE": "background",
        "OPTISERVE_OPTIMIZE_TRAFFIC_MIN_SAMPLES": str(MIN_SAMPLES),
    }
    server: ServerProcess = start_server(repo, "--optimize-traffic-wait-s", "120", env=env)
    waiting = _report(server, "wide")
    assert waiting["phase"] == "optimizing" and waiting["selected"] == "original", waiting
    assert _index_reason(server, "wide") == f"optimizing: waiting for request samples (0/{MIN_SAMPLES})"

    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(REQUESTS):  # half over HTTP, half over gRPC: both edges feed the sample
        x = _traffic(seed)
        served = _send(server, "wide", x, grpc=seed % 2 == 1)
        np.testing.assert_allclose(served, original.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)

    report = _until_optimized(server, "wide")
    sent = REQUESTS * ROWS
    assert report["phase"] == "optimized" and report["selected"].startswith("int8"), report
    assert report["reference"]["source"] == "traffic", report["reference"]
    count = report["reference"]["count"]
    assert (
        MIN_SAMPLES <= count <= sent
        and report["reference"]["note"] == f"{count} samples of the version's real requests"
    )
    traffic = report["traffic"]
    assert traffic["used"] is True and traffic["samples"] == count and MIN_SAMPLES <= traffic["seen"] <= sent
    assert traffic["waited_s"] < 120

    budget = next(s for s in report["steps"] if s["name"] == report["selected"])["thresholds"].get("cosine", 0.99)
    x = _traffic(1000)
    variant = _send(server, "wide", x, grpc=False)
    expected = original.run(None, {"x": x})[0]
    assert not np.array_equal(variant, expected), "the INT8 variant serves"
    assert _cosine(variant, expected) >= budget - 1e-3

    opted_out = _until_optimized(server, "wide_opted_out")
    assert opted_out["reference"]["source"] != "traffic", opted_out["reference"]
    assert opted_out["traffic"] == {"used": False, "reason": "off for this model (optimize.from_traffic: false)"}
    folder = cache / "traffic"
    assert (list(folder.iterdir()) if folder.is_dir() else []) == []  # the samples file went with its run

    server.stop()  # a restart on the same cache serves the variant proven on traffic before READY
    again: ServerProcess = start_server(repo, "--optimize-traffic-wait-s", "120", env=env)
    restarted = _report(again, "wide")
    assert restarted["phase"] == "optimized" and restarted["cache_hit"] is True, restarted
    assert restarted["selected"] == report["selected"] and restarted["reference"] == report["reference"]
    assert _cosine(_send(again, "wide", x, grpc=True), expected) >= budget - 1e-3


def test_with_no_traffic_the_bounded_wait_ends_on_generated_inputs(start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "wide", fixtures.wide_mlp(), config=CONFIG.format(extra=""))
    env = {"OPTISERVE_CACHE_DIR": str(tmp_path / "cache"), "OPTISERVE_OPTIMIZE_TRAFFIC_WAIT_S": "1"}
    server: ServerProcess = start_server(repo, env=env)
    report = _until_optimized(server, "wide")
    assert report["phase"] in ("optimized", "original") and report["reference"]["source"] != "traffic"
    assert report["traffic"]["used"] is False and report["traffic"]["samples"] == 0
    assert report["traffic"]["reason"] == (
        "0 of 32 request samples within 1 s (--optimize-traffic-wait-s): generated inputs instead"
    )
