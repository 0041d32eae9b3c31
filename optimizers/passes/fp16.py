"""FP16: weights and most activations in half precision, for GPU tensor cores; inputs and outputs stay FP32
(keep_io_types) so clients see no change. Ops whose values overflow FP16's 65504 range (exponentials,
powers, sums of squares) stay FP32. Only a candidate when the target is a GPU: CPUs have no FP16 gain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimizers.passes.base import ModelPass, PassConfig, PassContext

#: Ops kept in FP32 on top of onnxruntime's own block list: they overflow or lose too much in half precision.
OVERFLOW_OPS = ("Exp", "Pow", "Log", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "Softplus")


class Fp16Config(PassConfig):
    """onnxruntime.transformers' float16 converter settings."""

    keep_io_types: bool = True
    extra_block_list: tuple[str, ...] = OVERFLOW_OPS


class Fp16Pass(ModelPass[Fp16Config]):
    """``onnxruntime.transformers.float16.convert_float_to_float16``."""

    name = "fp16"
    family = "fp16"

    def configure(self, ctx: PassContext) -> Fp16Config:
        return Fp16Config()

    def skip_reason(self, ctx: PassContext, config: Fp16Config) -> str | None:
        if ctx.options.target == "cpu":
            return "FP16 pays only on GPUs (target is cpu)"
        if not ctx.info.has_float_weights and not any(t.is_float for t in ctx.info.inputs):
            return "no float tensors to convert"
        return None

    def apply(self, source: Path, target: Path, config: Fp16Config, ctx: PassContext) -> dict[str, Any]:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        block_list = sorted({*DEFAULT_OP_BLOCK_LIST, *config.extra_block_list})
        model = onnx.load(str(source))
        converted = convert_float_to_float16(model, keep_io_types=config.keep_io_types, op_block_list=block_list)
        onnx.save(converted, str(target))
        kept = sorted({node.op_type for node in model.graph.node if node.op_type in block_list})
        return {"kept_fp32_ops": kept}
