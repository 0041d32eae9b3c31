"""The optimization report: what each step did, with measured size, latency and accuracy, and why a
candidate was rejected or skipped. Pydantic models so the schema is written down once; ``model_dump()``
gives the JSON-able dict the server returns."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["applied", "rejected", "skipped"]


class BeforeAfter(BaseModel):
    """A measured value for the original (before) and for this step's output (after)."""

    before: float | None = None
    after: float | None = None


class Step(BaseModel):
    """One pass (or the compile step) as it ran in this pipeline."""

    name: str
    status: Status = "skipped"
    reason: str = ""
    duration_s: float = 0.0
    size_bytes: BeforeAfter = Field(default_factory=BeforeAfter)
    latency_ms: BeforeAfter = Field(default_factory=BeforeAfter)
    accuracy: dict[str, float] = Field(default_factory=dict)
    thresholds: dict[str, float] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)


class Report(BaseModel):
    """The whole run. ``latency_ms`` values are medians at ``timing.preferred_batch_size``."""

    model: str
    version: str = ""
    device: dict[str, Any] = Field(default_factory=dict)
    target: str = "cpu"
    precision: str = "auto"
    selected: str = "original"
    summary: str = ""
    """One line on the outcome: what serves and why, or plainly why nothing was applied."""
    session_options: dict[str, Any] = Field(default_factory=dict)
    engine: dict[str, Any] = Field(default_factory=dict)
    """What serves the selected candidate: ``engine`` (onnxruntime, openvino, cuda, tensorrt), ``precision`` (its
    family: fp32, bf16, int8, fp16, sparse), for OpenVINO its ``device`` and the ``precision_hint`` it was given,
    the ``providers`` asked for, and ``nodes`` by provider as onnxruntime placed them when the guard ran it."""
    notes: list[str] = Field(default_factory=list)
    """What the operator asked for that this machine cannot give, e.g. an execution provider listed in the server's
    ``--execution-providers`` that is unavailable here (also logged as a warning)."""
    cache_hit: bool = False
    cache: Literal["miss", "hit", "waited"] = "miss"
    """Where the result came from: ``miss``, this run optimized; ``hit``, the cache; ``waited``, the cache, after
    waiting for another server (or thread) sharing the cache folder that was optimizing the same model."""
    duration_s: float = 0.0
    reference: dict[str, Any] = Field(default_factory=dict)
    timing: dict[str, Any] = Field(default_factory=dict)
    steps: list[Step] = Field(default_factory=list)


MAX_REASON_CHARS = 160
QUIET_REASONS = ("not asked for",)
"""Skips that are the user's choice, left out of a summary of why nothing was applied."""


def summarize(report: Report, reason: str = "") -> str:
    """The report's ``summary``: ``serving int8_static: <its reason>``; or ``nothing applied: <reason>`` when the
    whole run was skipped for one reason; or ``nothing applied, serving the original: <each candidate: why>``,
    candidates with the same outcome and reason named together (``openvino_fp32, openvino_bf16 skipped (...)``).
    When only the compile step changed something (threads, instances), it says so instead of "nothing applied"."""
    if report.selected != "original":
        step = next((s for s in report.steps if s.name == report.selected), None)
        return f"serving {report.selected}" + (f": {step.reason}" if step and step.reason else "")
    if reason:
        return f"nothing applied: {reason}"
    groups: dict[tuple[str, str], list[str]] = {}
    for step in report.steps:
        if step.name != "compile" and not any(quiet in step.reason for quiet in QUIET_REASONS):
            groups.setdefault((step.status, step.reason), []).append(step.name)
    why = "; ".join(f"{', '.join(names)} {status} ({_clip(text)})" for (status, text), names in groups.items())
    tuned = next((s for s in report.steps if s.name == "compile" and s.status == "applied"), None)
    if tuned is not None:
        lead = f"serving the original with a tuned session ({_clip(tuned.reason)}); no model candidate applied"
    else:
        lead = "nothing applied, serving the original"
    return f"{lead}: {why or 'no candidate for this model'}"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the steps, for the CLI."""
    header = ("step", "status", "size KB", "latency ms", "accuracy", "reason")
    rows = [header]
    for step in report["steps"]:
        rows.append(
            (
                step["name"],
                step["status"],
                _pair(step["size_bytes"], 1 / 1024, "{:.1f}"),
                _pair(step["latency_ms"], 1.0, "{:.3f}"),
                " ".join(f"{k}={v:.4g}" for k, v in step["accuracy"].items()),
                step["reason"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    reference = report.get("reference", {})
    summary = [
        f"model {report['model']} -> selected: {report['selected']}"
        + (f" with {report['session_options']}" if report["session_options"] else ""),
        f"engine {_engine(report.get('engine', {}))}",
        f"device {report['device'].get('fingerprint', '')}, target {report['target']}, precision {report['precision']}"
        + (", cache hit" if report["cache_hit"] else ""),
        f"reference: {reference.get('source', '')}, {reference.get('count', 0)} inputs"
        + (" (random inputs: a weak check)" if reference.get("source") in ("random", "config", "search") else ""),
        *([f"summary: {report['summary']}"] if report.get("summary") else []),
        *(f"note: {note}" for note in report.get("notes", [])),
    ]
    return "\n".join([*summary, "", *lines])


def _pair(values: dict[str, float | None], scale: float, fmt: str) -> str:
    before, after = values.get("before"), values.get("after")
    if before is None and after is None:
        return "-"
    left = fmt.format(before * scale) if before is not None else "?"
    right = fmt.format(after * scale) if after is not None else "?"
    return f"{left} -> {right}"


def _engine(engine: dict[str, Any]) -> str:
    """``openvino CPU bf16 (hint bf16), nodes OpenVINOExecutionProvider=12``; ``?`` for a report without one."""
    if not engine:
        return "?"
    where = " ".join(str(engine[key]) for key in ("engine", "device", "precision") if engine.get(key))
    hint = f" (hint {engine['precision_hint']})" if engine.get("precision_hint") else ""
    nodes = ", ".join(f"{name}={count}" for name, count in sorted(engine.get("nodes", {}).items()))
    return f"{where}{hint}" + (f", nodes {nodes}" if nodes else "")
