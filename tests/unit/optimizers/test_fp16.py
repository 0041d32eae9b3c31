"""fp16 pass: half-precision weights with FP32 inputs/outputs, overflow-prone ops kept FP32, GPU targets only.
(No GPU here: the converted model runs on onnxruntime's CPU FP16 kernels, which is enough for accuracy.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optimizers import OptimizeOptions
from optimizers.accuracy import relative_l2
from optimizers.passes.fp16 import Fp16Pass
from tests.models import fixtures
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import context

GPU = OptimizeOptions(target="cuda")


def test_converts_weights_keeps_io_float32(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(features=16, hidden=32, classes=8), tmp_path)
    ctx = context(source, GPU)
    fp16 = Fp16Pass()
    config = fp16.configure(ctx)
    assert fp16.skip_reason(ctx, config) is None
    target = tmp_path / "fp16.onnx"
    fp16.apply(source, target, config, ctx)
    model = onnx.load(str(target))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    assert target.stat().st_size < 0.7 * source.stat().st_size
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    out = ort.InferenceSession(str(target)).run(None, {"x": x})[0]
    assert relative_l2(ref.ravel().astype(np.float64), out.ravel().astype(np.float64)) < 1e-2


def test_overflow_prone_ops_stay_float32(tmp_path: Path) -> None:
    """ReduceL2 of values in FP16 range whose squares are not: kept FP32, the norm comes out right."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("ReduceL2", ["m"], ["y"], axes=[1])],
        "l2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", fixtures.OPSET)])
    model.ir_version = fixtures.IR_VERSION
    source = models.save(model, tmp_path)
    ctx = context(source, GPU)
    fp16 = Fp16Pass()
    details = fp16.apply(source, tmp_path / "fp16.onnx", fp16.configure(ctx), ctx)
    assert details["kept_fp32_ops"] == ["ReduceL2"]
    x = np.full((1, 4), 300.0, dtype=np.float32)  # sum of squares 360000 > 65504 (FP16 max)
    out = ort.InferenceSession(str(tmp_path / "fp16.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, [[600.0]], rtol=1e-3)


def test_only_for_gpu_targets(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(), tmp_path)
    ctx = context(source, OptimizeOptions(target="cpu"))
    fp16 = Fp16Pass()
    assert "GPU" in (fp16.skip_reason(ctx, fp16.configure(ctx)) or "")
