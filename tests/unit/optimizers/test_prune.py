"""prune pass: magnitude pruning (unstructured and 2:4) of MatMul/Gemm/Conv weights, only when asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optimizers import OptimizeOptions, OptionsError
from optimizers.passes.prune import PruneConfig, PrunePass, magnitude_mask, two_four_mask
from tests.models import fixtures
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import context


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_unstructured_hits_the_sparsity_and_keeps_the_largest(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(features=16, hidden=32, classes=8), tmp_path)
    ctx = context(source, OptimizeOptions(prune={"sparsity": 0.75}))
    prune = PrunePass()
    config = prune.configure(ctx)
    assert config == PruneConfig(sparsity=0.75, pattern="unstructured")
    details = prune.apply(source, tmp_path / "pruned.onnx", config, ctx)
    before, after = _weights(source), _weights(tmp_path / "pruned.onnx")
    assert details["pruned_tensors"] == ["w1", "w2"]
    for name in ("w1", "w2"):
        assert np.mean(after[name] == 0) == pytest.approx(0.75, abs=0.01)
        kept = np.abs(before[name][after[name] != 0])
        dropped = np.abs(before[name][after[name] == 0])
        assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(after["b1"], before["b1"])  # biases untouched


def test_two_four_along_the_input_channels(tmp_path: Path) -> None:
    source = models.save(models.conv_net(), tmp_path)
    ctx = context(source, OptimizeOptions(prune={"pattern": "2:4"}))
    prune = PrunePass()
    details = prune.apply(source, tmp_path / "pruned.onnx", prune.configure(ctx), ctx)
    after = _weights(tmp_path / "pruned.onnx")
    assert "c2" in details["pruned_tensors"]  # [16, 8, 3, 3]: 8 input channels
    assert any(s.startswith("c1") for s in details["skipped_tensors"])  # 3 input channels: not a multiple of 4
    groups = np.moveaxis(after["c2"], 1, -1).reshape(-1, 4)
    assert (np.count_nonzero(groups, axis=1) <= 2).all()


def test_masks() -> None:
    weights = np.array([[0.1, -3.0, 0.2, 4.0], [1.0, 0.0, -2.0, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(two_four_mask(weights, axis=1), [[0, 1, 0, 1], [1, 0, 1, 0]])
    assert magnitude_mask(weights, 0.5).sum() == 4
    assert magnitude_mask(weights, 0.01).all()


def test_only_when_asked_and_validated(tmp_path: Path) -> None:
    source = models.save(fixtures.float_mlp(), tmp_path)
    ctx = context(source)
    prune = PrunePass()
    assert "not asked" in (prune.skip_reason(ctx, prune.configure(ctx)) or "")
    with pytest.raises(OptionsError, match=r"optimize\.prune"):
        OptimizeOptions.from_config_dict({"prune": {"sparsity": 0.3, "pattern": "2:4"}})
