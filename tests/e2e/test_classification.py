"""Triton's classification extension on the real server with NVIDIA's clients (HTTP JSON, HTTP binary, gRPC):
``InferRequestedOutput(name, class_count=k)`` gives what ``as_numpy()`` reads as the ``b"score:index:label"``
strings of the top k, computed here from in-process onnxruntime output and the model's label file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.e2e.conftest import reference_outputs
from tests.models import fixtures

PROTOCOLS = ["http-json", "http-binary", "grpc"]
LABELS = b"zero\nun\nzwei\ntr\xc3\xa9s\n"  # four labels for five classes: class 4 has none
CLASSIFIER = """
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 8 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 5 ] label_filename: "labels.txt" } ]
"""
FLAT = """
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2, 3 ] label_filename: "names.txt" } ]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("classification")
    fixtures.write_model(repo, "classifier", fixtures.float_mlp(classes=5, seed=3), config=CLASSIFIER)
    (repo / "classifier" / "labels.txt").write_bytes(LABELS)
    fixtures.write_model(repo, "flat", fixtures.no_batch(), config=FLAT)
    (repo / "flat" / "names.txt").write_bytes(b"a\nb\nc\nd\ne\nf\n")
    fixtures.write_model(repo, "int64", fixtures.int64_model())
    fixtures.write_model(repo, "strings", fixtures.strings())
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo).start()
    yield proc
    proc.stop()


def expected_top_k(scores: np.ndarray, k: int, labels: list[bytes], *, batched: bool) -> np.ndarray:
    """Written apart from the server's code: highest first, ties by index, %f for floats."""
    rows = scores.reshape(scores.shape[0], -1) if batched else scores.reshape(1, -1)
    result = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        texts = []
        for i in order:
            score = f"{float(row[i]):f}" if row.dtype.kind == "f" else str(int(row[i]))
            label = b":" + labels[i] if i < len(labels) else b""
            texts.append(f"{score}:{i}".encode() + label)
        result.append(texts)
    array = np.array(result, dtype=object)
    return array if batched else array.reshape(-1)


def classify(server: ServerProcess, protocol: str, model: str, inputs: dict[str, np.ndarray], k: int) -> Any:
    """One request asking output ``name`` for its top k, by tritonclient; returns {output: as_numpy()}."""
    requested = {"classifier": ["y"], "flat": ["y"], "int64": ["doubled", "total"], "strings": ["echo"]}[model]
    datatype = {"float32": "FP32", "int64": "INT64", "object": "BYTES"}
    if protocol == "grpc":
        grpc_client = grpcclient.InferenceServerClient(server.grpc_address)
        grpc_inputs = []
        for name, array in inputs.items():
            grpc_input = grpcclient.InferInput(name, list(array.shape), datatype[array.dtype.name])
            grpc_input.set_data_from_numpy(array)
            grpc_inputs.append(grpc_input)
        outputs = [grpcclient.InferRequestedOutput(requested[0], class_count=k)]
        outputs += [grpcclient.InferRequestedOutput(name) for name in requested[1:]]
        result = grpc_client.infer(model, grpc_inputs, outputs=outputs)
    else:
        binary = protocol == "http-binary"
        http_client = httpclient.InferenceServerClient(server.http_address)
        http_inputs = []
        for name, array in inputs.items():
            http_input = httpclient.InferInput(name, list(array.shape), datatype[array.dtype.name])
            http_input.set_data_from_numpy(array, binary_data=binary)
            http_inputs.append(http_input)
        http_outputs = [httpclient.InferRequestedOutput(requested[0], binary_data=binary, class_count=k)]
        http_outputs += [httpclient.InferRequestedOutput(name, binary_data=binary) for name in requested[1:]]
        result = http_client.infer(model, http_inputs, outputs=http_outputs)
    return {name: result.as_numpy(name) for name in requested}


def _as_bytes(array: np.ndarray) -> list[Any]:
    """The elements as bytes: tritonclient's as_numpy() gives bytes for binary outputs and str for JSON ones
    (as it does with Triton)."""
    encode = np.vectorize(lambda v: v.encode() if isinstance(v, str) else bytes(v), otypes=[object])
    return encode(array).tolist()  # type: ignore[no-any-return]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("k", [1, 3, 9])
