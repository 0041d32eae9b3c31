"""Triton's classification extension: the top-k strings (server/protocol/classification.py), the request
parameter in both codecs, label files (server/models/labels.py) and a version's output selection."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput, LoadFailed
from server.http import codec as http_codec
from server.models.labels import load_labels, read_labels
from server.protocol import datatypes, tensors
from server.protocol.classification import check_classifiable, class_count, top_k
from server.repository.config import ModelConfig
from server.repository.layout import Repository
from server.rpc import codec as grpc_codec

LIMITS = tensors.Limits(max_elements=1 << 20, max_rank=8, max_tensors=8)


def _strings(array: np.ndarray) -> list[Any]:
    return np.asarray(array).tolist()  # type: ignore[no-any-return]


# --- top_k ----------------------------------------------------------------------------------------------------
def test_batched_rows_give_batch_by_k_with_labels() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    result = top_k(scores, 2, batched=True, labels=[b"cat", b"dog", b"fox"])
    assert result.shape == (2, 2) and result.dtype == object
    assert _strings(result) == [[b"0.700000:1:dog", b"0.200000:2:fox"], [b"0.500000:0:cat", b"0.250000:1:dog"]]


def test_unbatched_output_gives_k_over_all_elements() -> None:
    result = top_k(np.array([[1.0, 4.0], [3.0, 2.0]], np.float64), 3, batched=False)
    assert result.shape == (3,)
    assert _strings(result) == [b"4.000000:1", b"3.000000:2", b"2.000000:3"]


def test_batch_classes_1_flattens_each_sample() -> None:
    result = top_k(np.array([[[0.0], [2.0]], [[5.0], [1.0]]], np.float32), 1, batched=True)
    assert _strings(result) == [[b"2.000000:1"], [b"5.000000:0"]]


def test_k_is_clamped_to_the_class_count() -> None:
    assert top_k(np.array([[0.5, 0.25]], np.float32), 10, batched=True).shape == (1, 2)


def test_scores_print_as_cpp_to_string() -> None:
    """``std::to_string``: %f for floats (rounded to 6 decimals, the float32 value widened exactly), digits
    for integers."""
    floats = top_k(np.array([1e-7, -2.5, 123456.789], np.float32), 3, batched=False)
    assert _strings(floats) == [b"123456.789062:2", b"0.000000:0", b"-2.500000:1"]
    assert _strings(top_k(np.array([3, -7], np.int64), 2, batched=False)) == [b"3:0", b"-7:1"]
    big = np.array([np.iinfo(np.uint64).max, 0], np.uint64)
    assert _strings(top_k(big, 1, batched=False)) == [b"18446744073709551615:0"]


def test_ties_keep_index_order_and_nan_sorts_last() -> None:
    ties = top_k(np.array([1.0, 2.0, 2.0, 1.0], np.float32), 4, batched=False)
    assert _strings(ties) == [b"2.000000:1", b"2.000000:2", b"1.000000:0", b"1.000000:3"]
    nan = top_k(np.array([np.nan, 0.5, -1.0], np.float32), 3, batched=False)
    assert [s.split(b":")[1] for s in _strings(nan)] == [b"1", b"2", b"0"]
    unsigned = top_k(np.array([0, 255, 255], np.uint8), 3, batched=False)  # no overflow from negation
    assert _strings(unsigned) == [b"255:1", b"255:2", b"0:0"]


def test_labels_missing_or_empty_are_left_out() -> None:
    result = top_k(np.array([3.0, 2.0, 1.0], np.float32), 3, batched=False, labels=[b"a", b""])
    assert _strings(result) == [b"3.000000:0:a", b"2.000000:1", b"1.000000:2"]


def test_the_result_travels_as_bytes_in_both_encodings() -> None:
    result = top_k(np.array([[0.25, 0.75]], np.float32), 1, batched=True, labels=[b"n", "é".encode()])
    assert tensors.to_list(result) == ["0.750000:1:é"]
    assert tensors.to_raw(result) == len(b"0.750000:1:\xc3\xa9").to_bytes(4, "little") + "0.750000:1:é".encode()


@pytest.mark.parametrize("value", [0, -1, 1.5, "3", True, None, [2]])
def test_bad_k_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(InvalidInput, match=re.escape("outputs[0].parameters.classification")):
        class_count(value, "outputs[0].parameters.classification")


@pytest.mark.parametrize("name", ["BOOL", "FP16", "BF16", "BYTES"])
def test_outputs_without_scores_cannot_be_classified(name: str) -> None:
    with pytest.raises(InvalidInput, match=f"output 'y'.*{name}"):
        check_classifiable("y", datatypes.by_name(name))


# --- codecs ---------------------------------------------------------------------------------------------------
def _http(outputs: list[dict[str, Any]]) -> Any:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "outputs": outputs}
    return http_codec.decode_request(orjson.dumps(body), None, "m", "", LIMITS)


def test_http_reads_the_classification_parameter() -> None:
    request = _http([{"name": "y", "parameters": {"classification": 3, "binary_data": True}}, {"name": "z"}])
    assert [(o.name, o.binary, o.classification) for o in request.outputs] == [("y", True, 3), ("z", None, 0)]


@pytest.mark.parametrize("value", [0, -2, 2.5, "2", False])
def test_http_bad_classification_is_a_400_naming_the_output(value: Any) -> None:
    with pytest.raises(InvalidInput, match=re.escape("outputs[1].parameters.classification")):
        _http([{"name": "z"}, {"name": "y", "parameters": {"classification": value}}])


def test_http_output_parameters_must_be_an_object() -> None:
    with pytest.raises(InvalidInput, match=re.escape("outputs[0].parameters")):
        _http([{"name": "y", "parameters": [1]}])


def _grpc(**param: Any) -> Any:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    output = message.outputs.add(name="y")
    if param:
        for key, value in param.items():
            setattr(output.parameters["classification"], key, value)
    return grpc_codec.decode_request(message, LIMITS)


def test_grpc_reads_tritonclients_int64_param() -> None:
    assert grpc_codec.decode_request(_tritonclient_request(), LIMITS).outputs[0].classification == 2
    assert _grpc().outputs[0].classification == 0
    assert _grpc(uint64_param=4).outputs[0].classification == 4


def _tritonclient_request() -> Any:
    import tritonclient.grpc as triton_grpc

    output = triton_grpc.InferRequestedOutput("y", class_count=2)
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    message.outputs.append(output._get_tensor())
    return message


@pytest.mark.parametrize("param", [{"int64_param": 0}, {"int64_param": -1}, {"string_param": "2"}])
def test_grpc_bad_classification_is_invalid_argument(param: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match=re.escape("outputs[0].parameters.classification")):
        _grpc(**param)


# --- label files ----------------------------------------------------------------------------------------------
def _config(label_filename: str) -> ModelConfig:
    config = ModelConfig()
    config.output.add(name="y", label_filename=label_filename)
    config.output.add(name="z")
    return config


def test_labels_are_read_per_output_one_per_line(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "labels.txt").write_bytes(b"cat\r\ndog\n\nfox")
    labels = load_labels(_config("labels.txt"), model, Repository(tmp_path))
    assert labels == {"y": (b"cat", b"dog", b"", b"fox")}
    (model / "labels.txt").write_bytes(b"cat\n")
    assert read_labels(model / "labels.txt", Repository(tmp_path), "w") == (b"cat",)


def test_a_missing_label_file_fails_the_load_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(LoadFailed, match=re.escape("output[0].label_filename")):
        load_labels(_config("labels.txt"), tmp_path / "m", Repository(tmp_path))


def test_a_label_file_linking_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    (repo / "m").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    (repo / "m" / "labels.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(InvalidInput, match="outside the model repository"):
        load_labels(_config("labels.txt"), repo / "m", Repository(repo))
