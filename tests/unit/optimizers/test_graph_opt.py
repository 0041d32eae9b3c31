"""graph_opt pass: onnxruntime's offline optimized model is valid, lossless, and keyed by providers/level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from optimizers import OptimizeOptions
from optimizers.passes.graph_opt import GraphOptConfig, GraphOptPass
from tests.models import fixtures
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import context


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_writes_an_optimized_model_with_the_same_outputs(tmp_path: Path) -> None:
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source)
    graph_opt = GraphOptPass()
    config = graph_opt.configure(ctx)
    assert graph_opt.skip_reason(ctx, config) is None
    target = tmp_path / "out.onnx"
    details = graph_opt.apply(source, target, config, ctx)
    assert target.is_file() and details["level"] == "all"
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(target, x), _run(source, x), rtol=1e-4, atol=1e-5)
    assert source.read_bytes() != target.read_bytes()  # never in place


def test_config_is_static_and_follows_the_target(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(), tmp_path)
    cpu = GraphOptPass().configure(context(source))
    cuda = GraphOptPass().configure(context(source, OptimizeOptions(target="cuda")))
    assert cpu == GraphOptConfig(level="all", providers=("CPUExecutionProvider",))
    assert cuda.providers[0] == "CUDAExecutionProvider"
    assert cpu.model_dump() != cuda.model_dump()  # different artifacts in the cache


def test_skipped_for_tensorrt(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(), tmp_path)
    ctx = context(source, OptimizeOptions(target="tensorrt"))
    graph_opt = GraphOptPass()
    assert "TensorRT" in (graph_opt.skip_reason(ctx, graph_opt.configure(ctx)) or "")
