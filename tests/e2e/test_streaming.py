"""Triton's bidirectional ModelStreamInfer with tritonclient's stream API: results match onnxruntime and are
matched by id, a bad request gets an in-stream error without ending the stream, and perf_analyzer's
--streaming mode runs."""

from __future__ import annotations

import queue
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ServerProcess
from tests.models import fixtures


def test_stream_answers_every_request_and_survives_a_bad_one(start_server, tmp_path: Path) -> None:
    model = fixtures.float_mlp()
    fixtures.write_model(tmp_path, "mlp", model)
    server: ServerProcess = start_server(tmp_path)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_address)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    rng = np.random.default_rng(0)
    sent: dict[str, np.ndarray] = {}
    try:
        for i in range(20):
            x = rng.standard_normal((1 + i % 3, 8)).astype(np.float32)
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            sent[f"r{i}"] = x
            client.async_stream_infer("mlp", [tensor], request_id=f"r{i}")
        bad = grpcclient.InferInput("x", [1, 8], "FP64")
        bad.set_data_from_numpy(np.ones((1, 8), np.float64))
        client.async_stream_infer("mlp", [bad], request_id="bad")
        replies = [results.get(timeout=30) for _ in range(21)]
    finally:
        client.stop_stream()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    errors = [error for _, error in replies if error is not None]
    assert len(errors) == 1 and "FP64" in str(errors[0])
    answered = {result.get_response().id: result.as_numpy("y") for result, error in replies if error is None}
    assert set(answered) == set(sent)
    for request_id, x in sent.items():
        np.testing.assert_allclose(answered[request_id], session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_perf_analyzer_streaming(start_server, tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        pytest.skip("perf_analyzer is not installed (make test installs it with bench/install-perf-analyzer.sh)")
    fixtures.write_model(tmp_path, "mlp", fixtures.float_mlp())
    server: ServerProcess = start_server(tmp_path)
    cmd = [str(binary), "-m", "mlp", "-u", server.grpc_address, "-i", "grpc", "--streaming", "--concurrency-range", "4"]
    cmd += ["--measurement-interval", "1000", "--max-trials", "3", "--stability-percentage", "999"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "throughput" in result.stdout.lower() and "error" not in result.stdout.lower(), result.stdout
