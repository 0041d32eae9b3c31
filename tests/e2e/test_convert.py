"""Framework models on the real server. Pickles (under any name, both upload paths) are refused with 415 and
never unpickled. Converted models serve the framework's own outputs: checked now by converting with
convert_version and serving the result, and, once ModelManager calls convert_version at load, by uploading the
framework files themselves (those tests skip until then)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.convert import convert_version
from tests.conftest import ROOT, ServerProcess
from tests.e2e.test_upload import snapshot
from tests.models import frameworks


def _wired() -> bool:
    """Whether model loading calls convert_version (in server.models.manager, or the loader it delegates to)."""
    for name in ("server.models.manager", "server.models.loader"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if "convert_version" in inspect.getsource(module):
            return True
    return False


WIRED = _wired()
needs_wiring = pytest.mark.skipif(not WIRED, reason="conversion not wired into loading yet")


def _infer(srv: ServerProcess, name: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    client = httpclient.InferenceServerClient(srv.http_address)
    tensors = []
    for key, value in feeds.items():
        tensor = httpclient.InferInput(key, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    result = client.infer(name, tensors)
    return [result.as_numpy(o) for o in outputs]


def _upload(srv: ServerProcess, name: str, data: bytes, filename: str) -> httpx.Response:
    return httpx.post(
        f"{srv.http_url}/v2/repository/models/{name}/upload",
        params={"wait": "true"},
        files={"model": (filename, data, "application/octet-stream")},
        timeout=300,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Framework models and their files, built once for the module."""
    root = tmp_path_factory.mktemp("frameworks")
    out: dict[str, Any] = {"root": root}
    out["torch"] = frameworks.save_pt2(root / "model.pt2")
    booster = frameworks.xgboost_booster()
    booster.save_model(str(root / "model.json"))
    out["xgboost"] = booster
    lgbm = frameworks.lightgbm_booster()
    lgbm.save_model(str(root / "model.txt"))
    out["lightgbm"] = lgbm
    return out


