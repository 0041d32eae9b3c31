"""On the real server: uploads carrying model-level files. Triton's load with ``file:labels.txt`` gives a
classifier its labels; the curl upload's ``file`` field brings warmup data that runs before READY; an uploaded
``samples.npz`` becomes the optimizer's reference; bad keys and a config naming a missing file get 400."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess
from tests.models import fixtures

LABELS = b"zero\nun\nzwei\ntres\nvier\n"
CLASSIFIER = {
    "max_batch_size": 4,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [8]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [5], "label_filename": "labels.txt"}],
}
WARMUP = {
    "max_batch_size": 4,
    "model_warmup": [
        {
            "name": "file",
            "batch_size": 1,
            "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [8], "input_data_file": "x.bin"}},
        }
    ],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("extra_files")
    (root / "repo").mkdir()
    env = {"OPTISERVE_OPTIMIZE_MODE": "before_ready", "OPTISERVE_CACHE_DIR": str(root / "cache")}
    proc = ServerProcess(root / "repo", env=env).start()
    yield proc
    proc.stop()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _load(server: ServerProcess, name: str, parameters: dict[str, str]) -> httpx.Response:
    url = f"{server.http_url}/v2/repository/models/{name}/load"
    return httpx.post(url, json={"parameters": parameters}, timeout=300)


def _report(server: ServerProcess, name: str) -> dict[str, Any]:
    response = httpx.get(f"{server.http_url}/v2/models/{name}/optimization", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _model() -> bytes:
    return fixtures.float_mlp(classes=5, seed=3).SerializeToString()


def test_load_with_a_label_file_gives_classification_labels(server: ServerProcess) -> None:
    parameters = {
        "config": json.dumps(CLASSIFIER),
        "file:1/model.onnx": _b64(_model()),
        "file:labels.txt": _b64(LABELS),
    }
    response = _load(server, "labeled", parameters)
    assert response.status_code == 200, response.text
    body = {
        "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}],
        "outputs": [{"name": "y", "parameters": {"classification": 5}}],
    }
    reply = httpx.post(f"{server.http_url}/v2/models/labeled/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    texts = reply.json()["outputs"][0]["data"]
    labels = {text.split(":")[1]: text.split(":")[2] for text in texts}
    assert labels == {"0": "zero", "1": "un", "2": "zwei", "3": "tres", "4": "vier"}


def test_curl_upload_with_a_warmup_file_runs_it_before_ready(server: ServerProcess) -> None:
    files = [
        ("model", ("net.onnx", _model(), "application/octet-stream")),
        ("file", ("warmup/x.bin", np.ones(8, np.float32).tobytes(), "application/octet-stream")),
    ]
    response = httpx.post(
        f"{server.http_url}/v2/repository/models/warmed/upload?wait=true",
        files=files,
        data={"config": json.dumps(WARMUP)},
        timeout=300,
    )
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "READY"
    warmup = _report(server, "warmed")["warmup"]
    assert warmup["source"] == "model_warmup"
    assert [(e["name"], e["batch_size"]) for e in warmup["entries"]] == [("file", 1)]


def test_uploaded_samples_are_the_optimizers_reference(server: ServerProcess) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    files = [
        ("model", ("model.onnx", _model(), "application/octet-stream")),
        ("samples", ("samples.npz", buffer.getvalue(), "application/octet-stream")),
    ]
    config = {"max_batch_size": 4, "optimize": {"precision": "auto"}}
    response = httpx.post(
        f"{server.http_url}/v2/repository/models/sampled/upload?wait=true",
        files=files,
        data={"config": json.dumps(config)},
        timeout=300,
    )
    assert response.status_code == 201, response.text
    assert _report(server, "sampled")["reference"]["source"] == "samples"


@pytest.mark.parametrize("key", ["file:../x", "file:warmup/../x", "file:/etc/passwd", "file:.hidden", "file:1/../x"])
def test_bad_keys_are_400(server: ServerProcess, key: str) -> None:
    response = _load(server, "badkey", {"file:1/model.onnx": _b64(_model()), key: _b64(b"x")})
    assert response.status_code == 400, response.text


def test_a_config_naming_a_missing_label_file_is_400(server: ServerProcess) -> None:
    response = _load(server, "nolabels", {"config": json.dumps(CLASSIFIER), "file:1/model.onnx": _b64(_model())})
    assert response.status_code == 400
    assert "output[0].label_filename" in response.text
    assert httpx.get(f"{server.http_url}/v2/models/nolabels/ready", timeout=10).status_code != 200
