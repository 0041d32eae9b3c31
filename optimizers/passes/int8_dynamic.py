"""INT8 dynamic quantization: weights become INT8 offline, activations are quantized per batch at run time.
No calibration needed; pays off where MatMul/Gemm hold the weights (MLPs, transformers). On CPUs without
VNNI, u8 x s8 products can saturate in AVX2's 16-bit accumulation, so weights use 7 bits (reduce_range).

It is also the only INT8 that reaches weights inside ``If``/``Loop``/``Scan`` subgraphs: onnxruntime's dynamic
quantizer enters them when asked (``EnableSubgraph``), its static QDQ quantizer does not. So a model whose weights
all sit in subgraphs gets this pass even when Conv holds most of them (the Convs there stay float)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from optimizers.modelinfo import ModelInfo, subgraphs
from optimizers.passes._quant import (
    IntType,
    QuantSetting,
    fallback_settings,
    preprocess,
    quant_type,
    quantize_with_fallbacks,
)
from optimizers.passes.base import ModelPass, PassConfig, PassContext

#: Below this share of weights in MatMul/Gemm the model is a conv net: static quantization fits it better.
MIN_MATMUL_SHARE = 0.5
CONV_STAYS_FLOAT = (
    "dynamic quantization leaves Conv in float: onnxruntime's ConvInteger is slower than its float Conv on CPU"
)


class DynamicQuantConfig(PassConfig):
    """onnxruntime ``quantize_dynamic`` settings."""

    weight_type: IntType = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    subgraphs: bool = False
    """Quantize inside control-flow subgraphs too (onnxruntime's ``EnableSubgraph``): set where they hold
    MatMul/Gemm weights."""


class Int8DynamicPass(ModelPass[DynamicQuantConfig]):
    """``onnxruntime.quantization.quantize_dynamic`` after ``quant_pre_process``."""

    name = "int8_dynamic"
    family = "int8"

    def configure(self, ctx: PassContext) -> DynamicQuantConfig:
        inner = dense_params(ctx.info.subgraph_weight_params)
        return DynamicQuantConfig(reduce_range=not ctx.device.has_vnni, subgraphs=inner > 0)

    def skip_reason(self, ctx: PassContext, config: DynamicQuantConfig) -> str | None:
        if ctx.options.target != "cpu":
            return "dynamic quantization runs on CPU kernels only"
        if not ctx.device.int8_pays:
            return "this CPU has neither AVX2 nor VNNI/dot-product instructions: INT8 would not beat FP32"
        if dense_params(ctx.info.all_weight_params) == 0:
            inner = f" ({ctx.info.subgraph_note}; {CONV_STAYS_FLOAT})" * bool(ctx.info.subgraph_weight_params)
            return f"no MatMul/Gemm with constant weights{inner}"
        static_reaches = ctx.info.has_float_weights  # static QDQ quantizes the main graph only
        if static_reaches and ctx.info.matmul_share < MIN_MATMUL_SHARE:
            return f"MatMul/Gemm hold only {ctx.info.matmul_share:.0%} of the weights (conv net): see int8_static"
        return None

    def apply(self, source: Path, target: Path, config: DynamicQuantConfig, ctx: PassContext) -> dict[str, Any]:
        from onnxruntime.quantization import quantize_dynamic

        prepared = target.with_name(target.stem + ".pre.onnx")
        symbolic = preprocess(source, prepared)

        def quantize(setting: QuantSetting, excluded: list[str]) -> None:
            extra = {**setting.extra_options, "EnableSubgraph": True} if config.subgraphs else setting.extra_options
            quantize_dynamic(
                str(prepared),
                str(target),
                weight_type=quant_type(config.weight_type),
                per_channel=setting.per_channel,
                reduce_range=config.reduce_range,
                op_types_to_quantize=list(config.op_types),
                nodes_to_exclude=excluded,
                extra_options=extra,
            )

        settings = fallback_settings(config.per_channel, {}, qdq=False)
        fallbacks = quantize_with_fallbacks(settings, prepared, target, quantize)
        prepared.unlink(missing_ok=True)
        details = {"reduce_range": config.reduce_range, "symbolic_shape_inference": symbolic, **fallbacks}
        if ctx.info.subgraph_weight_params:
            details["subgraphs"] = subgraph_details(ctx.info, target, config)
        return details


def dense_params(weights: dict[str, int]) -> int:
    """Weight elements held by MatMul/Gemm."""
    return weights.get("MatMul", 0) + weights.get("Gemm", 0)


def subgraph_details(info: ModelInfo, target: Path, config: DynamicQuantConfig) -> dict[str, Any]:
    """What happened inside the subgraphs, for the report: the weights found there, how many of their ops the
    quantized model runs in INT8, and what stayed float."""
    import onnx

    counts = Counter(node.op_type for node in _subgraph_nodes(onnx.load(str(target)).graph))
    quantized = sum(counts[op] for op in INT8_OPS)
    left = {op: n for op, n in info.subgraph_weight_params.items() if op not in config.op_types}
    note = f"{info.subgraph_note}: {quantized} ops there now run in INT8"
    if left:
        note += "; " + ", ".join(sorted(left)) + " weights stay float (dynamic quantization covers MatMul/Gemm)"
    return {
        "weights": dict(info.subgraph_weight_params),
        "hosts": list(info.subgraph_hosts),
        "int8_ops": quantized,
        "note": note,
    }


#: The ops onnxruntime's dynamic quantizer writes for a quantized MatMul/Gemm.
INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "MatMulIntegerToFloat")


def _subgraph_nodes(graph: Any) -> list[Any]:
    """Every node inside ``graph``'s subgraphs, nested ones included (not the main graph's own)."""
    found = []
    for node in graph.node:
        for sub in subgraphs(node):
            found.extend(sub.node)
            found.extend(_subgraph_nodes(sub))
    return found
