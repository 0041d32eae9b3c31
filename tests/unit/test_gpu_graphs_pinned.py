"""Pinned staging buffers and CUDA graphs without a GPU: the CUDA runtime, onnxruntime's OrtValue, IO binding
and RunOptions are faked, so these tests pin down the bookkeeping (which graph a batch replays, padding and
cutting back, fallbacks and their reasons, where the batcher concatenates). tests/gpu runs the real thing."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from optimizers.providers import CPU, CUDA, TENSORRT
from server.backends import gpu
from server.backends import onnxruntime as ort_backend
from server.backends.cuda_graphs import GRAPH_ID, NO_GRAPH, WARMUP_RUNS, CudaGraphs, GraphsUnsupported
from server.backends.onnxruntime import OnnxRuntimeBackend, SessionConfig
from server.backends.pinned import PinnedHost, StagingBuffers
from server.errors import LoadFailed
from server.models.batching import Batcher
from server.models.placement import instance_report
from server.models.stats import ModelStats
from server.repository.config import parse_config
from server.settings import Settings

TRT = TENSORRT


# ---- a fake CUDA runtime ----------------------------------------------------------------------------------------
class FakeCudaRuntime:
    """cudaHostAlloc/cudaFreeHost over ordinary memory, remembering what is live; ``fail`` plays a driver that
    refuses (error 2, cudaErrorMemoryAllocation)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.live: dict[int, Any] = {}
        self.freed: list[int] = []

    def cudaHostAlloc(self, pointer: Any, size: int, flags: int) -> int:  # CUDA's names
        assert flags == 1  # portable
        if self.fail:
            return 2
        block = ctypes.create_string_buffer(size)
        address = ctypes.addressof(block)
        self.live[address] = block
        pointer._obj.value = address
        return 0

    def cudaFreeHost(self, pointer: Any) -> int:
        address = pointer.value if isinstance(pointer, ctypes.c_void_p) else pointer
        self.live.pop(address)
        self.freed.append(address)
        return 0


def test_pinned_arrays_live_in_pinned_memory_and_free_it_when_dropped() -> None:
    runtime = FakeCudaRuntime()
    host = PinnedHost.probed(runtime)
    assert host is not None and runtime.freed and not runtime.live  # the probe page was given back
    array = host.empty((4, 3), np.dtype(np.float32))
    assert array is not None and array.shape == (4, 3) and array.dtype == np.float32
    (address,) = runtime.live
    assert array.ctypes.data == address
    array[...] = 7.0
    view = array[1:]
    del array
    gc.collect()
    assert address in runtime.live  # a view still holds the block
    assert float(view.sum()) == 7.0 * 9
    del view
    gc.collect()
    assert address not in runtime.live and runtime.freed[-1] == address


def test_no_pinned_memory_when_the_driver_refuses(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "optiserve.gpu"):
        assert PinnedHost.probed(FakeCudaRuntime(fail=True), "libcudart.so.13") is None
    assert "libcudart.so.13 cannot pin host memory (CUDA error 2)" in caplog.text


