"""Pipelines on the real server: an image pipeline (JPEG bytes -> DecodeImage/resize/normalize in ONNX -> a
small CNN -> top-5 with labels) and a text pipeline (a string -> BertTokenizer in ONNX -> a small encoder -> a
label), both Triton ensembles whose pre-processing members use onnxruntime-extensions' operators. Answers over
tritonclient HTTP and gRPC are checked against the same member models run in-process with onnxruntime;
perf_analyzer drives the image ensemble; a failing member names its step and the server keeps serving; a model
that needs the extensions fails to load, naming the extra, where they are not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.e2e.test_classification import expected_top_k
from tests.models import fixtures, pipelines

extensions = pytest.importorskip("onnxruntime_extensions", reason="the extensions extra is not installed")
pytest.importorskip("PIL", reason="Pillow makes the test's JPEG files")

PROTOCOLS = ["http", "grpc"]
PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"
TEXTS = ["The movie was great", "awful plot, bad", "fun fun FUN", "words the vocabulary lacks"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("pipelines")
    pipelines.write_image_pipeline(repo)
    pipelines.write_text_pipeline(repo)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo).start()
    yield proc
    proc.stop()


class Reference:
    """The pipelines' steps run in-process, on the same model files the server serves."""

    def __init__(self, repo: Path) -> None:
        options = ort.SessionOptions()
        options.register_custom_ops_library(extensions.get_library_path())
        self.sessions = {
            name: ort.InferenceSession(
                str(repo / name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for name in ("image_preprocess", "image_classifier", "tokenizer", "text_encoder")
        }

    def run(self, name: str, output: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.sessions[name].run([output], feed)[0])

    def image(self, jpeg: bytes) -> np.ndarray:
        pixels = self.run("image_preprocess", "pixels", {"jpeg": np.frombuffer(jpeg, np.uint8)})
        return self.run("image_classifier", "logits", {"pixels": pixels})

    def text(self, text: str) -> np.ndarray:
        ids = self.run("tokenizer", "input_ids", {"text": np.array([text], dtype=object)})
        return self.run("text_encoder", "logits", {"input_ids": ids})


@pytest.fixture(scope="module")
def reference(repo: Path) -> Reference:
    return Reference(repo)


def infer(server: ServerProcess, protocol: str, model: str, name: str, array: np.ndarray, output: str, k: int) -> Any:
    """One tritonclient request; the output as a tensor (k = 0) or as its top k classes."""
    datatype = "UINT8" if array.dtype == np.uint8 else "BYTES"
    module: Any = grpcclient if protocol == "grpc" else httpclient
    address = server.grpc_address if protocol == "grpc" else server.http_address
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    requested = module.InferRequestedOutput(output, class_count=k)
    result = module.InferenceServerClient(address).infer(model, [tensor], outputs=[requested])
    return result.as_numpy(output)


def as_bytes(array: np.ndarray) -> list[bytes]:
    return [v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_image_pipeline_top5_with_labels(server: ServerProcess, reference: Reference, protocol: str) -> None:
    labels = [label.encode() for label in pipelines.IMAGE_LABELS]
    for seed in range(3):
        jpeg = pipelines.jpeg_bytes(seed)
        image = np.frombuffer(jpeg, np.uint8)
        scores = reference.image(jpeg)
        top5 = infer(server, protocol, "image_pipeline", "IMAGE", image, "CLASSES", 5)
        assert as_bytes(top5) == expected_top_k(scores, 5, labels, batched=False).tolist()
        assert all(text.split(b":")[2].startswith(b"class_") for text in as_bytes(top5))
        tensor = infer(server, protocol, "image_pipeline", "IMAGE", image, "CLASSES", 0)
        np.testing.assert_array_equal(tensor, scores)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_text_pipeline_gives_the_label(server: ServerProcess, reference: Reference, protocol: str) -> None:
    labels = [label.encode() for label in pipelines.SENTIMENTS]
    for text in TEXTS:
        scores = reference.text(text)
        got = infer(server, protocol, "text_pipeline", "TEXT", np.array([text.encode()], dtype=object), "SENTIMENT", 1)
        assert as_bytes(got) == expected_top_k(scores, 1, labels, batched=False).tolist()
        assert as_bytes(got)[0].split(b":")[2] == labels[int(np.argmax(scores))]


def test_statistics_for_the_ensemble_and_each_member(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http_address)
    image = np.frombuffer(pipelines.jpeg_bytes(9), np.uint8)
    infer(server, "http", "image_pipeline", "IMAGE", image, "CLASSES", 0)
    for model in ("image_pipeline", "image_preprocess", "image_classifier"):
        stats = client.get_inference_statistics(model)["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] >= 1, model
    assert client.get_model_metadata("image_pipeline")["platform"] == "ensemble"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failing_member_names_its_step_and_the_server_keeps_serving(
    server: ServerProcess, reference: Reference, protocol: str
) -> None:
    not_a_jpeg = np.frombuffer(b"\xff\xd8 this is not a JPEG file", np.uint8)
    with pytest.raises(InferenceServerException, match=r"step 0 \(model 'image_preprocess'\)"):
        infer(server, protocol, "image_pipeline", "IMAGE", not_a_jpeg, "CLASSES", 0)
    assert httpx.get(f"{server.http_url}/v2/health/ready").status_code == 200
    jpeg = pipelines.jpeg_bytes(4)
    got = infer(server, protocol, "image_pipeline", "IMAGE", np.frombuffer(jpeg, np.uint8), "CLASSES", 0)
    np.testing.assert_array_equal(got, reference.image(jpeg))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_perf_analyzer_drives_the_image_ensemble(server: ServerProcess, tmp_path: Path, protocol: str) -> None:
    binary = str(PERF_ANALYZER) if PERF_ANALYZER.exists() else shutil.which("perf_analyzer")
    if binary is None:
        pytest.skip("perf_analyzer is not installed (make test installs it with bench/install-perf-analyzer.sh)")
    jpeg = pipelines.jpeg_bytes(1)
    data = {"data": [{"IMAGE": {"content": list(jpeg), "shape": [len(jpeg)]}}]}
    (tmp_path / "input.json").write_text(json.dumps(data))
    url = server.http_address if protocol == "http" else server.grpc_address
    cmd = [binary, "-m", "image_pipeline", "-u", url, "-i", protocol, "--concurrency-range", "2"]
    cmd += ["--input-data", str(tmp_path / "input.json")]
    cmd += ["--measurement-interval", "1000", "--max-trials", "3", "--stability-percentage", "999"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Throughput" in result.stdout
    assert "error" not in result.stdout.lower(), result.stdout


def test_without_the_extensions_a_model_that_needs_them_names_the_extra(tmp_path: Path, start_server: Any) -> None:
    """onnxruntime-extensions made unimportable for the server only (a module of that name that raises
    ImportError first on its path): the tokenizer fails to load naming the extra; other models serve."""
    repo = tmp_path / "repo"
    repo.mkdir()
    pipelines.write_text_pipeline(repo)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime_extensions.py").write_text("raise ImportError('not installed')\n")
    server = start_server(repo, env={"PYTHONPATH": f"{shadow}:{Path(__file__).resolve().parents[2]}"}, wait_ready=False)
    client = httpclient.InferenceServerClient(server.http_address)
    rows: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = {row["name"]: row for row in client.get_model_repository_index()}
        if rows and all(row.get("state") != "LOADING" for row in rows.values()):
            break
        time.sleep(0.1)
    assert rows["tokenizer"]["state"] == "UNAVAILABLE"
    assert "pip install optiserve[extensions]" in rows["tokenizer"]["reason"]
    assert "ai.onnx.contrib" in rows["tokenizer"]["reason"]
    assert rows["text_pipeline"]["state"] == "UNAVAILABLE"
    assert "step 0 (model 'tokenizer')" in rows["text_pipeline"]["reason"]
    assert client.is_model_ready("text_encoder")


def test_the_optimizer_leaves_custom_op_models_alone(tmp_path: Path, start_server: Any, reference: Reference) -> None:
    """With the optimizer on, the pre-processing members serve as they are and their report says why; random
    reference inputs never reach DecodeImage (a malformed JPEG there would end the process)."""
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "image_preprocess", pipelines.image_preprocess(), config=pipelines.PREPROCESS_CONFIG)
    server = start_server(repo, env={"OPTISERVE_DEFAULT_PRECISION": "auto", "OPTISERVE_OPTIMIZE_MODE": "before_ready"})
    report: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        report = httpx.get(f"{server.http_url}/v2/models/image_preprocess/optimization").json()
        if report.get("steps") and report.get("phase") != "optimizing":
            break
        time.sleep(0.2)
    steps = report["steps"]
    assert all(step["status"] == "skipped" for step in steps), steps
    assert all("onnxruntime-extensions' custom operators" in step["reason"] for step in steps), steps
    assert report["selected"] == "original"
    jpeg = pipelines.jpeg_bytes(2)
    got = infer(server, "http", "image_preprocess", "jpeg", np.frombuffer(jpeg, np.uint8), "pixels", 0)
    np.testing.assert_array_equal(
        got, reference.run("image_preprocess", "pixels", {"jpeg": np.frombuffer(jpeg, np.uint8)})
    )
