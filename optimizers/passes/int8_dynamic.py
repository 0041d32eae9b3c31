"""INT8 dynamic quantization: weights become INT8 offline, activations are quantized per batch at run time.
No calibration needed; pays off where MatMul/Gemm hold the weights (MLPs, transformers). On CPUs without
VNNI, u8 x s8 products can saturate in AVX2's 16-bit accumulation, so weights use 7 bits (reduce_range)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class DynamicQuantConfig(PassConfig):
    """onnxruntime ``quantize_dynamic`` settings."""

    weight_type: IntType = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul", "Gemm")


class Int8DynamicPass(ModelPass[DynamicQuantConfig]):
    """``onnxruntime.quantization.quantize_dynamic`` after ``quant_pre_process``."""

    name = "int8_dynamic"
    family = "int8"

    def configure(self, ctx: PassContext) -> DynamicQuantConfig:
        return DynamicQuantConfig(reduce_range=not ctx.device.has_vnni)

    def skip_reason(self, ctx: PassContext, config: DynamicQuantConfig) -> str | None:
        if ctx.options.target != "cpu":
            return "dynamic quantization runs on CPU kernels only"
        if not ctx.device.int8_pays:
            return "this CPU has neither AVX2 nor VNNI/dot-product instructions: INT8 would not beat FP32"
        dense = ctx.info.weight_params.get("MatMul", 0) + ctx.info.weight_params.get("Gemm", 0)
        if dense == 0:
            return "no MatMul/Gemm with constant weights"
        if ctx.info.matmul_share < MIN_MATMUL_SHARE:
            return f"MatMul/Gemm hold only {ctx.info.matmul_share:.0%} of the weights (conv net): see int8_static"
        return None

    def apply(self, source: Path, target: Path, config: DynamicQuantConfig, ctx: PassContext) -> dict[str, Any]:
        from onnxruntime.quantization import quantize_dynamic

        prepared = target.with_name(target.stem + ".pre.onnx")
        symbolic = preprocess(source, prepared)

        def quantize(setting: QuantSetting, excluded: list[str]) -> None:
            quantize_dynamic(
                str(prepared),
                str(target),
                weight_type=quant_type(config.weight_type),
                per_channel=setting.per_channel,
                reduce_range=config.reduce_range,
                op_types_to_quantize=list(config.op_types),
                nodes_to_exclude=excluded,
                extra_options=setting.extra_options,
            )

        settings = fallback_settings(config.per_channel, {}, qdq=False)
        fallbacks = quantize_with_fallbacks(settings, prepared, target, quantize)
        prepared.unlink(missing_ok=True)
        return {"reduce_range": config.reduce_range, "symbolic_shape_inference": symbolic, **fallbacks}
