"""The pure-Python parts of ``python -m bench.gpu`` (which needs a GPU to run): arguments, output folder, the
served config, the ResNet-50 builder, timing, metric parsing and the printed table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from bench import gpu as bench_gpu
from bench.models import build_resnet50_like
from server.backends.gpu import tensorrt_profile
from server.repository.config import parse_config


def test_results_go_to_out_when_set() -> None:
    assert bench_gpu.out_dir({"OUT": "/tmp/device-out"}) == Path("/tmp/device-out")
    assert bench_gpu.out_dir({}) == bench_gpu.ROOT / "bench" / "out" / "gpu"
    args = bench_gpu.parse_args([], {"OUT": "/tmp/o"})
    assert args.out == Path("/tmp/o") and args.batches == [1, 64, 256] and args.concurrency == [16, 64]
    assert args.variants == ["plain", "graphs"]
    assert bench_gpu.parse_args(["--batches", "1,8", "--concurrency", "4"]).batches == [1, 8]
    assert bench_gpu.parse_args(["--variants", "graphs"]).variants == ["graphs"]
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--batches", "0,8"])


@pytest.mark.parametrize("variants", ["plain,bogus", "", ","])
def test_unknown_or_no_variants_are_rejected(variants: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.parse_args(["--variants", variants])
    assert exit_info.value.code == 2 and "--variants" in capsys.readouterr().err


def test_served_config_is_kind_gpu_with_a_tensorrt_profile() -> None:
    config = parse_config(bench_gpu.model_config(64, 2, 200), "pbtxt").config
    group = config.instance_group[0]
    assert (group.count, group.kind, config.max_batch_size) == (2, mc.ModelInstanceGroup.KIND_GPU, 64)
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    assert tensorrt_profile(config) == ("input:1x3x224x224", "input:64x3x224x224", "input:64x3x224x224")
    assert config.name == "resnet50" and not config.optimization.cuda.graphs


def test_graphs_variant_config_asks_for_cuda_graphs_under_its_own_name() -> None:
    config = parse_config(bench_gpu.model_config(32, 1, 100, graphs=True), "pbtxt").config
    assert config.name == bench_gpu.VARIANTS["graphs"] == "resnet50_graphs"
    assert config.optimization.cuda.graphs
    assert (config.max_batch_size, config.instance_group[0].count) == (32, 1)


def test_repo_has_one_folder_per_variant_with_the_same_model(tmp_path: Path) -> None:
    args = bench_gpu.parse_args(["--base-width", "1"])
    repo = bench_gpu.write_repo(tmp_path, args)
    assert sorted(path.name for path in repo.iterdir()) == ["resnet50", "resnet50_graphs"]
    built = bench_gpu.model_file(tmp_path).read_bytes()
    for variant, model in bench_gpu.VARIANTS.items():
        assert (repo / model / "1" / "model.onnx").read_bytes() == built
        config = parse_config((repo / model / "config.pbtxt").read_text(), "pbtxt").config
        assert (config.name, config.optimization.cuda.graphs) == (model, variant == "graphs")


def test_resnet50_like_topology_runs_on_cpu() -> None:
    model = build_resnet50_like(base_width=4)  # the same 53 convolutions, 1/16 of the channels
    assert sum(node.op_type == "Conv" for node in model.graph.node) == 53
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.ones((2, 3, 224, 224), np.float32)})
    assert out.shape == (2, 1000) and np.isfinite(out).all()


def test_time_calls_takes_the_median_of_windows() -> None:
    calls: list[int] = []
    point = bench_gpu.time_calls(lambda: calls.append(1), batch=8, seconds=0.005)
    assert point.batch == 8 and point.calls_per_s > 0 and point.samples_per_s == point.calls_per_s * 8
    assert len(calls) >= bench_gpu.WARMUP_CALLS * (bench_gpu.REPEATS + 1)
    window = bench_gpu.summarise(4, [0.01, 0.01, 0.03])
    assert window.p50_ms == pytest.approx(10) and window.calls_per_s == pytest.approx(60)


class Binding:
    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.inputs: list[np.ndarray] = []

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs.append(array)
        self.log.append(("in", name, array.shape))

    def bind_output(self, name: str, device: str, device_id: int) -> None:
        self.log.append(("out", name, device, device_id))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        self.log.append(("copy",))
        return []


class Session:
    def __init__(self) -> None:
        self.log: list[Any] = []
        self.bindings: list[Binding] = []

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.log.append(("run", feed["input"].shape))
        return []

    def io_binding(self) -> Binding:
        self.bindings.append(Binding(self.log))
        return self.bindings[-1]

    def run_with_iobinding(self, binding: Binding) -> None:
        self.log.append(("run_with_iobinding",))


def test_host_and_iobinding_calls() -> None:
    session = Session()
    bench_gpu.make_call(session, "host", 2)()
    bench_gpu.make_call(session, "iobinding", 2)()
    assert session.log == [
        ("run", (2, 3, 224, 224)),
        ("in", "input", (2, 3, 224, 224)),
        ("out", "output", "cuda", 0),
        ("run_with_iobinding",),
        ("copy",),
    ]


class FakePinnedHost:
    """Hands out one recognisable array (filled with -1) in place of page-locked memory, or None when refusing."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.asked: list[tuple[tuple[int, ...], np.dtype[Any]]] = []
        self.given: np.ndarray | None = None

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        self.asked.append((shape, dtype))
        if self.refuse:
            return None
        self.given = np.full(shape, -1.0, dtype)
        return self.given


