"""Graph optimization: let onnxruntime fuse and fold the graph once, offline, and save the result
(``SessionOptions.optimized_model_filepath``). Level ``all`` includes layout changes for this machine's
kernels, which is why the artifact is keyed by the device fingerprint. Lossless: fp32 budgets apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from optimizers.passes.base import ModelPass, PassConfig, PassContext
from optimizers.providers import CPU, CUDA
from optimizers.runtime import SessionSpec, device_work

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class GraphOptConfig(PassConfig):
    """Which onnxruntime level to bake in, for which providers."""

    level: Literal["basic", "extended", "all"] = "all"
    providers: tuple[str, ...] = (CPU,)


class GraphOptPass(ModelPass[GraphOptConfig]):
    """onnxruntime's offline graph optimization."""

    name = "graph_opt"
    family = "fp32"

    def configure(self, ctx: PassContext) -> GraphOptConfig:
        providers = (CUDA, CPU) if ctx.options.target == "cuda" else (CPU,)
        return GraphOptConfig(providers=providers)

    def skip_reason(self, ctx: PassContext, config: GraphOptConfig) -> str | None:
        if ctx.options.target == "tensorrt":
            return "TensorRT optimizes the graph itself when it builds the engine"
        return None

    def apply(self, source: Path, target: Path, config: GraphOptConfig, ctx: PassContext) -> dict[str, Any]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[config.level])
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3
        installed = set(ort.get_available_providers())
        providers = [p for p in config.providers if p in installed] or [CPU]
        with device_work(SessionSpec(providers=tuple(providers)), ctx.guard):  # created and dropped inside it
            ort.InferenceSession(str(source), options, providers=providers)
        return {"level": config.level, "providers": providers}
