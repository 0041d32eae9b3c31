"""Repository behaviour on the real server: bad configs fail alone with a reason, load/unload work over
both protocols, and readiness follows the models meant to be loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.models import fixtures


def wait_until_loaded(server: ServerProcess, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index = httpx.post(f"{server.http_url}/v2/repository/index").json()
        if all(row["state"] != "LOADING" for row in index):
            return index
        time.sleep(0.05)
    raise AssertionError("models still loading")


def test_bad_models_fail_alone_with_a_reason(start_server, tmp_path: Path) -> None:
    fixtures.write_model(tmp_path, "good", fixtures.float_mlp())
    fixtures.write_model(tmp_path, "bad_config", fixtures.float_mlp(), config="max_batch_size: [oops")
    fixtures.write_model(
        tmp_path, "wrong_input", fixtures.float_mlp(), config='input [{ name: "nope" data_type: TYPE_FP32 dims: [8] }]'
    )
    (tmp_path / "garbage" / "1").mkdir(parents=True)
    (tmp_path / "garbage" / "1" / "model.onnx").write_bytes(b"this is not onnx")
    (tmp_path / "empty").mkdir()
    server = start_server(tmp_path, wait_ready=False)
    index = {row["name"]: row for row in wait_until_loaded(server)}
    assert index["good"]["state"] == "READY"
    assert index["bad_config"]["state"] == "UNAVAILABLE" and "config.pbtxt" in index["bad_config"]["reason"]
    assert "nope" in index["wrong_input"]["reason"]
    assert "ONNX" in index["garbage"]["reason"]
    assert "version" in index["empty"]["reason"]
    # Strict readiness (Triton's default): a model meant to be loaded that failed keeps the server unready.
    assert httpx.get(f"{server.http_url}/v2/health/ready").status_code == 503
    client = httpclient.InferenceServerClient(server.http_address)
    tensor = httpclient.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 8), np.float32))
    assert client.infer("good", [tensor]).as_numpy("y").shape == (1, 4)
    response = httpx.post(f"{server.http_url}/v2/models/bad_config/infer", json={"inputs": []})
    assert response.status_code == 404 and "config.pbtxt" in response.json()["error"]
    # Unloading the broken models takes them out of the readiness count.
    for name in ("bad_config", "wrong_input", "garbage", "empty"):
        client.unload_model(name)
    assert client.is_server_ready()
    assert server.is_live()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unload_and_load(start_server, tmp_path: Path, protocol: str) -> None:
    fixtures.write_model(tmp_path, "m", fixtures.float_mlp())
    server = start_server(tmp_path)
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_address if protocol == "http" else server.grpc_address)
    tensor = module.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 8), np.float32))
    before = client.infer("m", [tensor]).as_numpy("y")
    client.unload_model("m")
    assert not client.is_model_ready("m")
    assert client.is_server_ready(), "an explicit unload must not make the server unready"
    with pytest.raises(InferenceServerException):
        client.infer("m", [tensor])
    # A new version appears on disk; load picks it up (latest policy), the old one goes.
    fixtures.write_model(tmp_path, "m", fixtures.float_mlp(seed=9), version=2)
    client.load_model("m")
    assert client.is_model_ready("m", "2") and not client.is_model_ready("m", "1")
    after = client.infer("m", [tensor]).as_numpy("y")
    assert not np.allclose(before, after)
    # load with a config override (Triton's `config` parameter): serve every version.
    client.load_model("m", config=json.dumps({"version_policy": {"all": {}}}))
    assert client.is_model_ready("m", "1") and client.is_model_ready("m", "2")
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("ghost")
    assert "ghost" in str(exc.value)
    with pytest.raises(InferenceServerException) as bad:
        client.load_model("m", config=json.dumps({"max_batch_size": "many"}))
    assert "max_batch_size" in str(bad.value)
    assert client.is_model_ready("m", "2"), "a failed reload keeps the previous versions serving"


def test_traversal_names_are_refused(server: ServerProcess) -> None:
    for name in ("..", "..%2F..%2Fetc", "%2Fetc%2Fpasswd"):
        response = httpx.post(f"{server.http_url}/v2/repository/models/{name}/load")
        assert response.status_code in (400, 404), (name, response.status_code)
        assert "error" in response.json()
    assert server.is_live()
