"""On the real server: configs and links that point outside the repository, and configs with absurd values,
fail the load (400 from the load and upload APIs, UNAVAILABLE with the reason at start) naming the field,
leave the repository as it was, keep earlier versions serving, and never tell whether a path outside
exists."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.models import fixtures

ABSURD = [
    ({"instance_group": [{"count": -3, "kind": "KIND_CPU"}]}, "instance_group[0].count"),
    ({"dynamic_batching": {"priority_levels": 2, "default_priority_level": 5}}, "default_priority_level"),
    ({"dynamic_batching": {"max_queue_delay_microseconds": 18446744073709551615}}, "max_queue_delay_microseconds"),
    ({"dynamic_batching": {"priority_levels": 10**15}}, "priority_levels"),
    ({"default_model_filename": "../../../elsewhere/evil.onnx"}, "default_model_filename"),
    ({"output": [{"name": "y", "label_filename": "/etc/passwd"}]}, "label_filename"),
]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(repository, a folder beside it holding a valid model, evil.onnx)."""
    base = tmp_path_factory.mktemp("hardening")
    repo = base / "repo"
    fixtures.write_model(repo, "m", fixtures.float_mlp())
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    fixtures.write_model(elsewhere, "x", fixtures.float_mlp(seed=7))
    (elsewhere / "x" / "1" / "model.onnx").rename(elsewhere / "evil.onnx")
    return repo, elsewhere


@pytest.fixture(scope="module")
def server(layout: tuple[Path, Path]) -> Iterator[ServerProcess]:
    proc = ServerProcess(layout[0]).start()
    yield proc
    proc.stop()


def load(server: ServerProcess, name: str, config: dict | None = None, **files: bytes) -> httpx.Response:
    parameters: dict[str, str] = {} if config is None else {"config": json.dumps(config)}
    parameters |= {f"file:{key}": base64.b64encode(data).decode() for key, data in files.items()}
    return httpx.post(
        f"{server.http_url}/v2/repository/models/{name}/load", json={"parameters": parameters}, timeout=60
    )


def snapshot(repo: Path) -> dict[str, int]:
    """Every path of the repository with file sizes; staging may exist, but only empty."""
    staging = repo / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    return {
        str(p.relative_to(repo)): p.stat().st_size if p.is_file() else -1
        for p in repo.rglob("*")
        if p.relative_to(repo).parts[0] != ".staging"
    }


def serves(server: ServerProcess, name: str) -> bool:
    body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1.0] * 8}]}
    return httpx.post(f"{server.http_url}/v2/models/{name}/infer", json=body, timeout=30).status_code == 200


@pytest.mark.parametrize(("config", "field"), ABSURD, ids=[field for _, field in ABSURD])
def test_load_with_an_absurd_config_is_400_and_keeps_serving(server: ServerProcess, config: dict, field: str) -> None:
    response = load(server, "m", config)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]
    assert serves(server, "m"), "the versions served before a failed reload keep serving"


@pytest.mark.parametrize("absolute", [False, True])
def test_model_file_paths_are_refused_without_telling_what_exists(
    server: ServerProcess, layout: tuple[Path, Path], absolute: bool
) -> None:
    _, elsewhere = layout
    existing = str(elsewhere / "evil.onnx") if absolute else "../../../elsewhere/evil.onnx"
    missing = str(elsewhere / "nothing.onnx") if absolute else "../../../elsewhere/nothing.onnx"
    replies = [load(server, "m", {"default_model_filename": name}) for name in (existing, missing)]
    assert [r.status_code for r in replies] == [400, 400]
    errors = [r.json()["error"].replace(name, "<name>") for r, name in zip(replies, (existing, missing), strict=True)]
    assert errors[0] == errors[1] and "default_model_filename" in errors[0]
    assert serves(server, "m")


