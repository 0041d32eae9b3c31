"""compile step: CPU session candidates, and the TensorRT/CUDA provider options it generates. No GPU on this
machine, so the GPU part is checked as generated options only (tests/gpu would run them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimizers import OptimizeOptions
from optimizers.modelinfo import analyze
from optimizers.passes import compile as compiling
from optimizers.providers import CPU, CUDA, TENSORRT
from optimizers.runtime import SessionSpec
from tests.models import fixtures
from tests.unit.optimizers import models


def _config(tmp_path: Path, options: OptimizeOptions, model: object = None):
    path = models.save(model or models.conv_net(), tmp_path / "m")  # type: ignore[arg-type]
    info = analyze(path)
    sample = {t.name: np.zeros((8, 3, 16, 16), np.float32) for t in info.inputs}
    return compiling.configure(options, info, 4, tmp_path / "cache", sample)


def test_thread_candidates() -> None:
    assert compiling.thread_candidates(1) == (1,)
    assert compiling.thread_candidates(2) == (1, 2)
    assert compiling.thread_candidates(6) == (1, 2, 4, 6)


def test_cpu_candidates_are_thread_counts(tmp_path: Path) -> None:
    plain = compiling.candidates(_config(tmp_path, OptimizeOptions()), "fp32", False)
    assert [c.label for c in plain] == ["threads=1", "threads=2", "threads=4"]
    assert plain[0].spec.as_options() == {"intra_op_threads": 1} and plain[0].family is None
    assert compiling.target_spec(_config(tmp_path, OptimizeOptions())) == SessionSpec()


def test_tensorrt_options_caches_profile_and_flags(tmp_path: Path) -> None:
    options = OptimizeOptions(target="tensorrt", max_batch_size=32, preferred_batch_sizes=[4, 16])
    config = _config(tmp_path, options)
    spec = compiling.target_spec(config, "int8", sparse_24=True)
    assert spec.providers == (TENSORRT, CUDA, CPU)
    trt = spec.provider_options[TENSORRT]
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_timing_cache_enable"] == "True"
    assert Path(trt["trt_engine_cache_path"]).is_relative_to(tmp_path / "cache")
    assert Path(trt["trt_timing_cache_path"]).is_relative_to(tmp_path / "cache")
    assert trt["trt_profile_min_shapes"] == "image:1x3x16x16"
    assert trt["trt_profile_opt_shapes"] == "image:16x3x16x16"
    assert trt["trt_profile_max_shapes"] == "image:32x3x16x16"
    assert (trt["trt_int8_enable"], trt["trt_fp16_enable"], trt["trt_sparsity_enable"]) == ("True", "False", "True")
    assert spec.as_options()["providers"] == [TENSORRT, CUDA, CPU]


def test_tensorrt_variants_respect_precision(tmp_path: Path) -> None:
    auto = compiling.candidates(_config(tmp_path, OptimizeOptions(target="tensorrt")), "fp32", False)
    assert [c.label for c in auto] == ["cuda", "tensorrt_fp16"]
    assert auto[1].family == "fp16"  # lossy: the guard checks it
    assert auto[1].spec.provider_options[TENSORRT]["trt_fp16_enable"] == "True"
    fp32 = compiling.candidates(_config(tmp_path, OptimizeOptions(target="tensorrt", precision="fp32")), "fp32", False)
    assert [c.label for c in fp32] == ["cuda"]


def test_cuda_target_and_static_shapes(tmp_path: Path) -> None:
    config = _config(tmp_path, OptimizeOptions(target="cuda"))
    assert compiling.target_spec(config).providers == (CUDA, CPU)
    static = _config(tmp_path, OptimizeOptions(target="tensorrt", max_batch_size=0), model=fixtures.no_batch())
    assert static.profile is None
    assert "trt_profile_min_shapes" not in compiling.target_spec(static).provider_options[TENSORRT]


def test_ort_throughput_drives_every_instance(tmp_path: Path) -> None:
    from optimizers.timing import OrtThroughput

    path = models.save(models.conv_net(), tmp_path / "m")
    feed = {analyze(path).inputs[0].name: np.zeros((2, 3, 16, 16), np.float32)}
    rate = OrtThroughput(window_s=0.2)("2x1", path, SessionSpec(intra_op_threads=1), feed, 2, 2)
    assert rate > 0
