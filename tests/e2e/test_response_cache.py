"""Triton's response cache through the real server: the same request twice over HTTP and gRPC gives the same
outputs, the repeat is a cache hit in the statistics and the metrics, and the backend does not run again; a
reload with new weights and a new version never answer from the old entries; concurrent clients get exact
answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import ServerProcess
from tests.models import fixtures

CACHED = "max_batch_size: 4\nresponse_cache { enable: true }\n"


def _stats(server: ServerProcess, model: str) -> dict[str, Any]:
    body = httpx.get(f"{server.http_url}/v2/models/{model}/stats").json()
    (stats,) = body["model_stats"]
    return dict(stats)


def _metric(server: ServerProcess, name: str, model: str) -> float:
    for line in httpx.get(f"{server.http_url}/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{model}",version="1"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _families(server: ServerProcess) -> dict[str, float]:
    """The unlabelled series of /metrics, by name."""
    found = {}
    for line in httpx.get(f"{server.http_url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            found[name] = float(value)
    return found


@pytest.fixture
def cache_server(start_server: Any, tmp_path: Path) -> ServerProcess:
    fixtures.write_model(tmp_path, "mlp", fixtures.float_mlp(), config=CACHED)
    fixtures.write_model(tmp_path, "strings", fixtures.strings(), config=CACHED)
    fixtures.write_model(tmp_path, "plain", fixtures.float_mlp(), config="max_batch_size: 4\n")
    server: ServerProcess = start_server(tmp_path, "--response-cache-bytes", str(1 << 20))
    return server


def _http(server: ServerProcess, model: str, name: str, array: np.ndarray, datatype: str) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(server.http_address)
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    result = client.infer(model, [tensor])
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def _grpc(server: ServerProcess, model: str, name: str, array: np.ndarray, datatype: str) -> dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(server.grpc_address)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer(model, [tensor])
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


@pytest.mark.parametrize("send", [_http, _grpc], ids=["http", "grpc"])
def test_the_same_request_twice_is_a_hit_with_the_same_outputs(cache_server: ServerProcess, send: Any) -> None:
    x = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32)
    first = send(cache_server, "mlp", "x", x, "FP32")
    before = _stats(cache_server, "mlp")
    second = send(cache_server, "mlp", "x", x.copy(), "FP32")
    after = _stats(cache_server, "mlp")
    assert first.keys() == second.keys() == {"y"}
    np.testing.assert_array_equal(first["y"], second["y"])
    assert first["y"].dtype == second["y"].dtype == np.float32
    hits = after["inference_stats"]["cache_hit"]
    assert hits["count"] == before["inference_stats"]["cache_hit"]["count"] + 1 >= 1 and hits["ns"] > 0
    assert after["inference_stats"]["cache_miss"]["count"] >= 1
    assert after["execution_count"] == before["execution_count"]  # the hit ran nothing
    assert after["inference_count"] == before["inference_count"]
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert _metric(cache_server, "optiserve_response_cache_hits_total", "mlp") >= 1
    assert _metric(cache_server, "optiserve_response_cache_misses_total", "mlp") >= 1
    assert _metric(cache_server, "optiserve_response_cache_hit_duration_seconds_total", "mlp") > 0
    assert _metric(cache_server, "optiserve_response_cache_miss_duration_seconds_total", "mlp") > 0
    families = _families(cache_server)
    assert families["optiserve_response_cache_size_bytes"] == 1 << 20
    assert 0 < families["optiserve_response_cache_used_bytes"] <= 1 << 20
    assert families["optiserve_response_cache_entries"] >= 1
    assert families["optiserve_response_cache_evictions_total"] == 0
    # Other input bytes are a miss and run the model.
    other = send(cache_server, "mlp", "x", x + 1, "FP32")
    assert not np.array_equal(other["y"], first["y"])
    assert _stats(cache_server, "mlp")["execution_count"] == after["execution_count"] + 1


def test_bytes_tensors_and_a_model_without_the_cache(cache_server: ServerProcess) -> None:
    text = np.array([[b"hello", "h\u00e9llo".encode()], [b"", b"x y z"]], dtype=object)
    for send in (_http, _grpc, _http):
        out = send(cache_server, "strings", "text", text, "BYTES")
        np.testing.assert_array_equal(out["echo"], text)
    stats = _stats(cache_server, "strings")
    assert stats["inference_stats"]["cache_hit"]["count"] == 2 and stats["execution_count"] == 1
    x = np.ones((1, 8), np.float32)
    for _ in range(2):
        _http(cache_server, "plain", "x", x, "FP32")
    plain = _stats(cache_server, "plain")
    assert plain["execution_count"] == 2
    assert plain["inference_stats"]["cache_hit"]["count"] == plain["inference_stats"]["cache_miss"]["count"] == 0


def test_enabled_in_the_config_but_off_server_wide(start_server: Any, tmp_path: Path) -> None:
    fixtures.write_model(tmp_path, "a", fixtures.float_mlp(), config=CACHED)
    fixtures.write_model(tmp_path, "b", fixtures.float_mlp(), config=CACHED)
    server: ServerProcess = start_server(tmp_path)  # --response-cache-bytes defaults to 0
    x = np.ones((1, 8), np.float32)
    for _ in range(2):
        _grpc(server, "a", "x", x, "FP32")
    stats = _stats(server, "a")
    assert stats["execution_count"] == 2 and stats["inference_stats"]["cache_hit"]["count"] == 0
    assert server.log.count("response cache is off server-wide") == 1


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": x})[0])


def _load(server: ServerProcess, model: str) -> None:
    reply = httpx.post(f"{server.http_url}/v2/repository/models/{model}/load", timeout=120)
    assert reply.status_code == 200, reply.text


def test_a_reload_or_a_new_version_never_answers_from_the_old_entries(start_server: Any, tmp_path: Path) -> None:
    first, reweighted, second = fixtures.float_mlp(seed=0), fixtures.float_mlp(seed=1), fixtures.float_mlp(seed=2)
    fixtures.write_model(tmp_path, "mlp", first, config=CACHED)
    server: ServerProcess = start_server(tmp_path, "--response-cache-bytes", str(1 << 20))
    x = np.random.default_rng(11).standard_normal((2, 8)).astype(np.float32)
    for _ in range(2):
        np.testing.assert_allclose(_grpc(server, "mlp", "x", x, "FP32")["y"], _reference(first, x), rtol=1e-5)
    assert _stats(server, "mlp")["inference_stats"]["cache_hit"]["count"] == 1
    assert _families(server)["optiserve_response_cache_entries"] == 1

    # Same name and version, new weights on disk, reloaded: the old answer must not come back.
    fixtures.write_model(tmp_path, "mlp", reweighted, config=CACHED)
    _load(server, "mlp")
    for _ in range(2):
        np.testing.assert_allclose(_http(server, "mlp", "x", x, "FP32")["y"], _reference(reweighted, x), rtol=1e-5)
    stats = _stats(server, "mlp")  # the reloaded version counts afresh: one miss, then a hit
    assert stats["execution_count"] == 1 and stats["inference_stats"]["cache_hit"]["count"] == 1
    assert _families(server)["optiserve_response_cache_entries"] == 1  # the closed version's entry was dropped

    # A new version takes over (latest policy): it runs, and then caches its own answer.
    fixtures.write_model(tmp_path, "mlp", second, version=2, config=CACHED)
    _load(server, "mlp")
    for _ in range(2):
        np.testing.assert_allclose(_grpc(server, "mlp", "x", x, "FP32")["y"], _reference(second, x), rtol=1e-5)
    body = httpx.get(f"{server.http_url}/v2/models/mlp/versions/2/stats").json()
    (v2,) = body["model_stats"]
    assert v2["execution_count"] == 1 and v2["inference_stats"]["cache_hit"]["count"] == 1


def test_concurrent_clients_get_exact_answers(cache_server: ServerProcess) -> None:
    model = fixtures.float_mlp()
    rng = np.random.default_rng(5)
    distinct = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(6)]
    expected = [_reference(model, x) for x in distinct]
    before = _stats(cache_server, "mlp")
    jobs = [(i % len(distinct), _http if i % 2 else _grpc) for i in range(96)]

    def call(job: tuple[int, Any]) -> tuple[int, np.ndarray]:
        index, send = job
        return index, send(cache_server, "mlp", "x", distinct[index], "FP32")["y"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, jobs))
    for index, y in answers:
        np.testing.assert_allclose(y, expected[index], rtol=1e-5)
    # Each distinct input got the identical answer whether it was computed or served from the cache.
    for index in range(len(distinct)):
        first = next(y for i, y in answers if i == index)
        assert all(np.array_equal(y, first) for i, y in answers if i == index)
    after = _stats(cache_server, "mlp")["inference_stats"]
    hits = after["cache_hit"]["count"] - before["inference_stats"]["cache_hit"]["count"]
    misses = after["cache_miss"]["count"] - before["inference_stats"]["cache_miss"]["count"]
    assert hits + misses == len(jobs) and hits >= len(jobs) - 8 * len(distinct)
    # gRPC's ModelStatistics carries the same cache_hit/cache_miss counts and durations.
    client = grpcclient.InferenceServerClient(cache_server.grpc_address)
    (grpc_stats,) = client.get_inference_statistics("mlp").model_stats
    for field in ("cache_hit", "cache_miss"):
        duration = getattr(grpc_stats.inference_stats, field)
        assert (duration.count, duration.ns) == (after[field]["count"], after[field]["ns"])
