"""Accuracy metrics and budgets."""

from __future__ import annotations

import numpy as np
import pytest

from optimizers.accuracy import compare, thresholds_for, violations


def _batches(*arrays: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"y": a} for a in arrays]


def test_identical_outputs_pass_everything() -> None:
    y = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    result = compare(_batches(y), _batches(y.copy()))
    assert result.metrics == {"rel_l2": 0.0, "max_abs": 0.0, "cosine": pytest.approx(1.0), "top1": 1.0}
    assert violations(result, thresholds_for("fp32", {})) == []


def test_metrics_values() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    cand = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)  # second row's argmax flips
    result = compare(_batches(ref), _batches(cand))
    assert result.metrics["top1"] == 0.5
    assert result.metrics["max_abs"] == 1.0
    assert result.metrics["rel_l2"] == pytest.approx(1.0)
    assert result.metrics["cosine"] == pytest.approx(0.5)
    failures = violations(result, thresholds_for("int8", {}))
    assert any(f.startswith("cosine") for f in failures) and any(f.startswith("top1") for f in failures)


def test_nan_or_inf_rejects_whatever_the_budgets() -> None:
    ref = np.ones((2, 3), np.float32)
    cand = ref.copy()
    cand[0, 0] = np.nan
    result = compare(_batches(ref), _batches(cand))
    assert violations(result, {"rel_l2": 1e9}) == ["output 'y' has NaN/Inf where the original has finite values"]
    cand[0, 0] = np.inf
    assert compare(_batches(ref), _batches(cand)).problems


def test_top1_only_for_classifier_shapes_and_worst_output_counts() -> None:
    ref = [{"vec": np.ones((4,), np.float32), "logits": np.eye(4, dtype=np.float32)}]
    cand = [{"vec": np.ones((4,), np.float32) * 1.1, "logits": np.eye(4, dtype=np.float32)}]
    result = compare(ref, cand)
    assert result.metrics["top1"] == 1.0
    assert result.metrics["rel_l2"] == pytest.approx(0.1, rel=1e-5)  # the worse of the two outputs
    regression = compare([{"y": np.ones((4, 1), np.float32)}], [{"y": np.ones((4, 1), np.float32)}])
    assert "top1" not in regression.metrics


def test_overrides_and_defaults() -> None:
    assert thresholds_for("fp16", {}) == {"rel_l2": 1e-2}
    assert thresholds_for("fp32", {}) == {"rel_l2": 1e-4}
    assert thresholds_for("int8", {"cosine": 0.95}) == {"cosine": 0.95, "top1": 0.99}


def test_shape_change_and_strings() -> None:
    assert compare(_batches(np.ones((2, 2))), _batches(np.ones((2, 3)))).problems == ["output 'y' changed shape"]
    words = np.array([b"a", b"b"], dtype=object)
    assert compare(_batches(words), _batches(words.copy())).problems == []
    assert compare(_batches(words), _batches(np.array([b"a", b"c"], dtype=object))).problems
