"""The accuracy guard: a harmful pass is rejected even when it is the fastest, and the report says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optimizers import OptimizeOptions, Pipeline
from optimizers.accuracy import Family
from optimizers.passes import default_passes
from optimizers.passes.base import ModelPass, PassConfig, PassContext
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, fake_device


class ZeroHalfConfig(PassConfig):
    fill: float = 0.0


class ZeroHalfPass(ModelPass[ZeroHalfConfig]):
    """Harmful on purpose: sets the first half of every weight matrix to ``fill`` (0, or NaN)."""

    name = "zero_half"
    family: ClassVar[Family] = "int8"

    def __init__(self, fill: float = 0.0) -> None:
        self.fill = fill

    def configure(self, ctx: PassContext) -> ZeroHalfConfig:
        return ZeroHalfConfig(fill=self.fill)

    def apply(self, source: Path, target: Path, config: ZeroHalfConfig, ctx: PassContext) -> dict[str, Any]:
        model = onnx.load(str(source))
        for init in model.graph.initializer:
            weights = numpy_helper.to_array(init).copy()
            if weights.ndim >= 2:
                weights.reshape(-1)[: weights.size // 2] = config.fill
                init.CopyFrom(numpy_helper.from_array(weights, init.name))
        onnx.save(model, str(target))
        return {}


class CrashingPass(ZeroHalfPass):
    name = "crashing"

    def apply(self, source: Path, target: Path, config: ZeroHalfConfig, ctx: PassContext) -> dict[str, Any]:
        raise RuntimeError("boom")


def _run(tmp_path: Path, passes: list[ModelPass[Any]], latencies: dict[str, float]) -> Any:
    model = models.save(models.trained_digits().model, tmp_path / "model")
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), passes=passes, benchmark=FakeBenchmark(latencies))
    return model, pipeline.run(model, OptimizeOptions(time_budget_s=0.05))


@pytest.mark.parametrize("fill", [0.0, float("nan")])
def test_harmful_pass_is_rejected_even_when_fastest(tmp_path: Path, fill: float) -> None:
    model, result = _run(tmp_path, [ZeroHalfPass(fill)], {"original": 10.0, "zero_half": 1.0})
    step = result.report["steps"][0]
    assert step["name"] == "zero_half" and step["status"] == "rejected"
    assert step["reason"].startswith("accuracy: ")
    assert ("NaN/Inf" in step["reason"]) if np.isnan(fill) else ("cosine" in step["reason"])
    assert step["latency_ms"]["after"] is None  # rejected before timing
    assert result.report["selected"] == "original" and result.model_path == model


def test_harmful_pass_loses_to_an_honest_one(tmp_path: Path) -> None:
    passes = [ZeroHalfPass(), *default_passes()]
    latencies = {"original": 10.0, "zero_half": 1.0, "int8_dynamic": 6.0, "graph_opt": 9.0, "int8_static": 8.0}
    _, result = _run(tmp_path, passes, latencies)
    statuses = {s["name"]: s["status"] for s in result.report["steps"]}
    assert statuses["zero_half"] == "rejected"
    assert result.report["selected"] == "int8_dynamic" and statuses["int8_dynamic"] == "applied"


def test_crashing_pass_is_reported_not_raised(tmp_path: Path) -> None:
    model, result = _run(tmp_path, [CrashingPass()], {"original": 10.0, "crashing": 1.0})
    step = result.report["steps"][0]
    assert step["status"] == "rejected" and step["reason"] == "failed: RuntimeError: boom"
    assert result.model_path == model
