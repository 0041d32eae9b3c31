"""optiserve's model optimizer: probe the device, build candidate models (graph optimization, INT8, FP16,
pruning), reject any that fail the accuracy guard against the original, time the survivors on this device,
keep the fastest (never slower than the original), tune how it runs, and cache everything.

    from optimizers import OptimizeOptions, Pipeline, probe_device
    pipeline = Pipeline(cache_dir=Path("cache"), cache_max_bytes=2**30, device=probe_device())
    result = pipeline.run(Path("model.onnx"), OptimizeOptions(precision="auto"), progress=print)
    result.model_path, result.session, result.family, result.summary  # result.report: the JSON dict
"""

from __future__ import annotations

from optimizers.device import DeviceInfo, GpuInfo, probe_device
from optimizers.errors import OptimizeError, OptionsError
from optimizers.options import OptimizeOptions, PruneOptions
from optimizers.pipeline import Pipeline, PipelineResult
from optimizers.report import Report
from optimizers.runtime import NO_GUARD, DeviceGuard, SessionSpec

__all__ = [
    "NO_GUARD",
    "DeviceGuard",
    "DeviceInfo",
    "GpuInfo",
    "OptimizeError",
    "OptimizeOptions",
    "OptionsError",
    "Pipeline",
    "PipelineResult",
    "PruneOptions",
    "Report",
    "SessionSpec",
    "probe_device",
]
