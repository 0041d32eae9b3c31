"""Render benchmark results as markdown: one table per model, every server row read against raw ORT."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from typing import Any

import onnxruntime as ort

from bench.perf import STABILITY_STEPS

HEADER = "| run | p50 ms | p99 ms | infer/s | vs raw ORT | batch sizes seen | notes |"
RULE = "|---|---:|---:|---:|---|---|---|"
SHORT = {"Network+Server Send/Recv": "net+io", "Server Queue": "queue", "Server Compute Infer": "infer"}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, falling back to platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _cell(text: str) -> str:
    """Make arbitrary text safe inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def format_batches(delta: dict[str, Any] | None, shown: int = 4) -> str:
    """'avg 1.3: b1:900, b2:25, ...': mean executed batch, then the most frequent sizes in size order."""
    if delta is None:
        return "n/a"
    sizes = {int(b): int(n) for b, n in delta.get("batch_sizes", {}).items()}
    if not sizes:
        return "none recorded"
    mean = sum(b * n for b, n in sizes.items()) / sum(sizes.values())
    top = sorted(sorted(sizes, key=lambda b: -sizes[b])[:shown])
    more = f", +{len(sizes) - len(top)} more sizes" if len(sizes) > len(top) else ""
    return f"avg {mean:.1f}: " + ", ".join(f"b{b}:{sizes[b]}" for b in top) + more


def _vs_raw(run: dict[str, Any], raw: dict[str, Any] | None) -> str:
    """c=1: extra p50 ms and infer/s ratio vs the raw batch-1 loop; c>1: share of raw best-batch samples/s.

    For c>1 the share of raw ORT at batch = concurrency is added: the most a server can batch from c callers.
    """
    if raw is None or run.get("infer_per_s") is None:
        return "—"
    rate, conc = run["infer_per_s"], run["concurrency"]
    if conc == 1:
        lat = raw["latency"]
        diff = run["latency_ms"].get("p50", float("nan")) - lat["p50_ms"]
        return f"{diff:+.2f} ms p50, {rate / lat['calls_per_s']:.2f}x infer/s"
    best = raw["best"]
    text = f"{rate / best['samples_per_s']:.2f}x best-batch (b={best['batch']})"
    same = next((p for p in raw["sweep"] if p["batch"] == conc), None)
    if same and same["batch"] != best["batch"]:
        text += f", {rate / same['samples_per_s']:.2f}x b={conc}"
    return text


def _notes(run: dict[str, Any]) -> str:
    """Failure text, a relaxed stability bound, and where the server says the time went."""
    notes = []
    if run.get("error"):
        notes.append(f"failed: {run['error']}")
    elif run.get("unstable_windows"):
        notes.append(f"never stable: median of {run['unstable_windows']} windows, p99 unknown")
    elif run.get("stability_percent", 0) > STABILITY_STEPS[0]:
        notes.append(f"unsteady: windows agreed only within {run['stability_percent']}%")
    server = run.get("server_ms") or {}
    if server:
        notes.append("server " + ", ".join(f"{SHORT.get(k, k)} {v:.2f}" for k, v in server.items()) + " ms")
    if run.get("stats_error"):
        notes.append(f"stats: {run['stats_error']}")
    return _cell("; ".join(notes))


def _raw_rows(raw: dict[str, Any]) -> list[str]:
    lat, best = raw["latency"], raw["best"]
    return [
        f"| raw ORT b=1, one caller | {_num(lat['p50_ms'], 3)} | {_num(lat['p99_ms'], 3)} "
        f"| {_num(lat['calls_per_s'], 1)} | — | — | in-process |",
        f"| raw ORT best batch (b={best['batch']}) | {_num(best['p50_ms'], 3)} | {_num(best['p99_ms'], 3)} "
        f"| {_num(best['samples_per_s'], 1)} | — | — | samples/s; latency per batch call |",
    ]


def _server_row(run: dict[str, Any], raw: dict[str, Any] | None) -> str:
    protocol = run["protocol"].replace("grpc-stream", "gRPC stream").replace("grpc", "gRPC").replace("http", "HTTP")
    label = f"server {protocol} c={run['concurrency']}"
    if run.get("variant"):
        label += f" ({run['variant']})"
    lat = run.get("latency_ms") or {}
    return (
        f"| {label} | {_num(lat.get('p50'), 3)} | {_num(lat.get('p99'), 3)} "
        f"| {_num(run.get('infer_per_s'), 1)} | {_vs_raw(run, raw)} "
        f"| {format_batches(run.get('stats_delta'))} | {_notes(run)} |"
    )


def _sweep_line(raw: dict[str, Any]) -> str:
    points = ", ".join(f"b{p['batch']}: {p['samples_per_s']:,.0f}" for p in raw["sweep"])
    return f"Raw ORT samples/s by batch size: {points}."


def model_section(name: str, result: dict[str, Any]) -> list[str]:
    raw = result.get("raw_ort")
    lines = [f"### {name}", "", HEADER, RULE]
    if raw:
        lines += _raw_rows(raw)
    lines += [_server_row(run, raw) for run in result.get("server", [])]
    if raw:
        lines += ["", _sweep_line(raw)]
    if result.get("server_error"):
        lines += ["", f"Server not measured: {_cell(result['server_error'])}"]
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"## optiserve benchmark — {m['date']}",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}, Python {m['python']}",
        f"- Mode: {results['settings']['mode']}; timing window {results['settings']['window_s']} s "
        f"(raw ORT: median of 3 windows; perf_analyzer: time_windows until p50 is stable)",
        "- Raw ORT: in-process session, intra_op_num_threads = cores, ORT_ENABLE_ALL.",
        "- Server rows: perf_analyzer, random inputs, batch 1 per request; HTTP sends binary tensors. "
        "perf_analyzer runs on the same cores as the server.",
        "- Batch sizes seen: server executions per batch size over the whole perf_analyzer run "
        "(from /v2/models/<m>/stats before and after).",
        "",
    ]
    if results.get("server_error"):
        lines += [f"**Server run failed:** {_cell(results['server_error'])}", ""]
    for name, result in results["models"].items():
        lines += model_section(name, result)
    return "\n".join(lines)
