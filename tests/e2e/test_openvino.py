"""OpenVINO on the real server: a trained digits MLP is uploaded, the optimizer races the OpenVINO candidates
against onnxruntime's kernels, and the server serves what the report names, within the budget it states. Where
the plugin offers this CPU (Intel) an OpenVINO candidate must win and serve; elsewhere (another vendor, or the
plugin not installed) its steps say why and onnxruntime serves."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from bench.digits import Digits, trained_digits
from optimizers import openvino
from optimizers.accuracy import relative_l2
from optimizers.providers import CPU, OPENVINO
from tests.conftest import ServerProcess

OPENVINO_STEPS = ("openvino_fp32", "openvino_bf16", "openvino_int8")
CONFIG = {
    "max_batch_size": 32,
    "dynamic_batching": {"preferred_batch_size": [32]},  # throughput is compared at batch 32
    "optimize": {"precision": "auto", "mode": "before_ready"},
}


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits(hidden=4096, epochs=30)  # wide enough for kernels, not call overhead, to decide


@pytest.fixture
def ov_server(start_server, tmp_path: Path) -> ServerProcess:
    repo = tmp_path / "repo"
    repo.mkdir()
    return start_server(repo, env={"OPTISERVE_CACHE_DIR": str(tmp_path / "cache")})


def _upload_and_report(server: ServerProcess, digits: Digits) -> dict:
    files = {"model": ("model.onnx", digits.model.SerializeToString(), "application/octet-stream")}
    response = httpx.post(
        f"{server.http_url}/v2/repository/models/digits/upload?wait=true",
        files=files,
        data={"config": json.dumps(CONFIG)},
        timeout=600,
    )
    assert response.status_code == 201, response.text
    return httpx.get(f"{server.http_url}/v2/models/digits/optimization").json()


def _served(server: ServerProcess, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = httpx.post(f"{server.http_url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def _original(digits: Digits, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(digits.model.SerializeToString(), providers=[CPU])
    return np.asarray(session.run(None, {"x": x})[0])


def test_openvino_serves_what_the_report_names(ov_server: ServerProcess, digits: Digits) -> None:
    report = _upload_and_report(ov_server, digits)
    steps = {step["name"]: step for step in report["steps"]}
    x, labels = digits.x_test[:32], digits.y_test[:32]
    served, original = _served(ov_server, x), _original(digits, x)
    found = openvino.availability()  # the server runs on this machine: it found the same
    if not found.offers("CPU"):
        for name in OPENVINO_STEPS:
            assert steps[name]["status"] == "skipped" and found.reason in steps[name]["reason"], steps[name]
        assert report["engine"]["engine"] == "onnxruntime"
        assert all(OPENVINO not in instance["providers"] for instance in report["instances"])
        return
    for name in ("openvino_fp32", "openvino_int8"):  # every OpenVINO candidate that ran, ran on OpenVINO
        assert steps[name]["details"]["engine"]["nodes"].get(OPENVINO, 0) > 0, steps[name]
    reasons = {name: f"{steps[name]['status']}: {steps[name]['reason']}" for name in OPENVINO_STEPS}
    assert report["selected"] in OPENVINO_STEPS, f"OpenVINO did not win here: {reasons}"
    chosen = steps[report["selected"]]
    engine = report["engine"]
    assert (engine["engine"], engine["device"]) == ("openvino", "CPU") and engine["nodes"].get(OPENVINO, 0) > 0
    assert engine["precision_hint"] == ("bf16" if report["selected"] == "openvino_bf16" else "f32")
    assert all(instance["providers"][0] == OPENVINO for instance in report["instances"]), report["instances"]
    budget = chosen["thresholds"]
    if "rel_l2" in budget:
        assert relative_l2(original.astype(np.float64), served.astype(np.float64)) <= budget["rel_l2"]
    if "top1" in budget:  # random reference inputs set the budget; real digits must keep it too
        assert (served.argmax(1) == original.argmax(1)).mean() >= budget["top1"] - 1 / 32
    assert (served.argmax(1) == labels).mean() >= (original.argmax(1) == labels).mean() - 2 / 32


def test_a_listed_openvino_is_never_dropped_in_silence(start_server, tmp_path: Path) -> None:
    """--execution-providers names OpenVINO: where the plugin offers no CPU, the report's notes, the OpenVINO steps
    and the server log say so, and onnxruntime serves the model correctly; where it does, the candidates run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    listed = json.dumps([OPENVINO, CPU])
    env = {"OPTISERVE_CACHE_DIR": str(tmp_path / "cache"), "OPTISERVE_EXECUTION_PROVIDERS": listed}
    server = start_server(repo, env=env)
    small = trained_digits()
    report = _upload_and_report(server, small)
    steps = {step["name"]: step for step in report["steps"]}
    found = openvino.availability()
    if found.offers("CPU"):
        assert report["notes"] == []
        assert all("execution_providers" not in steps[name]["reason"] for name in OPENVINO_STEPS)
    else:
        (note,) = report["notes"]
        assert f"lists {OPENVINO}, which is unavailable here" in note and found.reason in note
        assert note in server.log
        for name in OPENVINO_STEPS:
            assert (
                steps[name]["status"] == "skipped"
                and "listed in execution_providers but unavailable" in (steps[name]["reason"])
            )
    x = small.x_test[:8]
    served, original = _served(server, x), _original(small, x)
    assert (served.argmax(1) == original.argmax(1)).all()
