"""The conversion guard: the converted ONNX model runs (in onnxruntime, on the CPU) on the same inputs the
framework ran on, and the optimizer's accuracy guard compares the two. The result is an optimization report
step named ``convert:<framework>``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizers.accuracy import Comparison, applicable, compare, thresholds_for, violations
from optimizers.report import BeforeAfter, Status, Step
from optimizers.runtime import SessionSpec, open_session, run_batches
from server.convert.job import ConvertError, Produced

RANDOM_NOTE = "random inputs from the signature: a weak check; give samples (keys = input names) for a real one"


@dataclass(frozen=True)
class Verdict:
    """The comparison, the budgets it was held to, and the broken ones (empty: the conversion passes)."""

    comparison: Comparison
    thresholds: dict[str, float]
    failures: list[str]


def check(onnx_path: Path, produced: Produced, overrides: Mapping[str, float] | None = None) -> Verdict:
    """Run the ONNX model on ``produced.batches`` and compare with the framework's outputs."""
    try:
        session = open_session(onnx_path, SessionSpec(intra_op_threads=2))
    except Exception as exc:
        raise ConvertError(f"the converted model does not load in onnxruntime: {str(exc)[:500]}") from None
    expected = {i.name for i in session.get_inputs()}
    given = set(produced.batches[0]) if produced.batches else set()
    if expected != given:
        raise ConvertError(f"the converted model takes inputs {sorted(expected)}, the original {sorted(given)}")
    try:
        candidate = run_batches(session, produced.batches)
    except Exception as exc:
        raise ConvertError(f"the converted model fails on the validation inputs: {str(exc)[:500]}") from None
    comparison = compare(produced.outputs, candidate)
    thresholds = thresholds_for("fp32", overrides or {})
    return Verdict(comparison, thresholds, violations(comparison, thresholds))


def report_step(
    framework: str, verdict: Verdict, produced: Produced, *, duration_s: float, sizes: tuple[int, int]
) -> dict[str, Any]:
    """The report step of one conversion, applied or rejected, in the optimizer report's shape."""
    count = sum(len(next(iter(batch.values()))) for batch in produced.batches if batch)
    kind = "user-sample" if produced.source == "samples" else produced.source
    where = f"{count} {kind} inputs ({len(produced.batches)} batches)"
    libraries = ", ".join(f"{name} {version}" for name, version in produced.versions.items())
    status: Status
    if verdict.failures:
        status, reason = "rejected", f"outputs drift from the original on {where}: {'; '.join(verdict.failures)}"
    else:
        status, reason = "applied", f"converted with {libraries}; outputs match the original on {where}"
    notes = [*produced.notes, *([RANDOM_NOTE] if produced.source == "random" else [])]
    step = Step(
        name=f"convert:{framework}",
        status=status,
        reason=reason + "".join(f"; {note}" for note in notes),
        duration_s=round(duration_s, 3),
        size_bytes=BeforeAfter(before=sizes[0], after=sizes[1]),
        accuracy=verdict.comparison.metrics,
        thresholds=applicable(verdict.thresholds, verdict.comparison),
        details={
            "framework": framework,
            "libraries": produced.versions,
            "reference": produced.source,
            "samples": count,
            "cache_hit": False,
        },
    )
    return step.model_dump(mode="json")
