"""Failure classes seen on public pretrained models, on small synthetic models of the same shape: weights in
Constant nodes, inputs whose dynamic sizes must be searched for, a quantizer that raises on one setting."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from optimizers import OptimizeOptions, Pipeline
from optimizers.modelinfo import analyze, analyze_model, normalize
from optimizers.passes.base import ModelPass
from optimizers.passes.int8_dynamic import Int8DynamicPass
from optimizers.passes.int8_static import Int8StaticPass
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, context, fake_device


def test_constant_node_weights_count_as_weights_and_the_input_is_untouched() -> None:
    model = models.constant_weights(models.conv_net())
    before = model.SerializeToString()
    normalized, folded = normalize(model)
    assert folded == 6 and not any(node.op_type == "Constant" for node in normalized.graph.node)
    assert len(normalized.graph.initializer) == 6
    assert model.SerializeToString() == before  # normalized on a copy
    info = analyze_model(model)
    assert info.weight_params == analyze_model(models.conv_net()).weight_params
    assert info.has_float_weights and "Constant" not in info.op_counts


def _quantized_ops(folder: Path, model: onnx.ModelProto, quant: ModelPass[Any]) -> Counter[str]:
    source = models.save(models.constant_weights(model), folder)
    ctx = context(source)
    assert analyze(source).has_float_weights
    config = quant.configure(ctx)
    assert quant.skip_reason(ctx, config) is None
    target = folder / "out.onnx"
    quant.apply(source, target, config, ctx)
    return Counter(node.op_type for node in onnx.load(str(target)).graph.node)


def test_constant_node_weights_are_quantized(tmp_path: Path) -> None:
    assert _quantized_ops(tmp_path / "conv", models.conv_net(), Int8StaticPass())["QuantizeLinear"] >= 1
    mlp = models.trained_digits().model
    assert _quantized_ops(tmp_path / "mlp", mlp, Int8DynamicPass())["MatMulInteger"] >= 1


TRUTH_VALUE = "The truth value of an array with more than one element is ambiguous. Use a.any() or a.all()"


def _failing_quantizer(
    monkeypatch: pytest.MonkeyPatch, name: str, fails: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Replace onnxruntime's ``name`` quantizer with one that raises like ``_adjust_weight_scale_for_int32_bias``
    does on some real models whenever ``fails(kwargs)``; returns the calls' keyword arguments."""
    import onnxruntime.quantization as quantization

    real = getattr(quantization, name)
    calls: list[dict[str, Any]] = []

    def quantize(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        if fails(kwargs):
            raise ValueError(TRUTH_VALUE)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantization, name, quantize)
    return calls


def _adjusts_bias(kwargs: dict[str, Any]) -> bool:
    return not kwargs["extra_options"].get("QDQDisableWeightAdjustForInt32Bias", False)


def test_a_failing_quantizer_setting_falls_back_to_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _failing_quantizer(monkeypatch, "quantize_static", _adjusts_bias)
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source)
    quant = Int8StaticPass()
    details = quant.apply(source, tmp_path / "qdq.onnx", quant.configure(ctx), ctx)
    assert details["quantizer_setting"] == "no_int32_bias_weight_adjust"
    assert [a["setting"] for a in details["quantizer_attempts"]] == [
        "configured",
        "per_tensor",
        "no_int32_bias_weight_adjust",
    ]
    assert "truth value" in details["quantizer_attempts"][0]["error"]
    assert [c["per_channel"] for c in calls] == [True, False, False]
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(tmp_path / "qdq.onnx")).graph.node}


def test_biased_nodes_are_excluded_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_quantizer(monkeypatch, "quantize_static", lambda kwargs: not kwargs["nodes_to_exclude"])
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source)
    quant = Int8StaticPass()
    details = quant.apply(source, tmp_path / "qdq.onnx", quant.configure(ctx), ctx)
    assert details["quantizer_setting"] == "exclude_biased_nodes"
    assert details["quantizer_attempts"][-1]["excluded_nodes"] == 3  # two Convs and the Gemm


def test_every_setting_failing_rejects_the_step_with_each_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_quantizer(monkeypatch, "quantize_dynamic", lambda kwargs: True)
    digits = models.save(models.trained_digits().model, tmp_path / "digits")
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark())
    steps = {step["name"]: step for step in pipeline.run(digits, OptimizeOptions()).report["steps"]}
    reason = steps["int8_dynamic"]["reason"]
    assert steps["int8_dynamic"]["status"] == "rejected"
    assert "every setting" in reason and "configured: ValueError" in reason and "exclude_biased_nodes" in reason