def test_no_cuda_runtime_means_no_allocator(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("server.backends.pinned.CUDA_RUNTIMES", ("libcudart-that-does-not-exist.so",))
    with caplog.at_level(logging.WARNING, "optiserve.gpu"):
        assert PinnedHost._open() is None
    assert "upload from pageable memory" in caplog.text


def test_the_cuda_runtime_already_loaded_is_tried_first(tmp_path: Path) -> None:
    from server.backends.pinned import CUDA_RUNTIMES, runtime_names

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 0 08:01 1 /venv/nvidia/cu12/lib/libcudart.so.12\n7f10-7f20 r--p 0 0 0 [heap]\n")
    assert runtime_names(maps) == ["libcudart.so.12", *[n for n in CUDA_RUNTIMES if n != "libcudart.so.12"]]
    assert runtime_names(tmp_path / "missing") == list(CUDA_RUNTIMES)


def test_staging_buffers_are_reused_and_grow_to_the_next_power_of_two() -> None:
    runtime = FakeCudaRuntime()
    host = PinnedHost.probed(runtime)
    assert host is not None
    staging = StagingBuffers(host)
    first = staging.get("x", (3, 5), np.dtype(np.float32))  # 60 bytes: a 64-byte block
    assert first is not None and first.shape == (3, 5) and len(runtime.live) == 1
    again = staging.get("x", (2, 5), np.dtype(np.float32))
    assert again is not None and again.ctypes.data == first.ctypes.data and len(runtime.live) == 1
    bigger = staging.get("x", (9, 5), np.dtype(np.float32))  # 180 bytes: a 256-byte block
    assert bigger is not None and bigger.shape == (9, 5)
    assert ctypes.sizeof(runtime.live[bigger.ctypes.data]) == 256
    del first, again
    gc.collect()
    assert len(runtime.live) == 1  # the outgrown block was freed
    other = staging.get("x", (2, 6), np.dtype(np.int64))  # another dtype and sample shape fit the same block
    assert other is not None and other.shape == (2, 6) and other.ctypes.data == bigger.ctypes.data
    assert staging.get("names", (2,), np.dtype(object)) is None  # BYTES stays in numpy's hands
    assert staging.active
    runtime.fail = True
    assert staging.get("z", (2,), np.dtype(np.int64)) is None
    assert not staging.active
    assert staging.get("x", (2, 6), np.dtype(np.float32)) is None  # after a refusal it stops asking


def test_changing_sequence_lengths_do_not_reallocate() -> None:
    """A text model's batches differ in length; pinned memory is allocated only when a batch needs more bytes."""
    runtime = FakeCudaRuntime()
    host = PinnedHost.probed(runtime)
    assert host is not None
    staging = StagingBuffers(host)
    frees = len(runtime.freed)  # the probe's page
    for length in (7, 9, 11, 13, 7, 9, 13, 2):
        staged = staging.get("tokens", (4, length), np.dtype(np.int64))
        assert staged is not None and staged.shape == (4, length)
        del staged
    gc.collect()
    (block,) = runtime.live.values()
    assert ctypes.sizeof(block) == 512  # 4x7 int64 took 256 bytes, 4x9 grew it once to 512, then it fit
    assert len(runtime.freed) - frees == 1


# ---- a fake onnxruntime for CUDA graphs ---------------------------------------------------------------------------
class Meta:
    def __init__(self, name: str, shape: list[Any], type_: str = "tensor(float)") -> None:
        self.name, self.shape, self.type = name, shape, type_


class FakeOrtValue:
    """A tensor 'on a device': a numpy array that only update_inplace may change, like a fixed device buffer."""

    uploads: list[tuple[int, tuple[int, ...]]] = []  # (address of the host array, shape) per update_inplace

    def __init__(self, array: np.ndarray, device: tuple[str, int]) -> None:
        self.array, self.device = array, device

    @classmethod
    def ortvalue_from_numpy(cls, array: np.ndarray, device_type: str = "cpu", device_id: int = 0) -> FakeOrtValue:
        return cls(np.array(array, copy=True), (device_type, device_id))

    @classmethod
    def ortvalue_from_shape_and_type(
        cls, shape: tuple[int, ...], element_type: Any, device_type: str = "cpu", device_id: int = 0
    ) -> FakeOrtValue:
        return cls(np.empty(shape, element_type), (device_type, device_id))

    def update_inplace(self, array: np.ndarray) -> None:
        assert array.shape == self.array.shape and array.dtype == self.array.dtype and array.flags.c_contiguous
        FakeOrtValue.uploads.append((array.ctypes.data, array.shape))
        self.array[...] = array


class FakeRunOptions:
    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def add_run_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


class GraphBinding:
    def __init__(self) -> None:
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.results: list[np.ndarray] = []

    def bind_ortvalue_input(self, name: str, value: FakeOrtValue) -> None:
        self.inputs[name] = value

    def bind_ortvalue_output(self, name: str, value: FakeOrtValue) -> None:
        self.outputs[name] = value

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = array

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.outputs[name] = None

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [np.array(v.array, copy=True) for v in self.outputs.values()] if self.results == [] else self.results


class GraphSession:
    """y = 2x + 1 and s = sum(x) per row, computed from whatever is bound; records (graph id, rows) per run.
    ``refuse_graphs`` plays onnxruntime refusing enable_cuda_graph for a model with CPU nodes."""

    refuse_graphs = False
    x_shape: list[Any] = ["batch", 2]
    outputs = [Meta("y", ["batch", 2]), Meta("s", ["batch"])]
    instances: list[GraphSession] = []

    def __init__(self, path: str, options: Any = None, providers: Any = None) -> None:
        self.asked = dict(providers or [])
        if GraphSession.refuse_graphs and self.asked.get(CUDA, {}).get("enable_cuda_graph") == "1":
            raise RuntimeError("all compute graph nodes have not been partitioned to the CUDA EP")
        self.actual = [name for name, _ in providers or []]
        self.runs: list[tuple[str | None, int]] = []
        GraphSession.instances.append(self)

    def get_inputs(self) -> list[Meta]:
        return [Meta("x", self.x_shape)]

    def get_outputs(self) -> list[Meta]:
        return self.outputs

    def get_providers(self) -> list[str]:
        return self.actual

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {p: dict(self.asked[p]) for p in self.actual}

    def io_binding(self) -> GraphBinding:
        return GraphBinding()

    def run_with_iobinding(self, binding: GraphBinding, run_options: FakeRunOptions | None = None) -> None:
        bound = binding.inputs["x"]
        x = bound.array if isinstance(bound, FakeOrtValue) else bound
        graph = run_options.entries.get(GRAPH_ID) if run_options is not None else None
        self.runs.append((graph, len(x)))
        y, s = 2 * x + 1, x.sum(axis=-1)
        if isinstance(binding.outputs.get("y"), FakeOrtValue):
            binding.outputs["y"].array[...] = y
            binding.outputs["s"].array[...] = s
        else:
            binding.results = [y, s]


@pytest.fixture
def fake_graph_ort(monkeypatch: pytest.MonkeyPatch) -> Any:
    FakeOrtValue.uploads = []
    GraphSession.instances = []
    monkeypatch.setattr(GraphSession, "refuse_graphs", False)
    monkeypatch.setattr(onnxruntime, "InferenceSession", GraphSession)
    monkeypatch.setattr(onnxruntime, "OrtValue", FakeOrtValue)
    monkeypatch.setattr(onnxruntime, "RunOptions", FakeRunOptions)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(ort_backend.PinnedHost, "shared", classmethod(lambda cls: None))
    return onnxruntime


def _rows(n: int, width: int = 2) -> np.ndarray:
    return (np.arange(n * width, dtype=np.float32).reshape(n, width) + 1).astype(np.float32)


# ---- CudaGraphs ---------------------------------------------------------------------------------------------------
def test_each_batch_replays_the_smallest_graph_that_fits(fake_graph_ort: Any) -> None:
    session = GraphSession("m.onnx", providers=[(CUDA, {})])
    graphs = CudaGraphs.capture(session, fake_graph_ort, 0, (8, 1, 4, 2, 4), None)
    assert graphs.sizes == (1, 2, 4, 8)
    ids = {rows: graph.run_options.entries[GRAPH_ID] for rows, graph in graphs._graphs.items()}
    assert len(set(ids.values())) == 4 and "0" not in ids.values()
    assert session.runs == [(ids[size], size) for size in (1, 2, 4, 8) for _ in range(WARMUP_RUNS)]
    session.runs.clear()

    x = _rows(3)
    y, s = graphs.run({"x": x})  # type: ignore[misc]
    assert session.runs == [(ids[4], 4)]  # padded up to the graph of 4
    np.testing.assert_array_equal(y, 2 * x + 1)
    np.testing.assert_array_equal(s, x.sum(axis=1))
    device_x = graphs._graphs[4].device_inputs["x"].array
    np.testing.assert_array_equal(device_x[3], [0, 0])  # the padding row is zeros, not an earlier batch

    x = _rows(4)
    y, _ = graphs.run({"x": np.asfortranarray(x)})  # type: ignore[misc]
    assert session.runs[-1] == (ids[4], 4) and y.shape == (4, 2)
    np.testing.assert_array_equal(y, 2 * x + 1)
    assert graphs.run({"x": _rows(9)}) is None  # larger than every graph


def test_a_feed_no_graph_was_captured_for_is_refused(fake_graph_ort: Any) -> None:
    graphs = CudaGraphs.capture(GraphSession("m.onnx", providers=[(CUDA, {})]), fake_graph_ort, 0, (2,), None)
    assert graphs.run({"x": _rows(2).astype(np.float64)}) is None
    assert graphs.run({"x": _rows(2, width=3)}) is None
    assert graphs.run({"x": _rows(2), "extra": _rows(2)}) is None
    assert graphs.run({"x": _rows(2)}) is not None


def test_padding_buffers_are_pinned_when_pinned_memory_is_there(fake_graph_ort: Any) -> None:
    runtime = FakeCudaRuntime()
    host = PinnedHost.probed(runtime)
    graphs = CudaGraphs.capture(GraphSession("m.onnx", providers=[(CUDA, {})]), fake_graph_ort, 0, (1, 4, 8), host)
    padding = graphs._padding["x"]
    assert padding.ctypes.data in runtime.live and len(padding) == 8 * 2 * 4  # one block, for the largest graph
    graphs.run({"x": _rows(3)})
    assert FakeOrtValue.uploads[-1] == (padding.ctypes.data, (4, 2))  # uploaded from pinned memory
    graphs.run({"x": _rows(5)})
    assert FakeOrtValue.uploads[-1] == (padding.ctypes.data, (8, 2))  # every size pads in the same block


def test_models_that_cannot_be_graphs_say_why(fake_graph_ort: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GraphSession, "x_shape", ["batch", "features"])
    with pytest.raises(GraphsUnsupported, match=r"input 'x' has shape \['batch', 'features'\].*fixed dims after"):
        CudaGraphs.capture(GraphSession("m.onnx"), fake_graph_ort, 0, (1, 2), None)
    monkeypatch.setattr(GraphSession, "x_shape", ["batch", 2])
    monkeypatch.setattr(GraphSession, "outputs", [Meta("label", ["batch"], "tensor(string)")])
    with pytest.raises(GraphsUnsupported, match=r"output 'label' is tensor\(string\)"):
        CudaGraphs.capture(GraphSession("m.onnx"), fake_graph_ort, 0, (1, 2), None)


def test_an_unbatched_model_has_one_graph_for_its_fixed_shapes(
    fake_graph_ort: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GraphSession, "x_shape", [3, 2])
    monkeypatch.setattr(GraphSession, "outputs", [Meta("y", [3, 2]), Meta("s", [3])])
    session = GraphSession("m.onnx")
    graphs = CudaGraphs.capture(session, fake_graph_ort, 0, (), None)
    assert graphs.sizes == () and len(session.runs) == WARMUP_RUNS
    y, _ = graphs.run({"x": _rows(3)})  # type: ignore[misc]
    np.testing.assert_array_equal(y, 2 * _rows(3) + 1)
    assert graphs.run({"x": _rows(2)}) is None


def test_the_onnxruntime_calls_are_real(tmp_path: Path) -> None:
    """The same bookkeeping against the real onnxruntime API (CPU buffers, as no GPU is here): OrtValue
    creation, binding, update_inplace, the gpu_graph_id run option and copying bound outputs back."""
    from tests.models import fixtures

    model = fixtures.float_mlp()
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    session = onnxruntime.InferenceSession(str(path), providers=[CPU])
    (x_meta,) = session.get_inputs()
    graphs = CudaGraphs.capture(session, onnxruntime, 0, (1, 2, 4), None, device_type="cpu")
    assert graphs.sizes == (1, 2, 4)
    for rows in (1, 3, 4):
        x = np.random.default_rng(rows).standard_normal((rows, x_meta.shape[1])).astype(np.float32)
        outputs = graphs.run({x_meta.name: x})
        assert outputs is not None
        expected = session.run(None, {x_meta.name: x})
        for got, want in zip(outputs, expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert graphs.run({x_meta.name: np.zeros((5, x_meta.shape[1]), np.float32)}) is None


# ---- the backend: graphs on, fallbacks, the report ------------------------------------------------------------------
def _graph_config(providers: tuple[str, ...] = (CUDA, CPU), sizes: tuple[int, ...] = (1, 2, 4)) -> SessionConfig:
    return SessionConfig(
        providers=providers,
        device_id=0,
        cuda_graphs=True,
        graph_batch_sizes=sizes,
        provider_options={CUDA: {"device_id": "0", "enable_cuda_graph": "1"}},
    )


def test_graphs_are_captured_by_prepare_and_replayed(fake_graph_ort: Any) -> None:
    backend = OnnxRuntimeBackend("m:1#0", Path("m.onnx"), _graph_config())
    backend.load()
    (session,) = GraphSession.instances
    assert backend.cuda_graph_sizes is None and session.runs == []  # load captures nothing: wrong thread
    x = _rows(3)
    np.testing.assert_array_equal(backend.infer({"x": x})["y"], 2 * x + 1)
    assert session.runs == [(NO_GRAPH, 3)]  # before prepare(): plain runs, never captured by accident
    backend.prepare()
    assert backend.cuda_graph_sizes == (1, 2, 4) and len(session.runs) == 1 + 3 * WARMUP_RUNS
    np.testing.assert_array_equal(backend.infer({"x": x})["y"], 2 * x + 1)
    assert session.runs[-1][1] == 4 and session.runs[-1][0] not in (None, NO_GRAPH)
    x = _rows(6)  # larger than every captured size: an ordinary run, marked as not-a-graph
    np.testing.assert_array_equal(backend.infer({"x": x})["s"], x.sum(axis=1))
    assert session.runs[-1] == (NO_GRAPH, 6)
    assert instance_report([backend]) == [
        {
            "index": 0,
            "device": "gpu:0",
            "providers": [CUDA, CPU],
            "engine": "cuda",
            "nodes": {},
            "pinned_host_buffers": False,
            "cuda_graphs": True,
            "cuda_graph_batch_sizes": [1, 2, 4],
        }
    ]


def test_graphs_are_captured_on_the_worker_thread_that_replays_them(fake_graph_ort: Any) -> None:
    """onnxruntime keeps captured graphs per thread: the batcher runs prepare() on each instance's worker."""
    threads: list[tuple[str | None, str]] = []
    original = GraphSession.run_with_iobinding

    def recording(self: GraphSession, binding: GraphBinding, run_options: FakeRunOptions | None = None) -> None:
        graph = run_options.entries.get(GRAPH_ID) if run_options is not None else None
        threads.append((graph, threading.current_thread().name))
        original(self, binding, run_options)

    GraphSession.run_with_iobinding = recording  # type: ignore[method-assign]
    try:
        backends = [OnnxRuntimeBackend(f"m:1#{i}", Path("m.onnx"), _graph_config()) for i in range(2)]
        for backend in backends:
            backend.load()
        batcher = Batcher(
            "m:1",
            [b.infer for b in backends],
            preparers=[b.prepare for b in backends],
            max_batch_size=4,
            max_queue_size=0,
            stats=ModelStats(),
        )
        batcher.start()  # returns once every worker has captured
        try:
            assert all(b.cuda_graph_sizes == (1, 2, 4) for b in backends)
            captures = {name for _, name in threads}
            assert captures == {"m:1-worker-0", "m:1-worker-1"}
            threads.clear()

            async def one() -> Any:
                return await batcher.submit({"x": _rows(3)}, 3, (("x", (2,)),))

            out = asyncio.run(one())
            np.testing.assert_array_equal(out["y"], 2 * _rows(3) + 1)
            ((graph, name),) = threads
            assert graph not in (None, NO_GRAPH) and name.startswith("m:1-worker-")
        finally:
            batcher.close(1)
    finally:
        GraphSession.run_with_iobinding = original  # type: ignore[method-assign]


def test_a_preparer_that_fails_fails_the_start() -> None:
    def broken() -> None:
        raise LoadFailed("m:1#0: onnxruntime could not load the model: out of memory")

    batcher = Batcher("m:1", [lambda x: x], preparers=[broken], max_batch_size=4, max_queue_size=0, stats=ModelStats())
    with pytest.raises(LoadFailed, match="out of memory"):
        batcher.start()


def test_graphs_onnxruntime_refuses_are_dropped_with_a_warning(
    fake_graph_ort: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(GraphSession, "refuse_graphs", True)
    backend = OnnxRuntimeBackend("m:1#0", Path("m.onnx"), _graph_config())
    with caplog.at_level(logging.WARNING, "optiserve.backends"):
        backend.load()
        backend.prepare()
    assert "m:1#0: serving without CUDA graphs: onnxruntime refused CUDA graphs" in caplog.text
    (session,) = GraphSession.instances
    assert "enable_cuda_graph" not in session.asked[CUDA]
    np.testing.assert_array_equal(backend.infer({"x": _rows(2)})["y"], 2 * _rows(2) + 1)
    assert session.runs == [(None, 2)]  # a plain IO-binding run
    (entry,) = instance_report([backend])
    assert entry["cuda_graphs"] is False and "not been partitioned to the CUDA EP" in entry["cuda_graphs_off"]
    assert "cuda_graph_batch_sizes" not in entry


def test_other_load_errors_are_not_retried_without_graphs(fake_graph_ort: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(self: GraphSession, path: str, options: Any = None, providers: Any = None) -> None:
        raise RuntimeError("Protobuf parsing failed")

    monkeypatch.setattr(GraphSession, "__init__", corrupt)
    backend = OnnxRuntimeBackend("m:1#0", Path("m.onnx"), _graph_config())
    with pytest.raises(LoadFailed, match="Protobuf parsing failed"):
        backend.load()
    assert backend.graphs_off_reason is None


def test_a_model_that_cannot_be_captured_gets_a_session_without_graphs(
    fake_graph_ort: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GraphSession, "x_shape", ["batch", "features"])
    backend = OnnxRuntimeBackend("m:1#0", Path("m.onnx"), _graph_config())
    backend.load()
    backend.prepare()
    first, second = GraphSession.instances
    assert first.asked[CUDA]["enable_cuda_graph"] == "1" and "enable_cuda_graph" not in second.asked[CUDA]
    assert backend.cuda_graph_sizes is None and "fixed dims" in str(backend.graphs_off_reason)
    backend.infer({"x": _rows(2)})
    assert second.runs == [(None, 2)] and first.runs == []


def test_tensorrt_instances_run_without_graphs(fake_graph_ort: Any) -> None:
    backend = OnnxRuntimeBackend("m:1#0", Path("m.onnx"), _graph_config(providers=(TRT, CUDA, CPU)))
    backend.load()
    backend.prepare()
    assert backend.cuda_graph_sizes is None and "CUDA provider only" in str(backend.graphs_off_reason)
    backend.infer({"x": _rows(2)})
    assert GraphSession.instances[-1].runs == [(NO_GRAPH, 2)]  # the session has the option: runs opt out


# ---- configuration: Triton's optimization { cuda { graphs } } --------------------------------------------------------
def _config(text: str) -> Any:
    return parse_config('name: "m"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]\n' + text, "pbtxt").config


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("max_batch_size: 8", None),
        ("max_batch_size: 8 optimization { cuda { graphs: true } }", (1, 2, 4, 8)),
        ("max_batch_size: 12 optimization { cuda { graphs: true } }", (1, 2, 4, 8, 12)),
        ("max_batch_size: 1 optimization { cuda { graphs: true } }", (1,)),
        (
            "max_batch_size: 16 optimization { cuda { graphs: true "
            "graph_spec [ { batch_size: 8 }, { batch_size: 2 } ] } }",
            (2, 8),
        ),
        ("max_batch_size: 0 optimization { cuda { graphs: true } }", ()),
    ],
)
def test_graph_batch_sizes(text: str, sizes: tuple[int, ...] | None) -> None:
    assert gpu.cuda_graph_sizes(_config(text)) == sizes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "max_batch_size: 8 optimization { cuda { graphs: true graph_spec [ { batch_size: 16 } ] } }",
            r"graph_spec.batch_size: 16 is outside 1..max_batch_size \(8\)",
        ),
        (
            "max_batch_size: 0 optimization { cuda { graphs: true graph_spec [ { batch_size: 2 } ] } }",
            r"graph_spec.batch_size: must be 0 for a model with max_batch_size 0",
        ),
    ],
)
def test_bad_graph_specs_name_the_field(text: str, message: str) -> None:
    with pytest.raises(LoadFailed, match=message):
        gpu.cuda_graph_sizes(_config(text))


