"""Accuracy on TRAINED weights: an MLP trained on sklearn's digits, real labels, real top-1 before and after
INT8 and pruning. INT8 must stay within 2 points; pruning without fine-tuning is measured, not promised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimizers import OptimizeOptions, Pipeline
from optimizers.passes.base import ModelPass, PassContext
from optimizers.passes.int8_dynamic import Int8DynamicPass
from optimizers.passes.int8_static import Int8StaticPass
from optimizers.passes.prune import PrunePass
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, fake_device


@pytest.fixture(scope="module")
def digits() -> models.Digits:
    return models.trained_digits()


def _apply(model_pass: ModelPass[Any], source: Path, options: OptimizeOptions, calibration: np.ndarray) -> Path:
    from optimizers.modelinfo import analyze

    batches = [{"x": calibration[i : i + 32]} for i in range(0, len(calibration), 32)]
    ctx = PassContext(fake_device(), options, analyze(source), batches)
    config = model_pass.configure(ctx)
    assert model_pass.skip_reason(ctx, config) is None
    target = source.with_name(f"{model_pass.name}-{getattr(config, 'pattern', '')}.onnx".replace(":", ""))
    model_pass.apply(source, target, config, ctx)
    return target


def test_fp32_model_is_really_trained(tmp_path: Path, digits: models.Digits) -> None:
    source = models.save(digits.model, tmp_path)
    assert models.top1_accuracy(source, digits.x_test, digits.y_test) > 0.93


@pytest.mark.parametrize("quant", [Int8DynamicPass(), Int8StaticPass()], ids=lambda p: p.name)
def test_int8_keeps_top1_within_two_points(tmp_path: Path, digits: models.Digits, quant: ModelPass[Any]) -> None:
    source = models.save(digits.model, tmp_path)
    fp32 = models.top1_accuracy(source, digits.x_test, digits.y_test)
    quantized = _apply(quant, source, OptimizeOptions(), digits.x_train[:256])
    int8 = models.top1_accuracy(quantized, digits.x_test, digits.y_test)
    print(f"digits top-1: fp32 {fp32:.4f}, {quant.name} {int8:.4f}")
    assert abs(fp32 - int8) <= 0.02


@pytest.mark.parametrize("prune", [{"sparsity": 0.5}, {"sparsity": 0.8}, {"pattern": "2:4"}], ids=str)
def test_pruning_costs_are_measured(tmp_path: Path, digits: models.Digits, prune: dict[str, Any]) -> None:
    source = models.save(digits.model, tmp_path)
    fp32 = models.top1_accuracy(source, digits.x_test, digits.y_test)
    pruned = _apply(PrunePass(), source, OptimizeOptions(prune=prune), digits.x_train[:64])
    accuracy = models.top1_accuracy(pruned, digits.x_test, digits.y_test)
    print(f"digits top-1: fp32 {fp32:.4f}, pruned {prune} {accuracy:.4f}")
    assert 0.1 < accuracy <= fp32 + 0.01  # better than chance, no free lunch; the guard decides what ships


def test_pipeline_guard_agrees_with_the_labels(tmp_path: Path, digits: models.Digits) -> None:
    """With real samples, the guard's top-1 agreement tracks real accuracy: int8 passes, 80% pruning fails."""
    source = models.save(digits.model, tmp_path / "m")
    np.savez(source.parent / "samples.npz", x=digits.x_test)
    bench = FakeBenchmark({"original": 10.0, "int8_dynamic": 5.0, "prune": 1.0})
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=bench)
    result = pipeline.run(source, OptimizeOptions(prune={"sparsity": 0.8}))
    steps = {s["name"]: s for s in result.report["steps"]}
    assert result.report["reference"]["source"] == "samples"
    assert steps["prune"]["status"] == "rejected" and "top1" in steps["prune"]["reason"]
    assert result.report["selected"] == "int8_dynamic"
    served = models.top1_accuracy(result.model_path, digits.x_test, digits.y_test)
    assert served >= models.top1_accuracy(source, digits.x_test, digits.y_test) - 0.02
