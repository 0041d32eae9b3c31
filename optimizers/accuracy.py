"""The accuracy guard: compare a candidate's outputs with the original's on the reference set. Errors are
aggregated over every output and every sample; the worst output decides."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from optimizers.runtime import Feed

Family = Literal["fp32", "fp16", "bf16", "int8", "sparse"]

#: Metrics where lower is better (a budget is a maximum); the others are similarities (a minimum).
LOWER_IS_BETTER = frozenset({"rel_l2", "max_abs"})

#: Budgets by candidate family. Pruning without fine-tuning is lossy like INT8, so it gets INT8's budgets; bf16
#: (OpenVINO on CPUs with avx512_bf16/AMX) is a half-width float like FP16 and gets FP16's.
DEFAULT_THRESHOLDS: dict[Family, dict[str, float]] = {
    "fp32": {"rel_l2": 1e-4},
    "fp16": {"rel_l2": 1e-2},
    "bf16": {"rel_l2": 1e-2},
    "int8": {"cosine": 0.99, "top1": 0.99},
    "sparse": {"cosine": 0.99, "top1": 0.99},
}


def thresholds_for(family: Family, overrides: Mapping[Any, float]) -> dict[str, float]:
    """The family's defaults, with the model's own budgets on top."""
    return {**DEFAULT_THRESHOLDS[family], **overrides}


@dataclass
class Comparison:
    """Metric values (worst over outputs) plus problems that reject outright (NaN/Inf, shape changes)."""

    metrics: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def compare(reference: Sequence[Feed], candidate: Sequence[Feed]) -> Comparison:
    """Relative L2, max abs error and cosine for numeric outputs; top-1 agreement for [batch, classes] floats."""
    result = Comparison()
    if len(reference) != len(candidate):
        result.problems.append("candidate returned a different number of batches")
        return result
    for name in reference[0] if reference else {}:
        refs = [batch[name] for batch in reference]
        cands = [batch.get(name) for batch in candidate]
        if any(c is None for c in cands):
            result.problems.append(f"output {name!r} is missing")
            continue
        _compare_output(name, refs, [c for c in cands if c is not None], result)
    return result


def _compare_output(name: str, refs: list[np.ndarray], cands: list[np.ndarray], result: Comparison) -> None:
    if any(r.shape != c.shape for r, c in zip(refs, cands, strict=True)):
        result.problems.append(f"output {name!r} changed shape")
        return
    if refs[0].dtype.kind not in "fiub":
        if not all(np.array_equal(r, c) for r, c in zip(refs, cands, strict=True)):
            result.problems.append(f"output {name!r} (non-numeric) differs")
        return
    ref = np.concatenate([r.reshape(-1) for r in refs]).astype(np.float64)
    cand = np.concatenate([c.reshape(-1) for c in cands]).astype(np.float64)
    finite = np.isfinite(ref)
    if not np.isfinite(cand[finite]).all():
        result.problems.append(f"output {name!r} has NaN/Inf where the original has finite values")
        return
    ref, cand = ref[finite], cand[finite]
    _worst(result.metrics, "rel_l2", relative_l2(ref, cand))
    _worst(result.metrics, "max_abs", float(np.max(np.abs(ref - cand))) if ref.size else 0.0)
    _worst(result.metrics, "cosine", cosine(ref, cand))
    if is_classifier(refs[0]):
        agree = np.concatenate([r.argmax(-1) == c.argmax(-1) for r, c in zip(refs, cands, strict=True)])
        _worst(result.metrics, "top1", float(agree.mean()))


def is_classifier(output: np.ndarray) -> bool:
    """[batch, classes] floats with at least two classes: argmax agreement means something there."""
    return output.dtype.kind == "f" and output.ndim == 2 and output.shape[1] >= 2


def relative_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    """||cand - ref|| / ||ref|| (absolute when the reference is all zeros)."""
    error = float(np.linalg.norm(cand - ref))
    norm = float(np.linalg.norm(ref))
    return error / norm if norm > 0 else error


def cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    """Cosine similarity of the flattened outputs; two zero vectors are identical."""
    a, b = float(np.linalg.norm(ref)), float(np.linalg.norm(cand))
    if a == 0 or b == 0:
        return 1.0 if a == b else 0.0
    return float(np.dot(ref, cand) / (a * b))


def _worst(metrics: dict[str, float], name: str, value: float) -> None:
    if name not in metrics:
        metrics[name] = value
    elif name in LOWER_IS_BETTER:
        metrics[name] = max(metrics[name], value)
    else:
        metrics[name] = min(metrics[name], value)


def violations(comparison: Comparison, thresholds: Mapping[str, float]) -> list[str]:
    """Why a candidate fails, one phrase per broken budget (empty: it passes). A budget for a metric that
    does not apply (top-1 on a regression output) is ignored."""
    failures = list(comparison.problems)
    for metric, budget in thresholds.items():
        value = comparison.metrics.get(metric)
        if value is None:
            continue
        if math.isnan(value):
            failures.append(f"{metric} is NaN")
        elif metric in LOWER_IS_BETTER and value > budget:
            failures.append(f"{metric} {value:.3g} > {budget:g}")
        elif metric not in LOWER_IS_BETTER and value < budget:
            failures.append(f"{metric} {value:.4f} < {budget:g}")
    return failures


def applicable(thresholds: Mapping[str, float], comparison: Comparison) -> dict[str, float]:
    """The budgets that were actually checked (for the report)."""
    return {metric: budget for metric, budget in thresholds.items() if metric in comparison.metrics}