def test_batched_top_k_matches_onnxruntime_and_the_label_file(
    server: ServerProcess, repo: Path, protocol: str, k: int
) -> None:
    inputs = {"x": np.random.default_rng(k).standard_normal((3, 8)).astype(np.float32)}
    scores = reference_outputs(repo / "classifier" / "1" / "model.onnx", inputs)["y"]
    got = classify(server, protocol, "classifier", inputs, k)["y"]
    want = expected_top_k(scores, k, LABELS.splitlines(), batched=True)
    assert got.dtype == object and got.shape == (3, min(k, 5))  # k past the class count is clamped
    assert _as_bytes(got) == want.tolist()
    if k >= 5:  # every class shows: the non-ASCII label arrives as its UTF-8 bytes, class 4 has no label
        assert any(text.endswith(b":3:tr\xc3\xa9s") for text in _as_bytes(got.reshape(-1)))
        assert any(text.endswith(b":4") for text in _as_bytes(got.reshape(-1)))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unbatched_output_gives_k_over_every_element(server: ServerProcess, repo: Path, protocol: str) -> None:
    inputs = {"x": np.random.default_rng(5).standard_normal((2, 3)).astype(np.float32)}
    scores = reference_outputs(repo / "flat" / "1" / "model.onnx", inputs)["y"]
    got = classify(server, protocol, "flat", inputs, 4)["y"]
    assert got.shape == (4,)
    assert _as_bytes(got) == expected_top_k(scores, 4, [b"a", b"b", b"c", b"d", b"e", b"f"], batched=False).tolist()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_integer_scores_without_labels_next_to_a_plain_output(server: ServerProcess, repo: Path, protocol: str) -> None:
    inputs = {"ids": np.array([[3, -1, 7, 7, 0], [1, 2, 3, 4, 5]], np.int64)}
    expected = reference_outputs(repo / "int64" / "1" / "model.onnx", inputs)
    got = classify(server, protocol, "int64", inputs, 2)
    assert _as_bytes(got["doubled"]) == [[b"14:2", b"14:3"], [b"10:4", b"8:3"]]
    assert _as_bytes(got["doubled"]) == expected_top_k(expected["doubled"], 2, [], batched=True).tolist()
    np.testing.assert_allclose(got["total"], expected["total"])  # the other output is the plain tensor


def test_server_metadata_lists_the_extension(server: ServerProcess) -> None:
    extensions = httpx.get(f"{server.http_url}/v2").json()["extensions"]
    assert "classification" in extensions
    grpc_client = grpcclient.InferenceServerClient(server.grpc_address)
    assert "classification" in grpc_client.get_server_metadata().extensions


def _post(server: ServerProcess, model: str, outputs: list[dict[str, Any]]) -> httpx.Response:
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}],
        "outputs": outputs,
    }
    if model == "strings":
        body["inputs"] = [{"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]
    return httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=body)


@pytest.mark.parametrize("value", [0, -3, 2.5, "2", True])
def test_http_bad_k_is_a_400_naming_the_field(server: ServerProcess, value: Any) -> None:
    reply = _post(server, "classifier", [{"name": "y", "parameters": {"classification": value}}])
    assert reply.status_code == 400
    assert "outputs[0].parameters.classification" in reply.json()["error"]


def test_http_unknown_or_non_numeric_output_is_a_400(server: ServerProcess) -> None:
    unknown = _post(server, "classifier", [{"name": "nope", "parameters": {"classification": 2}}])
    assert unknown.status_code == 400 and "'nope'" in unknown.json()["error"]
    strings = _post(server, "strings", [{"name": "echo", "parameters": {"classification": 2}}])
    assert strings.status_code == 400 and "BYTES" in strings.json()["error"]


@pytest.mark.parametrize(("model", "k", "words"), [("classifier", -1, "classification"), ("strings", 2, "BYTES")])
def test_grpc_bad_requests_are_invalid_argument(server: ServerProcess, model: str, k: int, words: str) -> None:
    inputs = (
        {"text": np.array([[b"a", b"b"]], dtype=object)} if model == "strings" else {"x": np.ones((1, 8), np.float32)}
    )
    with pytest.raises(InferenceServerException) as caught:
        classify(server, "grpc", model, inputs, k)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and words in str(caught.value.message())