def test_gpu_options_turn_graphs_on_for_cuda_instances_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _config("max_batch_size: 4 optimization { cuda { graphs: true } }")
    plan = [
        SessionConfig(),
        SessionConfig(providers=(CUDA, CPU), device_id=0),
        SessionConfig(providers=(TRT, CUDA, CPU), device_id=1),
    ]
    settings = Settings(cache_dir=tmp_path, pinned_host_buffers=False)
    with caplog.at_level(logging.WARNING, "optiserve.gpu"):
        cpu, cuda, trt = gpu.with_gpu_options(plan, config, settings, fp16=False)
    assert cpu == SessionConfig()
    assert cuda.cuda_graphs and cuda.graph_batch_sizes == (1, 2, 4)
    assert cuda.provider_options[CUDA]["enable_cuda_graph"] == "1"
    assert not trt.cuda_graphs and "enable_cuda_graph" not in trt.provider_options[CUDA]
    assert "instances on TensorRT run without them" in caplog.text
    assert not cuda.pinned_host_buffers and not trt.pinned_host_buffers
    no_graphs = _config("max_batch_size: 4")
    (plain,) = gpu.with_gpu_options(plan[1:2], no_graphs, Settings(cache_dir=tmp_path), fp16=False)
    assert not plain.cuda_graphs and "enable_cuda_graph" not in plain.provider_options[CUDA]
    assert plain.pinned_host_buffers  # on by default
    assert mc.ModelConfig().optimization.cuda.graphs is False  # Triton's default: graphs are asked for


