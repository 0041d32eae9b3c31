"""On the real server: a Triton ensemble (a 2-step chain plus a branch) over tritonclient HTTP and gRPC, its
answers checked against its members run in-process with onnxruntime; a failing member's error names the step
and the server keeps serving. An ensemble's config uploads like a model (curl upload, Triton's load API) with no
model file; a missing member or a wiring that does not fit is a 400 naming the step, and nothing stays on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from server.repository.config import ModelConfig
from tests.conftest import ServerProcess
from tests.models import fixtures


def _elementwise(op: str, constant: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    c = numpy_helper.from_array(np.array(constant, np.float32), "c")
    return fixtures._model([helper.make_node(op, ["x", "c"], ["y"])], [x], [y], [c])


def _out_of_range() -> onnx.ModelProto:
    """Gathers column 10 of a [batch, 4] input: fails in onnxruntime at run time."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])
    idx = numpy_helper.from_array(np.array([10], np.int64), "idx")
    return fixtures._model([helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)], [x], [y], [idx])


def _ensemble(steps: list[tuple[str, str, str]], outputs: dict[str, int]) -> str:
    step_text = ",\n".join(
        f'{{ model_name: "{m}" model_version: -1 input_map {{ key: "x" value: "{i}" }} '
        f'output_map {{ key: "y" value: "{o}" }} }}'
        for m, i, o in steps
    )
    outs = ", ".join(f'{{ name: "{n}" data_type: TYPE_FP32 dims: [ {d} ] }}' for n, d in outputs.items())
    return (
        'platform: "ensemble"\nmax_batch_size: 8\n'
        'input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        f"output [ {outs} ]\nensemble_scheduling {{ step [ {step_text} ] }}\n"
    )


PIPELINE = _ensemble([("double", "IN", "mid"), ("plus1", "mid", "A"), ("square", "mid", "B")], {"A": 4, "B": 4})
BROKEN = _ensemble([("double", "IN", "mid"), ("broken", "mid", "OUT")], {"OUT": 1})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ensembles")
    fixtures.write_model(repo, "double", _elementwise("Mul", 2.0))
    fixtures.write_model(repo, "plus1", _elementwise("Add", 1.0))
    fixtures.write_model(repo, "square", _elementwise("Pow", 2.0))
    fixtures.write_model(repo, "broken", _out_of_range())
    for name, text in (("pipeline", PIPELINE), ("broken_pipeline", BROKEN)):
        (repo / name / "1").mkdir(parents=True)  # Triton's layout: an empty version folder
        (repo / name / "config.pbtxt").write_text(text)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo).start()
    yield proc
    proc.stop()


def _reference(repo: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    def run(name: str, value: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["y"], {"x": value})[0])

    mid = run("double", x)
    return {"A": run("plus1", mid), "B": run("square", mid)}


X = np.arange(8, dtype=np.float32).reshape(2, 4) - 3


def test_http(server: ServerProcess, repo: Path) -> None:
    client = httpclient.InferenceServerClient(server.http_address)
    assert client.is_model_ready("pipeline")
    assert client.get_model_metadata("pipeline")["platform"] == "ensemble"
    tensor = httpclient.InferInput("IN", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("pipeline", [tensor])
    expected = _reference(repo, X)
    np.testing.assert_array_equal(result.as_numpy("A"), expected["A"])
    np.testing.assert_array_equal(result.as_numpy("B"), expected["B"])
    stats = client.get_inference_statistics("pipeline")["model_stats"][0]["inference_stats"]
    assert stats["success"]["count"] >= 1
    report = httpx.get(f"{server.http_url}/v2/models/pipeline/optimization").json()
    assert report["platform"] == "ensemble" and report["steps"] == []
    assert [m["model"] for m in report["members"]] == ["double", "plus1", "square"]


def test_grpc(server: ServerProcess, repo: Path) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_address)
    assert client.is_model_ready("pipeline")
    tensor = grpcclient.InferInput("IN", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("pipeline", [tensor], outputs=[grpcclient.InferRequestedOutput("B")])
    np.testing.assert_array_equal(result.as_numpy("B"), _reference(repo, X)["B"])
    assert result.as_numpy("A") is None


def test_failing_member_names_the_step_and_the_server_keeps_serving(server: ServerProcess, repo: Path) -> None:
    client = httpclient.InferenceServerClient(server.http_address)
    tensor = httpclient.InferInput("IN", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException, match=r"step 1 \(model 'broken'\)"):
        client.infer("broken_pipeline", [tensor])
    result = client.infer("pipeline", [tensor])
    np.testing.assert_array_equal(result.as_numpy("A"), _reference(repo, X)["A"])


# ---- uploading an ensemble: its config alone ------------------------------------------------------------------
def _as_json(text: str) -> str:
    """A pbtxt config as the JSON the upload APIs take."""
    config = text_format.Parse(text, ModelConfig())
    return json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))


