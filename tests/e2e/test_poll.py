"""Many replicas on one repository (--model-control-mode poll): an upload through one server is served by
every server within the poll interval plus load time; a new version appears everywhere; a model folder
removed from the repository disappears everywhere."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.conftest import ServerProcess
from tests.e2e.test_upload import model_bytes, upload
from tests.models import fixtures

POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "1")
DEADLINE_S = 20.0


def _status(server: ServerProcess, path: str) -> int:
    return httpx.get(f"{server.http_url}{path}", timeout=5).status_code


def _eventually(servers: list[ServerProcess], path: str, want: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if all(want(_status(s, path)) for s in servers):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path}: {[_status(s, path) for s in servers]} after {DEADLINE_S}s")


def _infer(server: ServerProcess, name: str, version: str = "") -> np.ndarray:
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    url = f"{server.http_url}/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    reply = httpx.post(url, json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    return np.asarray(reply.json()["outputs"][0]["data"], dtype=np.float32)


def test_upload_to_one_replica_is_served_by_all(tmp_path: Path, start_server: Any) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    a, b, c = (start_server(repo, *POLL) for _ in range(3))
    fleet = [a, b, c]

    assert upload(a, "fleet", model_bytes(1)).status_code == 201
    _eventually(fleet, "/v2/models/fleet/ready", lambda code: code == 200)
    served = [_infer(s, "fleet") for s in fleet]
    assert all(np.array_equal(served[0], out) for out in served[1:])

    # A new version through another replica replaces version 1 everywhere (latest 1).
    response = upload(b, "fleet", model_bytes(2))
    assert response.status_code == 201 and response.json()["version"] == "2"
    _eventually(fleet, "/v2/models/fleet/versions/2/ready", lambda code: code == 200)
    _eventually(fleet, "/v2/models/fleet/versions/1/ready", lambda code: code != 200)
    served = [_infer(s, "fleet", "2") for s in fleet]
    assert all(np.array_equal(served[0], out) for out in served[1:])
    assert not np.array_equal(served[0], _infer(a, "base"))

    # Removing the model folder unloads it everywhere; the other models keep serving.
    shutil.rmtree(repo / "fleet")
    _eventually(fleet, "/v2/models/fleet/ready", lambda code: code != 200)
    assert all(_status(s, "/v2/models/base/ready") == 200 for s in fleet)
    assert all(_status(s, "/v2/health/ready") == 200 for s in fleet)

    # As in Triton, what is served follows the repository: explicit load and unload are refused.
    reply = httpx.post(f"{a.http_url}/v2/repository/models/base/unload", timeout=5)
    assert reply.status_code == 400 and "poll" in reply.text
    assert _status(a, "/v2/models/base/ready") == 200


def test_none_mode_refuses_changes(tmp_path: Path, start_server: Any) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "base", fixtures.float_mlp())
    server = start_server(repo, "--model-control-mode", "none")
    assert upload(server, "other", model_bytes(1)).status_code == 400
    assert httpx.post(f"{server.http_url}/v2/repository/models/base/unload", timeout=5).status_code == 400
    assert not (repo / "other").exists()
    assert _status(server, "/v2/models/base/ready") == 200
