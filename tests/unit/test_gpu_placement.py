"""GPU serving without a GPU: instance placement (Triton's count-per-listed-GPU), the GPU count, CUDA and
TensorRT provider options (profiles, cache folders, merging with the optimizer's), the fallback warning, IO
binding, and the per-instance report. onnxruntime's providers and sessions are faked."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from optimizers import SessionSpec
from optimizers.providers import CPU, CUDA, OPENVINO, TENSORRT
from server.backends import gpu
from server.backends import onnxruntime as ort_backend
from server.backends.onnxruntime import OnnxRuntimeBackend, SessionConfig, warn_on_fallback
from server.errors import LoadFailed
from server.models.loader import VersionLoader
from server.models.placement import apply_session_spec, instance_plan, instance_report
from server.repository.config import parse_config
from server.repository.layout import Repository
from server.settings import Settings
from tests.models import fixtures

TRT = TENSORRT
ALL_GPU = [TRT, CUDA, CPU]
KIND_CPU, KIND_GPU, KIND_AUTO = (
    mc.ModelInstanceGroup.KIND_CPU,
    mc.ModelInstanceGroup.KIND_GPU,
    mc.ModelInstanceGroup.KIND_AUTO,
)


@pytest.fixture
def providers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend onnxruntime-gpu with TensorRT is installed; tests may shrink the list in place."""
    installed = list(ALL_GPU)
    monkeypatch.setattr(ort_backend, "available_providers", lambda: list(installed))
    return installed


def visible(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(gpu, "visible_gpu_count", lambda environ=None: count)


def config_with(*groups: tuple[Any, int, list[int]]) -> Any:
    config = mc.ModelConfig(name="m")
    for kind, count, gpus in groups:
        config.instance_group.add(kind=kind, count=count, gpus=gpus)
    return config


# ---- the GPU count ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", 0), ("-1", 0), ("0", 1), ("0,1", 2), (" 1 , 3 ", 2), ("0,1,-1,2", 2), ("GPU-ab12,MIG-cd", 2)],
)
def test_cuda_visible_devices_entries(value: str | None, expected: int | None) -> None:
    assert gpu.visible_devices_entries(value) == expected


