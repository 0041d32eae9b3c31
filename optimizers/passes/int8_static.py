"""INT8 static quantization in QDQ format: activation ranges are calibrated once on the reference inputs, so
no run-time range computation is needed; the usual choice for conv nets. The QDQ graph is also what
TensorRT builds explicit INT8 engines from (then symmetric INT8 activations, as TensorRT requires)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from optimizers.passes._quant import (
    IntType,
    QuantSetting,
    fallback_settings,
    preprocess,
    quant_type,
    quantize_with_fallbacks,
)
from optimizers.passes.base import ModelPass, PassConfig, PassContext
from optimizers.runtime import Feed


class StaticQuantConfig(PassConfig):
    """onnxruntime ``quantize_static`` settings (QDQ format)."""

    activation_type: IntType = "uint8"
    weight_type: IntType = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    max_calibration_batches: int = 16


class Int8StaticPass(ModelPass[StaticQuantConfig]):
    """``onnxruntime.quantization.quantize_static`` (QDQ) after ``quant_pre_process``."""

    name = "int8_static"
    family = "int8"
    uses_calibration = True

    def configure(self, ctx: PassContext) -> StaticQuantConfig:
        if ctx.options.target == "tensorrt":
            return StaticQuantConfig(activation_type="int8", symmetric_activations=True)
        return StaticQuantConfig(reduce_range=not ctx.device.has_vnni)

    def skip_reason(self, ctx: PassContext, config: StaticQuantConfig) -> str | None:
        if ctx.options.target == "cuda":
            return "the CUDA provider runs QDQ graphs without INT8 kernels; use target tensorrt for INT8 on GPU"
        if ctx.options.target == "cpu" and not ctx.device.int8_pays:
            return "this CPU has neither AVX2 nor VNNI/dot-product instructions: INT8 would not beat FP32"
        if not ctx.info.has_float_weights:
            if ctx.info.subgraph_weight_params:
                return (
                    f"the model's only weights are {ctx.info.subgraph_note}, and onnxruntime's static (QDQ) quantizer "
                    "does not enter subgraphs (int8_dynamic quantizes their MatMul/Gemm)"
                )
            return "no MatMul/Gemm/Conv with constant float weights"
        if not ctx.calibration:
            return "no calibration inputs"
        return None

    def apply(self, source: Path, target: Path, config: StaticQuantConfig, ctx: PassContext) -> dict[str, Any]:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        prepared = target.with_name(target.stem + ".pre.onnx")
        symbolic = preprocess(source, prepared)
        batches = list(ctx.calibration)[: config.max_calibration_batches]
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[config.calibration]
        extra = {"ActivationSymmetric": config.symmetric_activations}

        def quantize(setting: QuantSetting, excluded: list[str]) -> None:
            quantize_static(
                str(prepared),
                str(target),
                _Reader(batches),
                quant_format=QuantFormat.QDQ,
                activation_type=quant_type(config.activation_type),
                weight_type=quant_type(config.weight_type),
                per_channel=setting.per_channel,
                reduce_range=config.reduce_range,
                calibrate_method=method,
                nodes_to_exclude=excluded,
                extra_options=setting.extra_options,
            )

        settings = fallback_settings(config.per_channel, extra, qdq=True)
        fallbacks = quantize_with_fallbacks(settings, prepared, target, quantize)
        prepared.unlink(missing_ok=True)
        details: dict[str, Any] = {
            "calibration_batches": len(batches),
            "reduce_range": config.reduce_range,
            "symbolic_shape_inference": symbolic,
            **fallbacks,
        }
        if ctx.info.subgraph_weight_params:  # the QDQ quantizer does not enter them
            details["subgraphs"] = {
                "weights": dict(ctx.info.subgraph_weight_params),
                "hosts": list(ctx.info.subgraph_hosts),
                "int8_ops": 0,
                "note": f"{ctx.info.subgraph_note} stay float: the static (QDQ) quantizer does not enter subgraphs",
            }
        return details


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our reference batches."""

    def __init__(self, batches: Sequence[Feed]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> Feed | None:
        return next(self._batches, None)
