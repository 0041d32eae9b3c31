"""GPU serving on a real NVIDIA GPU with onnxruntime-gpu: skipped unless the CUDA provider is installed AND a
CUDA session really lands on a GPU (a CUDA build on a machine without a driver falls back to the CPU).

Checks: instances are placed per GPU and run on CUDA (or TensorRT) through IO binding; served outputs equal CPU
onnxruntime within fp32 tolerance (loosened for TF32, which onnxruntime's CUDA provider uses for FP32 convolutions
and GEMMs on Ampere and newer); the optimization report lists each instance's providers; a fallback from TensorRT
is logged; the GPU gauges appear on /metrics; CUDA graphs are captured per batch size and replay the same
outputs; batches staged in pinned host memory come out the same.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizers.providers import CPU, CUDA, GPU_PROVIDERS, TENSORRT
from server.backends.onnxruntime import OnnxRuntimeBackend
from server.errors import LoadFailed
from server.repository.config import parse_config
from server.settings import Settings

TRT = TENSORRT
RTOL, ATOL = 1e-2, 1e-3  # TF32 keeps 10 mantissa bits: ~1e-3 relative error after a few hundred products
CONFIG = """
name: "cnn"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { kind: KIND_GPU count: 2 } ]
"""


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """x [batch,3,32,32] -> conv3x3(8) -> relu -> conv3x3/2(16) -> relu -> GAP -> gemm(10) -> y [batch,10]."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return numpy_helper.from_array(rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["y"], transB=1),
    ]
    initializers = [
        weight("w1", 8, 3, 3, 3),
        numpy_helper.from_array(np.full(8, 0.1, np.float32), "b1"),
        weight("w2", 16, 8, 3, 3),
        numpy_helper.from_array(np.full(16, 0.1, np.float32), "b2"),
        weight("w3", 10, 16),
        numpy_helper.from_array(np.zeros(10, np.float32), "b3"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _why_no_gpu() -> str | None:
    """None when a CUDA session really runs on a GPU here; otherwise why these tests skip."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if CUDA not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (pip install '.[gpu]')"
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    try:
        session = ort.InferenceSession(small_cnn().SerializeToString(), providers=[CUDA, CPU])
    except Exception as exc:
        return f"a CUDA session could not be created: {exc}"
    if session.get_providers()[0] != CUDA:
        return f"onnxruntime fell back to {session.get_providers()}: no usable GPU (driver, CUDA or cuDNN missing)"
    return None


@pytest.fixture(scope="module", autouse=True)
def needs_gpu() -> None:
    reason = _why_no_gpu()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cnn") / "model.onnx"
    onnx.save(small_cnn(), str(path))
    return path


def cpu_reference(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=[CPU])
    return np.asarray(session.run(None, {"x": x})[0])


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _serve_cnn(tmp_path: Path, model_file: Path, config: str, start_server: Any, **env: str) -> Any:
    """The real server on a repository holding the CNN as model "cnn" with ``config``; optimizer off."""
    version_dir = tmp_path / "repo" / "cnn" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(model_file.read_bytes())
    (tmp_path / "repo" / "cnn" / "config.pbtxt").write_text(config)
    return start_server(tmp_path / "repo", env={"OPTISERVE_DEFAULT_PRECISION": "none", **env})


def _infer_http(http_url: str, x: np.ndarray) -> np.ndarray:
    """One JSON inference of model "cnn"; must answer 200."""
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = httpx.post(f"{http_url}/v2/models/cnn/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_gpu_backends_match_cpu(model_file: Path, tmp_path: Path) -> None:
    """In process, no server: the plan, the provider options, the session and IO binding on every GPU."""
    from server.backends import gpu
    from server.models.placement import instance_plan

    config = parse_config(CONFIG, "pbtxt").config
    settings = Settings(cache_dir=tmp_path)
    plan = gpu.with_gpu_options(instance_plan(config, settings), config, settings, fp16=False)
    visible = gpu.visible_gpu_count()
    assert [p.device_id for p in plan] == list(range(visible)) * 2
    for index, session_config in enumerate(plan):
        backend = OnnxRuntimeBackend(f"cnn:1#{index}", model_file, session_config)
        backend.load()
        try:
            assert backend.providers[0] in GPU_PROVIDERS and backend.device == f"gpu:{session_config.device_id}"
            for batch in (1, 3, 8):
                x = _images(batch, seed=batch)
                got = backend.infer({"x": x})["y"]
                np.testing.assert_allclose(got, cpu_reference(model_file, x), rtol=RTOL, atol=ATOL)
        finally:
            backend.unload()


def test_gpu_outside_the_visible_ones_fails_to_load() -> None:
    from server.backends import gpu
    from server.models.placement import instance_plan

    visible = gpu.visible_gpu_count()
    config = parse_config(CONFIG.replace("count: 2", f"count: 1 gpus: [ {visible} ]"), "pbtxt").config
    with pytest.raises(LoadFailed, match=rf"gpus: GPU {visible} is not visible"):
        instance_plan(config, Settings())


def test_served_on_gpu(tmp_path: Path, model_file: Path, start_server: Any) -> None:
    """The real server with a KIND_GPU model: outputs, concurrency, the report, the log, /metrics."""
    import tritonclient.grpc as grpcclient

    from server.backends.gpu import visible_gpu_count

    server = _serve_cnn(tmp_path, model_file, CONFIG, start_server)

    def infer_http(x: np.ndarray) -> np.ndarray:
        return _infer_http(server.http_url, x)

    for batch in (1, 3):
        x = _images(batch, seed=10 + batch)
        np.testing.assert_allclose(infer_http(x), cpu_reference(model_file, x), rtol=RTOL, atol=ATOL)

    client = grpcclient.InferenceServerClient(server.grpc_address)
    x = _images(8, seed=20)
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = client.infer("cnn", [tensor]).as_numpy("y")
    np.testing.assert_allclose(got, cpu_reference(model_file, x), rtol=RTOL, atol=ATOL)

    # Many requests at once: the batcher spreads them over every instance on every GPU.
    inputs = [_images(1, seed=100 + i) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(infer_http, inputs))
    for x, got in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(got, cpu_reference(model_file, x), rtol=RTOL, atol=ATOL)

    report = httpx.get(f"{server.http_url}/v2/models/cnn/optimization", timeout=10).json()
    instances = report["instances"]
    assert len(instances) == 2 * visible_gpu_count()
    assert {i["device"] for i in instances} == {f"gpu:{n}" for n in range(visible_gpu_count())}
    assert all(i["providers"][0] in (TRT, CUDA) for i in instances), instances
    assert "could not use CUDAExecutionProvider" not in server.log
    import onnxruntime as ort

    if TRT in ort.get_available_providers() and any(i["providers"][0] == CUDA for i in instances):
        # TensorRT was asked for (its provider is installed) but did not start: that must be said, never silent.
        assert "could not use TensorrtExecutionProvider" in server.log

    metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    if importlib.util.find_spec("pynvml") is None:
        pytest.skip("served correctly on the GPU; nvidia-ml-py is not installed, so the GPU gauges were not checked")
    for family in ("optiserve_gpu_utilization_ratio", "optiserve_gpu_memory_used_bytes"):
        assert f'{family}{{gpu="0"}}' in metrics
    assert 'optiserve_gpu_memory_total_bytes{gpu="0"}' in metrics


GRAPHS_CONFIG = CONFIG.replace("count: 2", "count: 1") + "optimization { cuda { graphs: true } }\n"


def test_pinned_memory_is_available_and_feeds_the_gpu(model_file: Path) -> None:
    """The CUDA runtime onnxruntime-gpu loaded pins memory here, and a batch staged in it infers correctly."""
    from server.backends.onnxruntime import SessionConfig
    from server.backends.pinned import PinnedHost

    host = PinnedHost.shared()
    assert host is not None, "the CUDA runtime could not pin host memory on a GPU machine"
    config = SessionConfig(providers=(CUDA, CPU), device_id=0, pinned_host_buffers=True)
    backend = OnnxRuntimeBackend("cnn:1#0", model_file, config)
    backend.load()
    try:
        assert backend.pinned
        x = _images(6, seed=3)
        staged = backend.staging_buffer("x", x.shape, x.dtype)
        assert staged is not None and staged.shape == x.shape
        staged[...] = x
        np.testing.assert_allclose(
            backend.infer({"x": staged})["y"], cpu_reference(model_file, x), rtol=RTOL, atol=ATOL
        )
    finally:
        backend.unload()


def test_cuda_graphs_are_captured_and_replay_correct_outputs(model_file: Path, tmp_path: Path) -> None:
    """In process: the planned CUDA instance captures graphs 1, 2, 4, 8 at load, and every batch size from 1 to 8
    (padded ones included, replayed twice so later replays see new data) matches the CPU."""
    from server.backends import gpu
    from server.models.placement import instance_plan

    config = parse_config(GRAPHS_CONFIG, "pbtxt").config
    settings = Settings(cache_dir=tmp_path, execution_providers=[CUDA, CPU])
    (session_config, *_) = gpu.with_gpu_options(instance_plan(config, settings), config, settings, fp16=False)
    assert session_config.cuda_graphs and session_config.graph_batch_sizes == (1, 2, 4, 8)
    backend = OnnxRuntimeBackend("cnn:1#0", model_file, session_config)
    backend.load()
    try:
        backend.prepare()  # captures on this thread, which also replays (onnxruntime keeps graphs per thread)
        assert backend.graphs_off_reason is None, backend.graphs_off_reason
        assert backend.cuda_graph_sizes == (1, 2, 4, 8)
        for seed in (1, 2):
            for batch in range(1, 9):
                x = _images(batch, seed=seed * 100 + batch)
                got = backend.infer({"x": x})["y"]
                assert got.shape == (batch, 10)
                np.testing.assert_allclose(got, cpu_reference(model_file, x), rtol=RTOL, atol=ATOL)
    finally:
        backend.unload()


def test_served_with_cuda_graphs(tmp_path: Path, model_file: Path, start_server: Any) -> None:
    """The real server with graphs asked for: the report shows them, concurrent requests get correct outputs."""
    server = _serve_cnn(
        tmp_path, model_file, GRAPHS_CONFIG, start_server, OPTISERVE_EXECUTION_PROVIDERS=f'["{CUDA}","{CPU}"]'
    )
    report = httpx.get(f"{server.http_url}/v2/models/cnn/optimization", timeout=10).json()
    for instance in report["instances"]:
        assert instance["cuda_graphs"] is True and instance["cuda_graph_batch_sizes"] == [1, 2, 4, 8], instance
        assert instance["pinned_host_buffers"] is True, instance

    def infer_http(x: np.ndarray) -> np.ndarray:
        return _infer_http(server.http_url, x)

    inputs = [_images(1 + i % 3, seed=300 + i) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(infer_http, inputs))
    for x, got in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(got, cpu_reference(model_file, x), rtol=RTOL, atol=ATOL)
    assert "serving without CUDA graphs" not in server.log
