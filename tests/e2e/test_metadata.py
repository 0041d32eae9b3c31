"""Health, metadata, config, repository index and statistics, read with tritonclient and plain HTTP."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ServerProcess


def test_health_both_protocols(server: ServerProcess) -> None:
    for client in (
        httpclient.InferenceServerClient(server.http_address),
        grpcclient.InferenceServerClient(server.grpc_address),
    ):
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("mlp")
        assert not client.is_model_ready("no-such-model")
    assert httpx.get(f"{server.http_url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.http_url}/v2/health/ready").json() == {"ready": True}


def test_grpc_health_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        status = stub.Check(health_pb2.HealthCheckRequest(service="nope")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_server_metadata_lists_extensions(server: ServerProcess) -> None:
    meta = httpclient.InferenceServerClient(server.http_address).get_server_metadata()
    assert meta["name"] == "optiserve"
    for extension in ("binary_tensor_data", "model_repository", "statistics", "model_configuration"):
        assert extension in meta["extensions"]
    gmeta = grpcclient.InferenceServerClient(server.grpc_address).get_server_metadata()
    assert list(gmeta.extensions) == meta["extensions"]


def test_model_metadata(server: ServerProcess) -> None:
    meta = httpclient.InferenceServerClient(server.http_address).get_model_metadata("dynamic_seq")
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "tokens", "datatype": "FP32", "shape": [-1, -1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"scaled": [-1, -1], "mean": [-1, 1]}
    gmeta = grpcclient.InferenceServerClient(server.grpc_address).get_model_metadata("no_batch")
    assert list(gmeta.inputs[0].shape) == [2, 3]
    assert gmeta.inputs[0].datatype == "FP32"


def test_model_config_is_triton_shaped(server: ServerProcess) -> None:
    config = httpx.get(f"{server.http_url}/v2/models/configured/config").json()
    assert config["name"] == "configured"
    assert config["max_batch_size"] == 4
    assert config["input"][0] == {**config["input"][0], "name": "x", "data_type": "TYPE_FP32", "dims": [8]}
    assert config["output"][0]["dims"] == [4] and config["output"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert config["instance_group"][0]["count"] == 2
    auto = httpx.get(f"{server.http_url}/v2/models/no_batch/config").json()
    assert auto["max_batch_size"] == 0 and auto["input"][0]["dims"] == [2, 3]
    strings = httpclient.InferenceServerClient(server.http_address).get_model_config("strings")
    assert strings["input"][0]["data_type"] == "TYPE_STRING"
    gconfig = grpcclient.InferenceServerClient(server.grpc_address).get_model_config("configured").config
    assert gconfig.max_batch_size == 4 and list(gconfig.input[0].dims) == [8]


def test_yaml_config_applies(server: ServerProcess) -> None:
    config = httpx.get(f"{server.http_url}/v2/models/yaml_configured/config").json()
    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [-1, 8]


def test_repository_index(server: ServerProcess) -> None:
    index = httpclient.InferenceServerClient(server.http_address).get_model_repository_index()
    rows = {(row["name"], row.get("version", "")): row["state"] for row in index}
    assert rows[("mlp", "1")] == "READY"
    assert rows[("versioned", "2")] == "READY"
    gindex = grpcclient.InferenceServerClient(server.grpc_address).get_model_repository_index()
    assert {m.name for m in gindex.models} == {name for name, _ in rows}


def test_statistics_count_requests(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.http_address)
    before = client.get_inference_statistics("int64", "1")["model_stats"][0]
    tensor = httpclient.InferInput("ids", [2, 5], "INT64")
    tensor.set_data_from_numpy(np.ones((2, 5), np.int64))
    for _ in range(3):
        client.infer("int64", [tensor])
    after = client.get_inference_statistics("int64", "1")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_count"] - before["inference_count"] == 6  # 3 requests x 2 samples
    assert after["batch_stats"] and all("compute_infer" in b for b in after["batch_stats"])
    gstats = grpcclient.InferenceServerClient(server.grpc_address).get_inference_statistics("int64")
    assert gstats.model_stats[0].inference_count >= after["inference_count"]
    everything = httpx.get(f"{server.http_url}/v2/models/stats").json()
    assert {s["name"] for s in everything["model_stats"]} >= {"mlp", "int64", "versioned"}
