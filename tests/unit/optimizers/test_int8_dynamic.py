"""int8_dynamic pass: MatMul/Gemm weights become INT8 via onnxruntime.quantization; reduce_range follows VNNI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from optimizers import OptimizeOptions
from optimizers.accuracy import cosine
from optimizers.passes.int8_dynamic import Int8DynamicPass
from tests.models import fixtures
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import context, fake_device


def test_quantizes_matmuls_and_keeps_outputs_close(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(features=32, hidden=64, classes=8), tmp_path)
    ctx = context(source)
    quant = Int8DynamicPass()
    config = quant.configure(ctx)
    assert quant.skip_reason(ctx, config) is None
    target = tmp_path / "int8.onnx"
    quant.apply(source, target, config, ctx)
    ops = {node.op_type for node in onnx.load(str(target)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert target.stat().st_size < source.stat().st_size
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    out = ort.InferenceSession(str(target)).run(None, {"x": x})[0]
    assert cosine(ref.ravel(), out.ravel()) > 0.99


def test_reduce_range_only_without_vnni(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(), tmp_path)
    vnni = Int8DynamicPass().configure(context(source, device=fake_device()))
    avx2 = Int8DynamicPass().configure(context(source, device=fake_device(cpu_flags=("avx2", "fma"))))
    assert not vnni.reduce_range and avx2.reduce_range


def test_skip_reasons(tmp_path: Path) -> None:
    quant = Int8DynamicPass()
    mlp = models.save(fixtures.float_mlp(), tmp_path / "mlp")
    conv = models.save(models.conv_net(), tmp_path / "conv")
    old_cpu = context(mlp, device=fake_device(cpu_flags=("sse4_2",)))
    assert "AVX2" in (quant.skip_reason(old_cpu, quant.configure(old_cpu)) or "")
    gpu = context(mlp, OptimizeOptions(target="cuda"))
    assert "CPU" in (quant.skip_reason(gpu, quant.configure(gpu)) or "")
    conv_ctx = context(conv)
    assert "conv net" in (quant.skip_reason(conv_ctx, quant.configure(conv_ctx)) or "")
    no_weights = models.save(fixtures.multi_io(), tmp_path / "add")
    add_ctx = context(no_weights)
    assert "MatMul" in (quant.skip_reason(add_ctx, quant.configure(add_ctx)) or "")
