"""Failure classes seen on public pretrained models, on small synthetic models of the same shape: weights in
Constant nodes, inputs whose dynamic sizes must be searched for, a quantizer that raises on one setting."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from optimizers.modelinfo import analyze, analyze_model, normalize
from optimizers.passes.base import ModelPass
from optimizers.passes.int8_dynamic import Int8DynamicPass
from optimizers.passes.int8_static import Int8StaticPass
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import context


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