@pytest.fixture(scope="module")
def converted_repo(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of models converted with convert_version (what the load path will do)."""
    repo = tmp_path_factory.mktemp("repo")
    cache = tmp_path_factory.mktemp("cache")
    for name, source in (("cnn", "model.pt2"), ("xgb", "model.json"), ("lgbm", "model.txt")):
        version = tmp_path_factory.mktemp(name) / "1"
        version.mkdir()
        shutil.copyfile(built["root"] / source, version / source)
        result = convert_version(version, max_batch_size_hint=8, cache_dir=cache, samples=None)
        assert result.report_step["status"] == "applied"
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(result.onnx_path, repo / name / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def converted_server(converted_repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(converted_repo).start()
    yield proc
    proc.stop()


def test_converted_models_serve_the_frameworks_outputs(converted_server: ServerProcess, built: dict[str, Any]) -> None:
    x = frameworks.images(3, seed=5)
    (served,) = _infer(converted_server, "cnn", {"x": x}, ["linear"])
    np.testing.assert_allclose(served, frameworks.torch_outputs(built["torch"], x), rtol=1e-4, atol=1e-5)
    rows = frameworks.rows(11, seed=5)
    xgb = pytest.importorskip("xgboost")
    (probabilities,) = _infer(converted_server, "xgb", {"input": rows}, ["probabilities"])
    np.testing.assert_allclose(probabilities, built["xgboost"].predict(xgb.DMatrix(rows)), rtol=1e-5, atol=1e-6)
    label, probabilities = _infer(converted_server, "lgbm", {"input": rows}, ["label", "probabilities"])
    np.testing.assert_allclose(probabilities[:, 1], built["lightgbm"].predict(rows), rtol=1e-5, atol=1e-6)
    assert label.shape == (11,)


# ---- the server refuses pickles ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("plain")).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("filename", ["model.onnx", "model.pt", "model.pkl", "model.pt2"])
def test_a_pickle_upload_is_refused_and_never_loaded(
    plain_server: ServerProcess, tmp_path: Path, filename: str
) -> None:
    marker = tmp_path / "marker"
    payload = frameworks.marker_pickle(marker)
    before = snapshot(plain_server.repo)
    response = _upload(plain_server, "pickled", payload, filename)
    assert response.status_code == 415, response.text
    for protocol in ("http", "grpc"):
        module: Any = httpclient if protocol == "http" else grpcclient
        address = plain_server.http_address if protocol == "http" else plain_server.grpc_address
        with pytest.raises(InferenceServerException) as caught:
            module.InferenceServerClient(address).load_model("pickled", files={f"file:1/{filename}": payload})
        assert "unpickle" in str(caught.value) or "pickle" in str(caught.value)
    assert not marker.exists()
    assert snapshot(plain_server.repo) == before


# ---- uploads of framework files (once conversion is wired into loading) -------------------------------
@needs_wiring
def test_pt2_upload_serves_and_reports_the_conversion(plain_server: ServerProcess, built: dict[str, Any]) -> None:
    response = _upload(plain_server, "cnn", (built["root"] / "model.pt2").read_bytes(), "cnn.pt2")
    assert response.status_code == 201 and response.json()["state"] == "READY", response.text
    x = frameworks.images(4, seed=6)
    (served,) = _infer(plain_server, "cnn", {"x": x}, ["linear"])
    np.testing.assert_allclose(served, frameworks.torch_outputs(built["torch"], x), rtol=1e-4, atol=1e-5)
    report = httpx.get(f"{plain_server.http_url}/v2/models/cnn/optimization", timeout=30).json()
    assert report["steps"][0]["name"] == "convert:torch" and report["steps"][0]["status"] == "applied"


@needs_wiring
def test_tree_models_upload_through_triton_load(plain_server: ServerProcess, built: dict[str, Any]) -> None:
    xgb = pytest.importorskip("xgboost")
    client = httpclient.InferenceServerClient(plain_server.http_address)
    client.load_model(
        "xgb",
        config=json.dumps({"max_batch_size": 16}),
        files={"file:1/model.json": (built["root"] / "model.json").read_bytes()},
    )
    grpcclient.InferenceServerClient(plain_server.grpc_address).load_model(
        "lgbm", files={"file:1/model.txt": (built["root"] / "model.txt").read_bytes()}
    )
    rows = frameworks.rows(9, seed=7)
    (probabilities,) = _infer(plain_server, "xgb", {"input": rows}, ["probabilities"])
    np.testing.assert_allclose(probabilities, built["xgboost"].predict(xgb.DMatrix(rows)), rtol=1e-5, atol=1e-6)
    (probabilities,) = _infer(plain_server, "lgbm", {"input": rows}, ["probabilities"])
    np.testing.assert_allclose(probabilities[:, 1], built["lightgbm"].predict(rows), rtol=1e-5, atol=1e-6)


@needs_wiring
def test_saved_model_tar_upload(plain_server: ServerProcess, tmp_path: Path) -> None:
    model = frameworks.keras_saved_model(tmp_path / "saved_model")
    response = _upload(plain_server, "keras", frameworks.tar_folder(tmp_path / "saved_model"), "saved_model.tar")
    assert response.status_code == 201 and response.json()["state"] == "READY", response.text
    rows = frameworks.rows(5, seed=8)
    (served,) = _infer(plain_server, "keras", {"x": rows}, ["output_0"])
    np.testing.assert_allclose(served, model(rows).numpy(), rtol=1e-5, atol=1e-6)


# ---- started the way a user starts it: relative repository, default cache, from another folder ---------
def test_tree_uploads_convert_with_relative_paths_and_the_default_cache(tmp_path: Path) -> None:
    """``cd somewhere && optiserve serve --model-repository models`` with no --cache-dir: the cache is the
    relative default ``.optiserve-cache``, and the converter worker, which runs in its own job folder, must
    still find its job and the uploaded file (it once looked for ``<rel>/job.json`` under ``<rel>``)."""
    xgb = pytest.importorskip("xgboost")
    boosters = {"xgb": frameworks.xgboost_booster(), "lgbm": frameworks.lightgbm_booster()}  # small trees only
    files = {"xgb": tmp_path / "model.json", "lgbm": tmp_path / "model.txt"}
    for name, booster in boosters.items():
        booster.save_model(str(files[name]))
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    srv = ServerProcess(Path("models"), cwd=work)
    for variable in ("OPTISERVE_CACHE_DIR", "OPTISERVE_MODEL_REPOSITORY"):
        srv.env.pop(variable, None)  # the defaults, as a user has them
    srv.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    srv.start()
    try:
        for name, path in files.items():
            response = _upload(srv, name, path.read_bytes(), path.name)
            assert response.status_code == 201 and response.json()["state"] == "READY", response.text
        rows = frameworks.rows(6, seed=9)
        (probabilities,) = _infer(srv, "xgb", {"input": rows}, ["probabilities"])
        np.testing.assert_allclose(probabilities, boosters["xgb"].predict(xgb.DMatrix(rows)), rtol=1e-5, atol=1e-6)
        (probabilities,) = _infer(srv, "lgbm", {"input": rows}, ["probabilities"])
        np.testing.assert_allclose(probabilities[:, 1], boosters["lgbm"].predict(rows), rtol=1e-5, atol=1e-6)
    finally:
        srv.stop()
    # Both relative paths were taken from the folder the server was started in.
    assert (work / "models" / "xgb" / "1" / "model.json").is_file()
    assert (work / "models" / "lgbm" / "1" / "model.txt").is_file()
    assert len(list((work / ".optiserve-cache" / "converted" / "artifacts").glob("*.onnx"))) == 2
