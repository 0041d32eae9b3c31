"""int8_static pass: QDQ quantization calibrated on the reference inputs (conv nets); TensorRT flavour."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from optimizers import OptimizeOptions
from optimizers.accuracy import cosine
from optimizers.passes.int8_static import Int8StaticPass
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import context


def test_conv_net_gets_qdq_nodes_and_stays_close(tmp_path: Path) -> None:
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source)
    quant = Int8StaticPass()
    config = quant.configure(ctx)
    assert quant.skip_reason(ctx, config) is None
    assert config.per_channel and config.activation_type == "uint8"
    target = tmp_path / "qdq.onnx"
    details = quant.apply(source, target, config, ctx)
    assert details["calibration_batches"] == len(ctx.calibration)
    ops = [node.op_type for node in onnx.load(str(target)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    x = ctx.calibration[0]["image"]
    ref = ort.InferenceSession(str(source)).run(None, {"image": x})[0]
    out = ort.InferenceSession(str(target)).run(None, {"image": x})[0]
    assert cosine(ref.ravel(), out.ravel()) > 0.99


def test_tensorrt_wants_symmetric_int8_activations(tmp_path: Path) -> None:
    source = models.save(models.conv_net(), tmp_path)
    config = Int8StaticPass().configure(context(source, OptimizeOptions(target="tensorrt")))
    assert config.activation_type == "int8" and config.symmetric_activations


def test_skipped_on_plain_cuda(tmp_path: Path) -> None:
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source, OptimizeOptions(target="cuda"))
    quant = Int8StaticPass()
    assert "tensorrt" in (quant.skip_reason(ctx, quant.configure(ctx)) or "")


def test_calibration_uses_the_reference_inputs(tmp_path: Path) -> None:
    """Different calibration data, different scales: why the reference digest is part of the cache key."""
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source)
    quant = Int8StaticPass()
    config = quant.configure(ctx)
    quant.apply(source, tmp_path / "a.onnx", config, ctx)
    scaled = [{k: v * 10 for k, v in feed.items()} for feed in ctx.calibration]
    ctx_b = type(ctx)(ctx.device, ctx.options, ctx.info, scaled)
    quant.apply(source, tmp_path / "b.onnx", config, ctx_b)
    scales_a = _input_scale(tmp_path / "a.onnx")
    scales_b = _input_scale(tmp_path / "b.onnx")
    assert scales_b > 5 * scales_a


def _input_scale(path: Path) -> float:
    model = onnx.load(str(path))
    first_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    init = {i.name: i for i in model.graph.initializer}[first_q.input[1]]
    return float(onnx.numpy_helper.to_array(init))


def test_a_failed_symbolic_shape_inference_leaves_nothing_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime saves its partial model as sym_shape_infer_temp.onnx in the cwd (a server's folder) before
    raising; the stride detector's shapes cannot be inferred symbolically, so it takes that path."""
    from optimizers.passes._quant import SYMBOLIC_DEBRIS, preprocess

    source = models.save(models.stride_detector(), tmp_path / "m")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    assert preprocess(source, tmp_path / "pre.onnx") is False  # symbolic inference failed, the fallback ran
    assert list(workdir.iterdir()) == []
    (workdir / SYMBOLIC_DEBRIS).write_bytes(b"a user's own file")  # one that was there before is kept
    preprocess(source, tmp_path / "pre2.onnx")
    assert (workdir / SYMBOLIC_DEBRIS).read_bytes() == b"a user's own file"