class FakeNvml(types.ModuleType):
    """The part of pynvml the server uses; ``fail_init`` plays a machine without a driver."""

    def __init__(self, count: int = 4, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.count, self.fail_init, self.shutdowns = count, fail_init, 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count


def test_gpu_count_from_nvml_capped_by_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(count=4)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.visible_gpu_count({}) == 4
    assert gpu.visible_gpu_count({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert gpu.visible_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert nvml.shutdowns == 3


def test_gpu_count_without_nvml(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert gpu.visible_gpu_count({"CUDA_VISIBLE_DEVICES": "0,2,3"}) == 3
    assert gpu.visible_gpu_count({}) == 1  # the CUDA provider is there: assume one GPU
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))  # installed, but no driver
    assert gpu.visible_gpu_count({}) == 1
    providers.remove(CUDA)
    assert gpu.visible_gpu_count({}) == 0


# ---- placement ------------------------------------------------------------------------------------------------
def test_count_instances_on_each_listed_gpu(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    visible(monkeypatch, 4)
    plan = instance_plan(config_with((KIND_GPU, 2, [0, 2])), Settings())
    assert [p.device_id for p in plan] == [0, 2, 0, 2]
    assert all(p.providers == (TRT, CUDA, CPU) for p in plan)


def test_no_gpus_listed_means_every_visible_gpu(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    visible(monkeypatch, 3)
    assert [p.device_id for p in instance_plan(config_with((KIND_GPU, 1, [])), Settings())] == [0, 1, 2]
    assert [p.device_id for p in instance_plan(config_with((KIND_AUTO, 2, [])), Settings())] == [0, 1, 2] * 2


def test_gpu_placement_errors_name_the_field(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    visible(monkeypatch, 2)
    expected = r"instance_group\[1\]\.gpus: GPU 2, 5 is not visible.*2 GPU\(s\), numbered 0..1"
    with pytest.raises(LoadFailed, match=expected):
        instance_plan(config_with((KIND_CPU, 1, []), (KIND_GPU, 1, [0, 5, 2])), Settings())
    visible(monkeypatch, 0)
    with pytest.raises(LoadFailed, match=r"instance_group\[0\] kind KIND_GPU: no GPU is visible"):
        instance_plan(config_with((KIND_GPU, 1, [])), Settings())


def test_kind_auto_without_a_visible_gpu_runs_on_cpu(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    visible(monkeypatch, 0)
    plan = instance_plan(config_with((KIND_AUTO, 2, [])), Settings())
    assert [(p.device_id, p.providers) for p in plan] == [(None, (CPU,))] * 2


def test_kind_gpu_without_gpu_provider_fails(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    providers[:] = [CPU]
    visible(monkeypatch, 8)  # a GPU without onnxruntime-gpu is no use
    with pytest.raises(LoadFailed, match="KIND_GPU, but no GPU execution provider"):
        instance_plan(config_with((KIND_GPU, 1, [])), Settings())
    assert instance_plan(config_with((KIND_AUTO, 1, [])), Settings())[0].device_id is None


def test_cpu_and_gpu_groups_split_threads_over_cpu_instances_only(
    monkeypatch: pytest.MonkeyPatch, providers: list[str]
) -> None:
    visible(monkeypatch, 2)
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 8)
    plan = instance_plan(config_with((KIND_CPU, 2, []), (KIND_GPU, 1, [])), Settings())
    assert [(p.device_id, p.providers, p.intra_op_threads) for p in plan] == [
        (None, (CPU,), 4),
        (None, (CPU,), 4),
        (0, (TRT, CUDA, CPU), 4),
        (1, (TRT, CUDA, CPU), 4),
    ]


def test_requested_providers_are_honoured(monkeypatch: pytest.MonkeyPatch, providers: list[str]) -> None:
    visible(monkeypatch, 1)
    plan = instance_plan(config_with((KIND_GPU, 1, [])), Settings(execution_providers=[CUDA]))
    assert plan[0].providers == (CUDA, CPU)


# ---- provider options -----------------------------------------------------------------------------------------
BATCHED = """
name: "cnn"
max_batch_size: 16
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }, { name: "y" data_type: TYPE_FP32 dims: [ 5 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] }
"""


def _gpu_session(device: int, providers: tuple[str, ...] = (TRT, CUDA, CPU), **extra: Any) -> SessionConfig:
    return SessionConfig(providers=providers, device_id=device, **extra)


def test_cuda_and_tensorrt_options_per_device(tmp_path: Path) -> None:
    settings = Settings(
        cache_dir=tmp_path / "cache", cudnn_conv_algo_search="EXHAUSTIVE", tensorrt_workspace_bytes=2**30
    )
    config = parse_config(BATCHED, "pbtxt").config
    plan = [SessionConfig(), _gpu_session(0), _gpu_session(1)]
    cpu, first, second = gpu.with_gpu_options(plan, config, settings, fp16=False)
    assert cpu == SessionConfig()
    assert second.provider_options[CUDA] == {
        "device_id": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "True",
    }
    trt = second.provider_options[TRT]
    root = tmp_path / "cache" / "tensorrt"
    assert trt == {
        "device_id": "1",
        "trt_max_workspace_size": str(2**30),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(root / "engines"),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(root / "timing"),
        "trt_fp16_enable": "False",
        "trt_profile_min_shapes": "x:1x3x32x32,y:1x5",
        "trt_profile_opt_shapes": "x:8x3x32x32,y:8x5",  # the largest preferred batch size
        "trt_profile_max_shapes": "x:16x3x32x32,y:16x5",
    }
    assert first.provider_options[TRT]["device_id"] == "0"
    assert (root / "engines").is_dir() and (root / "timing").is_dir()
    assert CPU not in second.provider_options


def test_defaults_and_fp16_flag(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    assert settings.cudnn_conv_algo_search == "HEURISTIC" and settings.tensorrt_workspace_bytes == 4 * 2**30
    config = parse_config(BATCHED, "pbtxt").config
    (session,) = gpu.with_gpu_options([_gpu_session(0)], config, settings, fp16=True)
    assert session.provider_options[TRT]["trt_fp16_enable"] == "True"
    assert session.provider_options[CUDA]["cudnn_conv_algo_search"] == "HEURISTIC"


def test_cuda_only_instances_get_no_tensorrt_options_or_folders(tmp_path: Path) -> None:
    config = parse_config(BATCHED, "pbtxt").config
    (session,) = gpu.with_gpu_options([_gpu_session(0, (CUDA, CPU))], config, Settings(cache_dir=tmp_path), fp16=False)
    assert set(session.provider_options) == {CUDA}
    assert not (tmp_path / "tensorrt").exists()


def test_profile_opt_is_max_batch_size_without_preferred_sizes() -> None:
    config = parse_config('max_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]', "pbtxt").config
    assert gpu.tensorrt_profile(config) == ("x:1x4", "x:8x4", "x:8x4")


def test_profile_uses_reshape_and_skips_string_inputs() -> None:
    text = """
    max_batch_size: 2
    input [ { name: "img" data_type: TYPE_FP32 dims: [ 12 ] reshape { shape: [ 3, 4 ] } },
            { name: "tag" data_type: TYPE_STRING dims: [ 1 ] } ]
    """
    assert gpu.tensorrt_profile(parse_config(text, "pbtxt").config) == ("img:1x3x4", "img:2x3x4", "img:2x3x4")


def test_no_profile_for_fixed_shapes_or_dynamic_dims(caplog: pytest.LogCaptureFixture) -> None:
    fixed = parse_config('max_batch_size: 0\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]', "pbtxt")
    with caplog.at_level(logging.WARNING, "optiserve.gpu"):
        assert gpu.tensorrt_profile(fixed.config) is None
    assert not caplog.records
    text = 'name: "seq" max_batch_size: 4\ninput [ { name: "tokens" data_type: TYPE_FP32 dims: [ -1 ] } ]'
    with caplog.at_level(logging.WARNING, "optiserve.gpu"):
        assert gpu.tensorrt_profile(parse_config(text, "pbtxt").config) is None
    assert "model 'seq': no TensorRT optimization profile, input(s) tokens" in caplog.text


def test_optimizer_options_win_except_device_id(tmp_path: Path) -> None:
    chosen = {
        TRT: {"trt_fp16_enable": "True", "trt_profile_opt_shapes": "x:4x3x32x32,y:4x5", "device_id": "0"},
        "OpenVINOExecutionProvider": {"device_type": "CPU"},
    }
    config = parse_config(BATCHED, "pbtxt").config
    (session,) = gpu.with_gpu_options(
        [_gpu_session(1, provider_options=chosen)], config, Settings(cache_dir=tmp_path), fp16=False
    )
    trt = session.provider_options[TRT]
    assert trt["trt_fp16_enable"] == "True" and trt["trt_profile_opt_shapes"] == "x:4x3x32x32,y:4x5"
    assert trt["device_id"] == "1"  # the placement, not the optimizer's default device
    assert trt["trt_profile_max_shapes"] == "x:16x3x32x32,y:16x5"  # filled in where the optimizer said nothing
    assert session.provider_options["OpenVINOExecutionProvider"] == {"device_type": "CPU"}  # kept as given
    assert session.provider_options[CUDA]["device_id"] == "1"


def test_optimizer_providers_go_to_instances_of_their_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 4)
    plan = [SessionConfig(), _gpu_session(0)]
    gpu_choice = SessionSpec(providers=(CUDA, CPU), provider_options={CUDA: {"cudnn_conv_algo_search": "DEFAULT"}})
    cpu, placed = apply_session_spec(plan, gpu_choice)
    assert cpu.providers == (CPU,) and placed.providers == (CUDA, CPU) and placed.device_id == 0
    assert placed.provider_options == {CUDA: {"cudnn_conv_algo_search": "DEFAULT"}}
    cpu_choice = SessionSpec(providers=(OPENVINO, CPU), intra_op_threads=2)
    cpu, placed = apply_session_spec(plan, cpu_choice)
    assert cpu.providers == (OPENVINO, CPU) and cpu.intra_op_threads == 2
    assert placed.providers == (TRT, CUDA, CPU)


def test_optimizer_threads_are_capped_and_yield_to_the_models_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 4)
    plan = [SessionConfig(intra_op_threads=2), SessionConfig(intra_op_threads=2)]
    assert apply_session_spec(plan, SessionSpec()) is plan  # nothing chosen: the plan as it was
    assert [s.intra_op_threads for s in apply_session_spec(plan, SessionSpec(intra_op_threads=8))] == [2, 2]
    assert [s.intra_op_threads for s in apply_session_spec(plan, SessionSpec(intra_op_threads=1))] == [1, 1]
    assert apply_session_spec(plan, SessionSpec(intra_op_threads=1), keep_threads=True) is plan


# ---- sessions: fallback warning, IO binding ---------------------------------------------------------------------
class Value:
    def __init__(self, name: str, type_: str = "tensor(float)") -> None:
        self.name, self.type = name, type_


class FakeBinding:
    """Records the IO-binding calls in order."""

    def __init__(self, calls: list[tuple[Any, ...]], outputs: list[np.ndarray]) -> None:
        self.calls, self.outputs = calls, outputs

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.calls.append(("bind_cpu_input", name, array.flags.c_contiguous))

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.calls.append(("bind_output", name, device_type, device_id))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        self.calls.append(("copy_outputs_to_cpu",))
        return self.outputs


class FakeSession:
    """An InferenceSession that got ``actual`` providers (with ``device`` as the GPU provider's device_id)."""

    instances: list[FakeSession] = []

    def __init__(self, path: str, options: Any = None, providers: Any = None) -> None:
        self.asked = providers
        self.actual = [name for name, _ in providers]
        self.device = next((opts.get("device_id") for _, opts in providers if "device_id" in opts), "0")
        self.calls: list[tuple[Any, ...]] = []
        self.outputs = [Value("y"), Value("labels", "tensor(string)")]
        FakeSession.instances.append(self)

    def get_inputs(self) -> list[Value]:
        return [Value("x")]

    def get_outputs(self) -> list[Value]:
        return self.outputs

    def get_providers(self) -> list[str]:
        return list(self.actual)

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {p: ({"device_id": str(self.device)} if p in (TRT, CUDA) else {}) for p in self.actual}

    def io_binding(self) -> FakeBinding:
        self.calls.append(("io_binding",))
        x = np.ones((2, 3), np.float32)
        return FakeBinding(self.calls, [x * 2, np.array([["a"], ["b"]], dtype=object)])

    def run_with_iobinding(self, binding: FakeBinding, run_options: Any = None) -> None:
        assert run_options is None  # no CUDA graphs asked for: onnxruntime's default run options
        self.calls.append(("run_with_iobinding",))

    def run(self, names: Any, feed: dict[str, np.ndarray], run_options: Any = None) -> list[Any]:
        self.calls.append(("run", sorted(feed)))
        return [feed["x"] * 2, np.array([["a"], ["b"]], dtype=object)]


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Sessions are FakeSessions; returns the log of onnxruntime.preload_dlls() calls."""
    preloads: list[str] = []
    FakeSession.instances = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: preloads.append("called"), raising=False)
    monkeypatch.setattr(ort_backend, "_preloaded", False)
    monkeypatch.setattr(ort_backend.PinnedHost, "shared", classmethod(lambda cls: None))  # as on a GPU-less machine
    return preloads


def _session(actual: list[str], device: int = 0) -> Any:
    session = FakeSession("m.onnx", providers=[(p, {}) for p in actual])
    session.device = device
    return session


def test_fallback_is_logged_never_silent(caplog: pytest.LogCaptureFixture) -> None:
    asked = _gpu_session(1)
    with caplog.at_level(logging.WARNING, "optiserve.backends"):
        message = warn_on_fallback("m:1#0", asked, _session([CUDA, CPU], device=1))
    assert message is not None and "could not use TensorrtExecutionProvider" in message
    assert "running on CUDAExecutionProvider, CPUExecutionProvider" in caplog.text
    message = warn_on_fallback("m:1#0", asked, _session([CPU]))
    assert message is not None and "could not use TensorrtExecutionProvider, CUDAExecutionProvider" in message


def test_gpu_on_the_wrong_device_is_logged() -> None:
    message = warn_on_fallback("m:1#0", _gpu_session(1, (CUDA, CPU)), _session([CUDA, CPU], device=0))
    assert message is not None and "runs on GPU 0, not on GPU 1" in message
    assert warn_on_fallback("m:1#0", _gpu_session(1, (CUDA, CPU)), _session([CUDA, CPU], device=1)) is None
    assert warn_on_fallback("m:1#0", SessionConfig(), _session([CPU])) is None


def test_gpu_instance_runs_through_io_binding(fake_ort: list[str]) -> None:
    backend = OnnxRuntimeBackend("m:1#0", Path("m.onnx"), _gpu_session(1, (CUDA, CPU)))
    backend.load()
    assert backend.providers == [CUDA, CPU] and backend.device == "gpu:1" and fake_ort == ["called"]
    x = np.asfortranarray(np.ones((2, 3), np.float32))
    out = backend.infer({"x": x})
    session = FakeSession.instances[-1]
    assert session.calls == [
        ("io_binding",),
        ("bind_cpu_input", "x", True),  # handed over C-contiguous
        ("bind_output", "y", "cuda", 1),
        ("bind_output", "labels", "cpu", 0),  # strings cannot live on a GPU
        ("run_with_iobinding",),
        ("copy_outputs_to_cpu",),
    ]
    assert np.array_equal(out["y"], x * 2) and out["labels"].tolist() == [[b"a"], [b"b"]]
    assert instance_report([backend]) == [
        {
            "index": 0,
            "device": "gpu:1",
            "providers": [CUDA, CPU],
            "engine": "cuda",
            "nodes": {},
            "pinned_host_buffers": False,
            "cuda_graphs": False,
        }
    ]


def test_cpu_instance_and_cpu_fallback_use_session_run(
    fake_ort: list[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = OnnxRuntimeBackend("m:1#0", Path("m.onnx"), SessionConfig())
    cpu.load()
    cpu.infer({"x": np.ones((2, 3), np.float32)})
    assert FakeSession.instances[-1].calls == [("run", ["x"])] and cpu.device == "cpu" and fake_ort == []

    class NoCuda(FakeSession):
        def get_providers(self) -> list[str]:
            return [CPU]

    monkeypatch.setattr(onnxruntime, "InferenceSession", NoCuda)
    fallen = OnnxRuntimeBackend("m:1#1", Path("m.onnx"), _gpu_session(0, (CUDA, CPU)))
    with caplog.at_level(logging.WARNING, "optiserve.backends"):
        fallen.load()
    fallen.infer({"x": np.ones((2, 3), np.float32)})
    assert FakeSession.instances[-1].calls == [("run", ["x"])]
    assert fallen.device == "cpu" and "m:1#1: onnxruntime could not use CUDAExecutionProvider" in caplog.text


# ---- the loader end to end: the report lists every instance --------------------------------------------------
GPU_CONFIG = """
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 8 ] } ]
dynamic_batching { }
instance_group [ { kind: KIND_GPU count: 1 gpus: [ 1, 0 ] } ]
"""


def _build(tmp_path: Path, config: str, settings: Settings) -> Any:
    fixtures.write_model(tmp_path / "repo", "m", fixtures.float_mlp(), config=config)
    loader = VersionLoader(Repository(tmp_path / "repo"), settings, None)
    loaded = parse_config(config, "pbtxt")
    return loader.build("m", 1, loaded, lambda _message: None)


def test_loader_places_gpu_instances_and_reports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, providers: list[str], fake_ort: list[str]
) -> None:
    visible(monkeypatch, 2)
    settings = Settings(cache_dir=tmp_path / "cache", default_precision="none")
    version = _build(tmp_path, GPU_CONFIG, settings)
    try:
        asked = [dict(s.asked) for s in FakeSession.instances]
        assert [a[CUDA]["device_id"] for a in asked] == ["1", "0"]
        assert asked[0][TRT]["trt_profile_max_shapes"] == "x:8x8"
        gpu_entry = {
            "providers": [TRT, CUDA, CPU],
            "engine": "tensorrt",
            "nodes": {},
            "pinned_host_buffers": False,
            "cuda_graphs": False,
        }
        assert version.report["instances"] == [
            {"index": 0, "device": "gpu:1", **gpu_entry},  # the CUDA runtime cannot pin memory here
            {"index": 1, "device": "gpu:0", **gpu_entry},
        ]
        assert version.report["selected"] == "original"
    finally:
        version.batcher.close(1)


def test_loader_reports_cpu_instances(tmp_path: Path) -> None:
    config = "max_batch_size: 8\ninstance_group [ { kind: KIND_CPU count: 2 } ]"
    version = _build(tmp_path, config, Settings(cache_dir=tmp_path / "cache", default_precision="none"))
    try:
        assert version.report["instances"] == [
            {
                "index": i,
                "device": "cpu",
                "providers": ["CPUExecutionProvider"],
                "engine": "onnxruntime",  # what really computes: every node on onnxruntime's CPU kernels
                "nodes": {"CPUExecutionProvider": 3},
            }
            for i in range(2)
        ]
        out = version.backends[0].infer({"x": np.ones((1, 8), np.float32)})
        assert out["y"].shape == (1, 4)
    finally:
        version.batcher.close(1)


def test_unwritable_tensorrt_cache_fails_the_load_clearly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    config = parse_config(BATCHED, "pbtxt").config
    with pytest.raises(LoadFailed, match=r"cannot create the TensorRT cache folder .*check --cache-dir"):
        gpu.with_gpu_options([_gpu_session(0)], config, Settings(cache_dir=tmp_path / "file"), fp16=False)


def test_no_profile_warning_when_the_optimizer_gave_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = 'name: "seq" max_batch_size: 4\ninput [ { name: "tokens" data_type: TYPE_FP32 dims: [ -1 ] } ]'
    chosen = {TRT: {f"trt_profile_{k}_shapes": f"tokens:{b}x7" for k, b in (("min", 1), ("opt", 2), ("max", 4))}}
    with caplog.at_level(logging.WARNING, "optiserve.gpu"):
        (session,) = gpu.with_gpu_options(
            [_gpu_session(0, provider_options=chosen)],
            parse_config(text, "pbtxt").config,
            Settings(cache_dir=tmp_path),
            fp16=False,
        )
    assert not caplog.records and session.provider_options[TRT]["trt_profile_max_shapes"] == "tokens:4x7"


def test_default_instance_group_follows_the_gpus() -> None:
    """Like Triton's auto-complete: no instance_group means one instance per GPU when GPUs are visible."""
    from server.repository.config import LoadedConfig, ModelConfig, complete_config
    from tests.models import fixtures

    cpu = complete_config(LoadedConfig(ModelConfig(), set()), "m", fixtures.float_mlp(), 8)
    gpu_config = complete_config(LoadedConfig(ModelConfig(), set()), "m", fixtures.float_mlp(), 8, gpus_visible=True)
    assert [g.kind for g in cpu.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu_config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def _build_tuned(tmp_path: Path, config: str, settings: Settings, rates: dict[tuple[int, int], float]) -> Any:
    """``_build`` with the optimizer running (precision fp32) on injected timings: splits at ``rates``."""
    from optimizers import Pipeline
    from tests.unit.optimizers.conftest import FakeBenchmark, FakeThroughput, fake_device

    fixtures.write_model(tmp_path / "repo", "m", fixtures.float_mlp(), config=config)
    loader = VersionLoader(Repository(tmp_path / "repo"), settings, None)
    timer = FakeThroughput(rates)
    device = fake_device(cores=2)
    loader._pipeline = Pipeline(tmp_path / "opt", device=device, benchmark=FakeBenchmark(), throughput=timer)
    version = loader.build("m", 1, parse_config(config, "pbtxt"), lambda _message: None)
    return version, timer


FASTER_IN_TWO = {(1, 2): 100.0, (2, 1): 190.0}


def test_loader_serves_the_optimizers_instance_count_when_the_config_leaves_it_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 2)
    settings = Settings(cache_dir=tmp_path / "cache", default_precision="fp32", optimize_mode="before_ready")
    version, timer = _build_tuned(tmp_path, "max_batch_size: 8", settings, FASTER_IN_TWO)
    try:
        assert timer.calls  # the compile step timed the splits
        assert version.report["session_options"] == {"intra_op_threads": 1, "instances": 2}
        assert len(version.backends) == 2
        assert [b.config.intra_op_threads for b in version.backends] == [1, 1]
    finally:
        version.batcher.close(1)


@pytest.mark.parametrize(
    ("config", "intra_op_threads"),
    [
        ("max_batch_size: 8\ninstance_group [ { kind: KIND_CPU count: 1 } ]", 0),
        ('max_batch_size: 8\nparameters { key: "intra_op_thread_count" value: { string_value: "2" } }', 0),
        ("max_batch_size: 8", 2),  # --intra-op-threads
    ],
)
def test_an_explicit_count_or_thread_setting_keeps_the_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, intra_op_threads: int
) -> None:
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 2)
    settings = Settings(
        cache_dir=tmp_path / "cache",
        default_precision="fp32",
        optimize_mode="before_ready",
        intra_op_threads=intra_op_threads,
    )
    version, timer = _build_tuned(tmp_path, config, settings, FASTER_IN_TWO)
    try:
        assert timer.calls == []  # nothing to choose: no split is timed
        assert len(version.backends) == 1 and "instances" not in version.report["session_options"]
    finally:
        version.batcher.close(1)


def test_instance_plan_takes_the_optimizers_count_for_one_cpu_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 4)
    config = parse_config("max_batch_size: 8\ninstance_group [ { kind: KIND_CPU } ]", "pbtxt").config
    plan = instance_plan(config, Settings(), instances=2)
    assert [s.intra_op_threads for s in plan] == [2, 2]
    assert len(instance_plan(config, Settings())) == 1