def _upload(server: ServerProcess, name: str, config: str, **files: bytes) -> httpx.Response:
    """The curl upload with a config field and no model file: ``curl -F config=<config.json .../upload``."""
    parts: dict[str, Any] = {"config": (None, config)}  # a form field without a filename: multipart text
    parts.update({key: (key, data, "application/octet-stream") for key, data in files.items()})
    return httpx.post(
        f"{server.http_url}/v2/repository/models/{name}/upload", params={"wait": "true"}, files=parts, timeout=60
    )


def _infer(server: ServerProcess, name: str) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(server.http_address)
    tensor = httpclient.InferInput("IN", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer(name, [tensor])
    return {n: result.as_numpy(n) for n in ("A", "B")}


def test_curl_upload_of_an_ensemble_config(server: ServerProcess, repo: Path) -> None:
    response = _upload(server, "uploaded_pipeline", _as_json(PIPELINE))
    assert response.status_code == 201, response.text
    assert response.json() == {"name": "uploaded_pipeline", "version": "1", "state": "READY", "reason": ""}
    assert sorted(p.name for p in (repo / "uploaded_pipeline").iterdir()) == ["1", "config.json"]
    assert not any((repo / "uploaded_pipeline" / "1").iterdir())  # Triton's layout: an empty version folder
    got, expected = _infer(server, "uploaded_pipeline"), _reference(repo, X)
    np.testing.assert_array_equal(got["A"], expected["A"])
    np.testing.assert_array_equal(got["B"], expected["B"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_load_api_uploads_a_new_ensemble(server: ServerProcess, repo: Path, protocol: str) -> None:
    module: Any = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.grpc_address if protocol == "grpc" else server.http_address)
    name = f"loaded_pipeline_{protocol}"
    client.load_model(name, config=_as_json(PIPELINE))
    assert client.is_model_ready(name)
    assert (repo / name / "config.json").is_file() and (repo / name / "1").is_dir()
    np.testing.assert_array_equal(_infer(server, name)["B"], _reference(repo, X)["B"])


def test_an_ensemble_upload_with_a_missing_member_is_a_400_naming_it(server: ServerProcess, repo: Path) -> None:
    config = _as_json(PIPELINE.replace('model_name: "square"', 'model_name: "cube"'))
    response = _upload(server, "incomplete_pipeline", config)
    assert response.status_code == 400
    assert "step 2 (model 'cube'): the model is not in the repository" in response.json()["error"]
    assert not (repo / "incomplete_pipeline").exists()
    client = httpclient.InferenceServerClient(server.http_address)
    with pytest.raises(InferenceServerException, match="model 'cube'"):
        client.load_model("incomplete_pipeline_triton", config=config)
    assert not (repo / "incomplete_pipeline_triton").exists()


def test_an_ensemble_upload_that_does_not_fit_its_members_is_withdrawn(server: ServerProcess, repo: Path) -> None:
    wrong_type = _as_json(
        PIPELINE.replace('input [ { name: "IN" data_type: TYPE_FP32', 'input [ { name: "IN" data_type: TYPE_INT32')
    )
    response = _upload(server, "mistyped_pipeline", wrong_type)
    assert response.status_code == 400
    assert "step 0 (model 'double'): input 'x' takes FP32" in response.json()["error"]
    assert not (repo / "mistyped_pipeline").exists()
    with_a_file = _upload(server, "filed_pipeline", _as_json(PIPELINE), model=b"\x08\x07")
    assert with_a_file.status_code == 400
    assert "an ensemble has no model file" in with_a_file.json()["error"]
    assert not (repo / "filed_pipeline").exists()