# ---- the capture lock --------------------------------------------------------------------------------------------
def test_a_capture_waits_for_runs_and_runs_wait_for_a_capture() -> None:
    from server.backends.capture_lock import SharedExclusiveLock

    lock = SharedExclusiveLock()
    order: list[str] = []
    run_started, capture_waiting = threading.Event(), threading.Event()
    release_run = threading.Event()

    def run() -> None:
        with lock.shared():
            run_started.set()
            order.append("run")
            assert release_run.wait(5)
        order.append("run done")

    def capture() -> None:
        capture_waiting.set()
        with lock.exclusive():
            order.append("capture")

    def late_run() -> None:
        with lock.shared():
            order.append("late run")

    first = threading.Thread(target=run)
    first.start()
    assert run_started.wait(5)
    writer = threading.Thread(target=capture)
    writer.start()
    assert capture_waiting.wait(5)
    time.sleep(0.05)  # the capture is now waiting for the run
    late = threading.Thread(target=late_run)
    late.start()
    time.sleep(0.05)
    assert order == ["run"]  # neither the capture nor a new run got in
    release_run.set()
    for thread in (first, writer, late):
        thread.join(5)
    assert order == ["run", "run done", "capture", "late run"]  # the waiting capture went before the new run


def test_the_lock_is_reentrant_where_the_garbage_collector_needs_it() -> None:
    """A pinned buffer freed by the collector takes the lock shared from inside a capture or a run."""
    from server.backends.capture_lock import SharedExclusiveLock

    lock = SharedExclusiveLock()
    with lock.exclusive(), lock.shared():
        pass
    writer_waiting = threading.Event()
    with lock.shared():

        def capture() -> None:
            writer_waiting.set()
            with lock.exclusive():
                pass

        writer = threading.Thread(target=capture)
        writer.start()
        assert writer_waiting.wait(5)
        time.sleep(0.05)
        with lock.shared():  # nested shared while a capture waits: must not deadlock
            pass
    writer.join(5)
    assert not writer.is_alive()