def test_pinned_call_binds_the_pinned_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.backends import pinned

    host = FakePinnedHost()
    monkeypatch.setattr(pinned.PinnedHost, "shared", classmethod(lambda cls: host))
    session = Session()
    call = bench_gpu.make_call(session, "pinned", 2)
    call()
    call()
    assert host.asked == [((2, 3, 224, 224), np.dtype(np.float32))]  # staged once, not per call
    assert host.given is not None and len(session.bindings) == 2
    assert all(len(binding.inputs) == 1 and binding.inputs[0] is host.given for binding in session.bindings)
    expected = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    np.testing.assert_array_equal(host.given, expected)  # the random input was copied in (no -1 left)
    assert session.log[:4] == [
        ("in", "input", (2, 3, 224, 224)),
        ("out", "output", "cuda", 0),
        ("run_with_iobinding",),
        ("copy",),
    ]


def test_pinned_call_fails_clearly_without_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.backends import pinned

    monkeypatch.setattr(pinned.PinnedHost, "shared", classmethod(lambda cls: None))
    with pytest.raises(RuntimeError, match="pin host memory"):
        bench_gpu.make_call(Session(), "pinned", 1)
    monkeypatch.setattr(pinned.PinnedHost, "shared", classmethod(lambda cls: FakePinnedHost(refuse=True)))
    with pytest.raises(RuntimeError, match="cudaHostAlloc refused"):
        bench_gpu.make_call(Session(), "pinned", 1)


def test_missing_perf_analyzer_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERF_ANALYZER", str(tmp_path / "nope"))
    assert "no perf_analyzer at" in str(bench_gpu.perf_analyzer_works())


METRICS = """# HELP optiserve_gpu_utilization_ratio GPU busy fraction.
optiserve_gpu_utilization_ratio{gpu="0"} 0.5
optiserve_gpu_memory_used_bytes{gpu="0"} 1.0e+09
optiserve_model_state{model="m",version="1",state="READY"} 1.0
"""


def test_gpu_metrics_are_parsed_and_summarised() -> None:
    sample = bench_gpu.gpu_metrics(METRICS)
    assert sample == {
        'optiserve_gpu_utilization_ratio{gpu="0"}': 0.5,
        'optiserve_gpu_memory_used_bytes{gpu="0"}': 1e9,
    }
    busy = {'optiserve_gpu_utilization_ratio{gpu="0"}': 0.9}
    summary = bench_gpu.summarise_samples([sample, busy])
    assert summary['optiserve_gpu_utilization_ratio{gpu="0"}'] == {"mean": pytest.approx(0.7), "max": 0.9}


PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_table() -> None:
    results = {
        "machine": {"date": "2026-12-01 10:00 UTC"},
        "gpu": "NVIDIA H200",
        "ceiling": [
            {"mode": "host", "batch": 1, "samples_per_s": 437.2, "p50_ms": 2.2},
            {"mode": "host", "batch": 64, "error": "RuntimeError: out of memory"},
            {"mode": "device", "batch": 64, "samples_per_s": 6597.0, "p50_ms": 9.7},
        ],
        "server": [
            {
                "variant": "graphs",
                "protocol": "grpc",
                "concurrency": 16,
                "client": "perf_analyzer",
                "infer_per_s": 3900.4,
                "latency_ms": {"p50": 4.1, "p99": 6.0},
                "gpu_metrics": {'optiserve_gpu_utilization_ratio{gpu="0"}': {"mean": 0.83, "max": 0.9}},
                "stats_delta": {"batch_sizes": {"16": 10}},
                "error": None,
            },
            {"protocol": "http", "concurrency": 64, "client": "perf_analyzer", "error": "exit 1: a | b"},
        ],
        "server_ready_s": 41.04,
        "instances": {
            "plain": [{"index": 0, "device": "gpu:0", "providers": PROVIDERS, "pinned_host_buffers": False}],
            "graphs": [
                {
                    "index": 0,
                    "device": "gpu:0",
                    "providers": PROVIDERS,
                    "pinned_host_buffers": True,
                    "cuda_graphs": True,
                    "cuda_graph_batch_sizes": [1, 2, 4],
                },
                {
                    "index": 1,
                    "device": "gpu:1",
                    "providers": PROVIDERS,
                    "pinned_host_buffers": True,
                    "cuda_graphs": False,
                    "cuda_graphs_off": "capture failed:\n  out of memory",
                },
            ],
        },
    }
    text = bench_gpu.render(results)
    assert "| ORT CUDA, host arrays (session.run) | 437 | failed |" in text
    assert "| ORT CUDA, IO binding from pinned host memory (the server's batched path) | — | — |" in text
    assert "| ORT CUDA, IO binding, data on the GPU | — | 6,597 |" in text
    assert "| graphs grpc c=16 | perf_analyzer | 3,900 | 4.10 | 6.00 | gpu0 83% | avg 16.0: b16:10 |" in text
    assert "| plain http c=64 | perf_analyzer | failed: exit 1: a / b |" in text  # a run without a variant: plain
    assert text.endswith(
        "server ready after 41.0 s (all variants)\n"
        "instances (plain): #0 gpu:0 CUDAExecutionProvider>CPUExecutionProvider\n"
        "instances (graphs): #0 gpu:0 CUDAExecutionProvider>CPUExecutionProvider pinned graphs 1,2,4; "
        "#1 gpu:1 CUDAExecutionProvider>CPUExecutionProvider pinned no graphs: capture failed: out of memory"
    )


def test_table_of_an_older_result_reads_its_instances_as_plain() -> None:
    instances = [{"index": 0, "device": "gpu:0", "providers": PROVIDERS}]
    text = bench_gpu.render({"machine": {}, "instances": instances})
    assert text.endswith("\ninstances (plain): #0 gpu:0 CUDAExecutionProvider>CPUExecutionProvider")
    assert "graphs" not in text and "pinned" not in text


class Answer:
    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.body = json.dumps(rows).encode()

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> bytes:
        return self.body


def test_wait_loaded_fails_fast_on_a_load_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(
        [
            [{"name": "resnet50", "version": "", "state": "UNAVAILABLE", "reason": "not loaded"}],
            [{"name": "resnet50", "version": "1", "state": "LOADING", "reason": "optimize"}],
            [{"name": "resnet50", "version": "1", "state": "UNAVAILABLE", "reason": "KIND_GPU, but no GPU"}],
        ]
    )
    monkeypatch.setattr(bench_gpu.urllib.request, "urlopen", lambda *a, **k: Answer(next(answers)))
    monkeypatch.setattr(bench_gpu.time, "sleep", lambda _s: None)
    with pytest.raises(RuntimeError, match="resnet50 failed to load: KIND_GPU, but no GPU"):
        bench_gpu.wait_loaded("127.0.0.1:1", "resnet50", 60, lambda: None)
    ready = [{"name": "resnet50", "version": "1", "state": "READY", "reason": ""}]
    monkeypatch.setattr(bench_gpu.urllib.request, "urlopen", lambda *a, **k: Answer(ready))
    assert bench_gpu.wait_loaded("127.0.0.1:1", "resnet50", 60, lambda: None) >= 0
    assert bench_gpu.model_state(ready, "other") == ("", "")
