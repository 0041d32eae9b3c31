"""The pipeline end to end: precision families, never-slower selection, compile, GPU plans, progress, logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from optimizers import OptimizeError, OptimizeOptions, Pipeline
from optimizers.passes import compile as compiling
from optimizers.providers import CPU, CUDA, TENSORRT
from optimizers.runtime import SessionSpec
from tests.models import fixtures
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import GPU_PROVIDERS, FakeBenchmark, FakeThroughput, fake_device

LOSSY = ("int8_dynamic", "int8_static", "fp16", "prune")


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    return models.save(models.trained_digits().model, tmp_path / "digits")


def _run(tmp_path: Path, model: Path, options: OptimizeOptions, latencies: dict[str, float], **device: Any) -> Any:
    bench = FakeBenchmark(latencies)
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(**device), benchmark=bench)
    return pipeline.run(model, options), bench


def _steps(result: Any) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in result.report["steps"]}


def test_auto_selects_the_measured_fastest(tmp_path: Path, digits: Path) -> None:
    latencies = {"original": 10.0, "graph_opt": 9.0, "int8_dynamic": 4.0, "int8_static": 5.0}
    result, bench = _run(tmp_path, digits, OptimizeOptions(), latencies)
    steps = _steps(result)
    assert result.report["selected"] == "int8_dynamic" and steps["int8_dynamic"]["status"] == "applied"
    assert steps["graph_opt"]["status"] == steps["int8_static"]["status"] == "rejected"
    assert steps["fp16"]["status"] == steps["prune"]["status"] == "skipped"
    assert steps["int8_dynamic"]["latency_ms"] == {"before": 80.0, "after": 32.0}  # at preferred batch 8
    assert onnx.load(str(result.model_path)).graph.node  # a real artifact
    assert bench.labels[0] == "original"
    assert result.family == "int8" and result.summary.selected == "int8_dynamic"


def test_never_slower_than_the_original(tmp_path: Path, digits: Path) -> None:
    latencies = {"original": 10.0, "graph_opt": 10.2, "int8_dynamic": 11.0, "int8_static": 30.0}
    result, _ = _run(tmp_path, digits, OptimizeOptions(), latencies)
    assert result.report["selected"] == "original" and result.model_path == digits
    assert all(step["status"] != "applied" for step in result.report["steps"])
    assert result.session == SessionSpec() and result.family == "fp32"


def test_precision_fp32_applies_no_lossy_step(tmp_path: Path, digits: Path) -> None:
    latencies = {"original": 10.0, "graph_opt": 8.0, "int8_dynamic": 1.0}
    options = OptimizeOptions(precision="fp32", prune={"sparsity": 0.5})
    result, bench = _run(tmp_path, digits, options, latencies)
    steps = _steps(result)
    for name in LOSSY:
        assert steps[name]["status"] == "skipped", name
    assert "precision fp32" in steps["int8_dynamic"]["reason"] and "precision fp32" in steps["prune"]["reason"]
    assert result.report["selected"] == "graph_opt"
    assert not any(label in bench.labels for label in LOSSY)


def test_precision_int8_keeps_only_int8(tmp_path: Path, digits: Path) -> None:
    latencies = {"original": 10.0, "graph_opt": 1.0, "int8_dynamic": 6.0, "int8_static": 7.0}
    result, _ = _run(tmp_path, digits, OptimizeOptions(precision="int8"), latencies)
    steps = _steps(result)
    assert steps["graph_opt"]["status"] == "skipped" and "keeps only int8" in steps["graph_opt"]["reason"]
    assert result.report["selected"] == "int8_dynamic"


def test_precision_none_disables_everything(tmp_path: Path, digits: Path) -> None:
    result, bench = _run(tmp_path, digits, OptimizeOptions(precision="none"), {})
    assert result.model_path == digits and result.session == SessionSpec() and bench.calls == []
    assert {s["status"] for s in result.report["steps"]} == {"skipped"}
    assert not (tmp_path / "cache" / "results").exists() or not any((tmp_path / "cache" / "results").iterdir())


def test_compile_picks_a_faster_thread_count(tmp_path: Path, digits: Path) -> None:
    latencies = {"original": 10.0, "compile:threads=1": 7.0, "compile:threads=2": 10.0}
    result, _ = _run(tmp_path, digits, OptimizeOptions(precision="fp32"), latencies, cores=2)
    compile_step = _steps(result)["compile"]
    assert compile_step["status"] == "applied" and compile_step["reason"].startswith("threads=1")
    assert result.session == SessionSpec(intra_op_threads=1)
    assert result.report["session_options"] == {"intra_op_threads": 1}


def test_gpu_target_without_a_gpu_is_a_clear_error(tmp_path: Path, digits: Path) -> None:
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark())
    with pytest.raises(OptimizeError, match="CUDAExecutionProvider is not available"):
        pipeline.run(digits, OptimizeOptions(target="cuda"))


def test_cuda_plan_builds_fp16_and_serves_with_cuda(tmp_path: Path, digits: Path) -> None:
    """A described GPU machine: the FP16 candidate is built and guarded (on CPU kernels here), timings are
    injected, and the plan names the CUDA provider."""
    latencies = {"original": 10.0, "fp16": 5.0, "graph_opt": 9.9}
    options = OptimizeOptions(target="cuda")
    result, bench = _run(tmp_path, digits, options, latencies, providers=(CUDA, CPU))
    steps = _steps(result)
    assert steps["fp16"]["status"] == "applied", steps["fp16"]
    assert steps["fp16"]["accuracy"]["rel_l2"] < 1e-2 and steps["fp16"]["thresholds"] == {"rel_l2": 1e-2}
    assert steps["int8_dynamic"]["status"] == "skipped"
    assert result.session == SessionSpec(providers=(CUDA, CPU)) and result.family == "fp16"
    assert result.report["session_options"] == {"providers": [CUDA, CPU]}
    assert all(call[2].providers == (CUDA, CPU) for call in bench.calls)


def test_tensorrt_plan_has_caches_under_the_cache_dir(tmp_path: Path) -> None:
    conv = models.save(models.conv_net(), tmp_path / "conv")
    latencies = {"original": 10.0, "int8_static": 4.0}
    options = OptimizeOptions(target="tensorrt", max_batch_size=16)
    result, _ = _run(tmp_path, conv, options, latencies, providers=GPU_PROVIDERS)
    assert result.report["selected"] == "int8_static"
    trt = result.session.provider_options[TENSORRT]
    assert result.session.providers == (TENSORRT, CUDA, CPU) and result.family == "int8"
    assert result.report["session_options"] == result.session.as_options()
    assert trt["trt_int8_enable"] == "True" and trt["trt_profile_max_shapes"] == "image:16x3x16x16"
    assert Path(trt["trt_engine_cache_path"]).is_relative_to(tmp_path / "cache")
    assert _steps(result)["compile"]["status"] == "applied"


def test_progress_and_logs(tmp_path: Path, digits: Path, caplog: pytest.LogCaptureFixture) -> None:
    messages: list[str] = []
    caplog.set_level(logging.INFO, logger="optiserve.optimizers")
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark({"original": 1.0}))
    pipeline.run(digits, OptimizeOptions(), progress=messages.append)
    assert messages[0] == "optimize: reference (random, 32 inputs)"
    assert "optimize: int8_dynamic" in messages and messages[-1] == "optimize: done, serving original"
    logged = [r.getMessage() for r in caplog.records if r.name == "optiserve.optimizers"]
    assert any(m.startswith("step int8_dynamic") for m in logged)
    assert any(m.startswith("step fp16 skipped in 0.00s") for m in logged)
    pipeline.run(digits, OptimizeOptions(), progress=messages.append)
    assert messages[-1] == "optimize: cache hit"


def test_real_timing_on_a_tiny_model(tmp_path: Path) -> None:
    """No injected timings: whatever gets selected was measured faster than the original."""
    model = models.save(fixtures.float_mlp(features=32, hidden=64), tmp_path / "mlp")
    pipeline = Pipeline(tmp_path / "cache", device=fake_device())
    result = pipeline.run(model, OptimizeOptions(time_budget_s=0.05))
    for step in result.report["steps"]:
        if step["status"] == "applied" and step["name"] != "compile":
            assert step["latency_ms"]["after"] < step["latency_ms"]["before"]
    assert result.report["timing"] == {"preferred_batch_size": 8, "batch_sizes": [1, 8], "budget_s": 0.05}


def test_models_without_batching_and_with_int_io(tmp_path: Path) -> None:
    fixed = models.save(fixtures.no_batch(), tmp_path / "fixed")
    result, _ = _run(tmp_path, fixed, OptimizeOptions(max_batch_size=0), {"original": 1.0})
    assert result.report["timing"]["batch_sizes"] == [1]
    ints = models.save(fixtures.int64_model(), tmp_path / "ints")
    result, _ = _run(tmp_path, ints, OptimizeOptions(), {"original": 1.0})
    assert result.report["selected"] == "original"
    strings = models.save(fixtures.strings(), tmp_path / "strings")
    result, _ = _run(tmp_path, strings, OptimizeOptions(), {"original": 1.0})
    steps = _steps(result)
    assert steps["int8_static"]["status"] == "skipped" and steps["graph_opt"]["status"] == "rejected"


def test_samples_file_is_the_reference(tmp_path: Path, digits: Path) -> None:
    np.savez(digits.parent / "samples.npz", x=models.trained_digits().x_test[:40])
    result, _ = _run(tmp_path, digits, OptimizeOptions(), {"original": 1.0})
    assert result.report["reference"]["source"] == "samples" and result.report["reference"]["count"] == 40


def test_external_data_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    model = onnx.ModelProto()
    model.CopyFrom(models.trained_digits().model)  # saving as external data rewrites the proto in place
    onnx.save(model, str(path), save_as_external_data=True, size_threshold=0)
    result, bench = _run(tmp_path, path, OptimizeOptions(), {})
    assert result.model_path == path and bench.calls == []
    assert "external data" in result.report["steps"][0]["reason"]


def _split_run(
    tmp_path: Path, digits: Path, rates: dict[tuple[int, int], Any], *, cores: int = 2, tune: bool = True, **more: Any
) -> tuple[Any, FakeThroughput]:
    timer = FakeThroughput(rates)
    device = fake_device(cores=cores)
    pipeline = Pipeline(tmp_path / "cache", device=device, benchmark=FakeBenchmark(), throughput=timer)
    options = OptimizeOptions(precision="fp32", tune_instances=tune, preferred_batch_sizes=[4], **more)
    return pipeline.run(digits, options), timer


def test_compile_picks_more_instances_when_they_are_faster(tmp_path: Path, digits: Path) -> None:
    result, timer = _split_run(tmp_path, digits, {(1, 2): 100.0, (2, 1): 180.0})
    assert timer.calls == [(1, 2, 4), (2, 1, 4), (1, 2, 4), (2, 1, 4)]  # at the batch size the batcher forms
    compile_step = _steps(result)["compile"]
    assert compile_step["details"]["splits"] == [
        {"instances": 1, "threads": 2, "samples_per_s": 100.0},
        {"instances": 2, "threads": 1, "samples_per_s": 180.0},
    ]
    assert compile_step["details"]["chosen"] == {"instances": 2, "threads": 1}
    assert compile_step["status"] == "applied" and "2 instances x 1 threads" in compile_step["reason"]
    assert result.session == SessionSpec(intra_op_threads=1, instances=2)
    assert result.report["session_options"] == {"intra_op_threads": 1, "instances": 2}


def test_compile_keeps_one_instance_below_min_gain(tmp_path: Path, digits: Path) -> None:
    result, timer = _split_run(tmp_path, digits, {(1, 2): 100.0, (2, 1): 104.0})
    compile_step = _steps(result)["compile"]
    assert compile_step["details"]["chosen"] is None and len(timer.calls) == 2  # no second look
    assert "kept 1 instance" in compile_step["reason"] and "needs 5% more" in compile_step["reason"]
    assert result.session.instances is None


def test_compile_split_must_survive_a_second_timing(tmp_path: Path, digits: Path) -> None:
    result, _ = _split_run(tmp_path, digits, {(1, 2): 100.0, (2, 1): [150.0, 101.0]})
    compile_step = _steps(result)["compile"]
    assert compile_step["details"]["splits_confirmation"] == {"1x2": 100.0, "2x1": 101.0}
    assert compile_step["details"]["chosen"] is None and result.session.instances is None


def test_compile_splits_fit_the_cores(tmp_path: Path, digits: Path) -> None:
    _, timer = _split_run(tmp_path, digits, {}, cores=8)
    assert [(n, t) for n, t, _ in timer.calls] == [(1, 8), (2, 4), (4, 2)]  # N x T <= cores, N capped at 4
    assert compiling.instance_splits(2) == ((1, 2), (2, 1))
    assert compiling.instance_splits(6) == ((1, 6), (2, 3), (4, 1))
    assert compiling.instance_splits(1) == ()


def test_compile_times_no_split_when_the_host_fixes_instances(tmp_path: Path, digits: Path) -> None:
    result, timer = _split_run(tmp_path, digits, {(2, 1): 1000.0}, tune=False)
    assert timer.calls == [] and "splits" not in _steps(result)["compile"]["details"]
    assert result.session.instances is None
