"""On the real server: Triton's model_warmup runs before a version is READY and its report says so; a
model without one gets the default warmup; a failing warmup entry fails the load (400) naming the entry and
the file, and the model does not serve."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess
from tests.models import fixtures

WARMUP = {
    "max_batch_size": 4,
    "dynamic_batching": {},
    "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    "model_warmup": [
        {
            "name": "random",
            "batch_size": 4,
            "count": 3,
            "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [8], "random_data": True}},
        },
        {
            "name": "file",
            "batch_size": 1,
            "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [8], "input_data_file": "x.bin"}},
        },
    ],
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("warmup")
    fixtures.write_model(repo, "plain", fixtures.float_mlp())
    _write_warm(repo, "warm", np.ones(8, np.float32).tobytes())
    return repo


def _write_warm(repo: Path, name: str, data: bytes) -> None:
    fixtures.write_model(repo, name, fixtures.float_mlp(), config=json.dumps(WARMUP), config_name="config.json")
    (repo / name / "warmup").mkdir()
    (repo / name / "warmup" / "x.bin").write_bytes(data)


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo).start()
    yield proc
    proc.stop()


def _load(server: ServerProcess, name: str, parameters: dict[str, str] | None = None) -> httpx.Response:
    body = {"parameters": parameters or {}}
    return httpx.post(f"{server.http_url}/v2/repository/models/{name}/load", json=body, timeout=120)


def _report(server: ServerProcess, name: str) -> dict:
    response = httpx.get(f"{server.http_url}/v2/models/{name}/optimization", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _serves(server: ServerProcess, name: str) -> bool:
    body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1.0] * 8}]}
    return httpx.post(f"{server.http_url}/v2/models/{name}/infer", json=body, timeout=30).status_code == 200


def test_model_warmup_runs_on_every_instance_before_ready(server: ServerProcess) -> None:
    assert httpx.get(f"{server.http_url}/v2/models/warm/ready", timeout=10).status_code == 200
    warmup = _report(server, "warm")["warmup"]
    assert warmup["source"] == "model_warmup"
    assert [(e["name"], e["batch_size"], e["count"], e["instances"]) for e in warmup["entries"]] == [
        ("random", 4, 3, 2),
        ("file", 1, 1, 2),
    ]
    assert _serves(server, "warm")


def test_a_model_without_model_warmup_gets_the_default_one(server: ServerProcess) -> None:
    warmup = _report(server, "plain")["warmup"]
    assert warmup["source"] == "default" and "skipped" not in warmup
    assert warmup["entries"][0]["batch_size"] == 1 and warmup["entries"][0]["instances"] >= 1


def test_an_uploaded_config_with_model_warmup_loads_ready(server: ServerProcess) -> None:
    config = {**WARMUP, "model_warmup": WARMUP["model_warmup"][:1]}
    model = fixtures.float_mlp(seed=3).SerializeToString()
    response = _load(
        server, "uploaded", {"config": json.dumps(config), "file:1/model.onnx": base64.b64encode(model).decode()}
    )
    assert response.status_code == 200, response.text
    assert _report(server, "uploaded")["warmup"]["entries"][0]["name"] == "random"
    assert _serves(server, "uploaded")


def test_a_failing_warmup_fails_the_load_naming_the_entry(server: ServerProcess, repo: Path) -> None:
    _write_warm(repo, "short", b"\0" * 31)  # one sample of FP32 [8] needs 32 bytes
    response = _load(server, "short")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "model_warmup[1] ('file')" in error and "warmup/x.bin has 31 bytes" in error, error
    assert not _serves(server, "short")
    index = httpx.post(f"{server.http_url}/v2/repository/index", json={}, timeout=10).json()
    (entry,) = [e for e in index if e["name"] == "short"]
    assert entry["state"] == "UNAVAILABLE" and "model_warmup[1]" in entry["reason"], entry


def test_an_uploaded_warmup_that_names_a_missing_input_is_400(server: ServerProcess) -> None:
    bad = {"batch_size": 1, "inputs": {"nope": {"data_type": "TYPE_FP32", "dims": [8], "zero_data": True}}}
    config = {"max_batch_size": 4, "model_warmup": [bad]}
    model = fixtures.float_mlp().SerializeToString()
    response = _load(
        server, "badwarm", {"config": json.dumps(config), "file:1/model.onnx": base64.b64encode(model).decode()}
    )
    assert response.status_code == 400, response.text
    assert "model_warmup[0].inputs" in response.json()["error"]
