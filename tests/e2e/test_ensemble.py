"""On the real server: a Triton ensemble (a 2-step chain plus a branch) over tritonclient HTTP and gRPC, its
answers checked against its members run in-process with onnxruntime; a failing member's error names the step
and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

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