@pytest.mark.parametrize(("config", "field"), ABSURD, ids=[field for _, field in ABSURD])
def test_upload_with_an_absurd_config_never_lands(
    server: ServerProcess, layout: tuple[Path, Path], config: dict, field: str
) -> None:
    repo = layout[0]
    before = snapshot(repo)
    model = fixtures.float_mlp().SerializeToString()
    curl = httpx.post(
        f"{server.http_url}/v2/repository/models/fresh/upload",
        params={"wait": "true"},
        files={"model": ("model.onnx", model, "application/octet-stream")},
        data={"config": json.dumps(config)},
        timeout=60,
    )
    assert curl.status_code == 400 and field in curl.json()["error"], curl.text
    triton = load(server, "m", config, **{"1/model.onnx": model})
    assert triton.status_code == 400 and field in triton.json()["error"], triton.text
    with pytest.raises(InferenceServerException, match=field.split("[")[0]):
        grpcclient.InferenceServerClient(server.grpc_address).load_model(
            "m", config=json.dumps(config), files={"file:1/model.onnx": model}
        )
    assert snapshot(repo) == before, "nothing of a refused upload reaches the repository"
    assert serves(server, "m")


def _index(server: ServerProcess, timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = httpx.post(f"{server.http_url}/v2/repository/index").json()
        if all(row["state"] != "LOADING" for row in rows):
            return {row["name"]: row for row in rows}
        time.sleep(0.05)
    raise AssertionError("models still loading")


def test_links_out_and_absurd_configs_on_disk_fail_alone_at_start(start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    elsewhere = tmp_path / "elsewhere"
    fixtures.write_model(elsewhere, "x", fixtures.float_mlp(seed=7))
    evil = elsewhere / "x" / "1" / "model.onnx"
    (elsewhere / "config.pbtxt").write_text("max_batch_size: 4")
    fixtures.write_model(repo, "good", fixtures.float_mlp())
    # The model file itself a link out: to a valid model, and to nothing.
    for name, target in (("linked", evil), ("dangling", elsewhere / "nothing.onnx")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").symlink_to(target)
    # External data beside a good model file, linking out.
    fixtures.write_model(repo, "weights", fixtures.float_mlp())
    (repo / "weights" / "1" / "samples.npz").symlink_to(elsewhere / "secret.npz")
    # A config that is a link out.
    fixtures.write_model(repo, "config_link", fixtures.float_mlp())
    (repo / "config_link" / "config.pbtxt").symlink_to(elsewhere / "config.pbtxt")
    # Configs with absurd values (each would serve and then hang, 500, kill a thread or exhaust memory).
    for index, (config, _) in enumerate(ABSURD):
        fixtures.write_model(
            repo, f"absurd{index}", fixtures.float_mlp(), config=json.dumps(config), config_name="config.json"
        )
    # A link within the repository is fine: version 1 of "alias" is the model file of "good".
    (repo / "alias" / "1").mkdir(parents=True)
    (repo / "alias" / "1" / "model.onnx").symlink_to(repo / "good" / "1" / "model.onnx")

    server = start_server(repo, wait_ready=False)
    index = _index(server)
    assert index["good"]["state"] == "READY" and index["alias"]["state"] == "READY", (index["good"], index["alias"])
    for name in ("linked", "dangling", "weights"):
        assert index[name]["state"] == "UNAVAILABLE", index[name]
        assert "resolves outside the model repository" in index[name]["reason"], index[name]
    assert index["linked"]["reason"].replace("linked", "dangling") == index["dangling"]["reason"]
    assert "outside the model folder" in index["config_link"]["reason"]
    for index_number, (_, field) in enumerate(ABSURD):
        row = index[f"absurd{index_number}"]
        assert row["state"] == "UNAVAILABLE" and field in row["reason"], row
    assert serves(server, "good") and serves(server, "alias")
    assert server.is_live()
    x = np.ones((1, 8), np.float32)
    client = grpcclient.InferenceServerClient(server.grpc_address)
    tensor = grpcclient.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(x)
    assert client.infer("alias", [tensor]).as_numpy("y").shape == (1, 4)
