"""Drive Triton's perf_analyzer against the server and read back its CSV report.

perf_analyzer is the client Triton users already trust, so numbers from it compare directly with published
Triton figures; a failure is recorded as text rather than raised, so one bad run still leaves a report.
"""

from __future__ import annotations

import csv
import os
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Stability is judged on p50 (not the mean), which a shared machine disturbs less; if three windows in a row
# still never agree within the first bound, the run is repeated once with the looser one and says so.
STABILITY_STEPS = (25, 100)
MAX_TRIALS = 6
PERCENTILES = (50, 90, 95, 99)
PASS_LINE = re.compile(r"Pass \[\d+\] throughput: ([0-9.e+]+) infer/sec\. p50 latency: (\d+) usec")
SERVER_COLUMNS = ("Network+Server Send/Recv", "Server Queue", "Server Compute Infer")


def perf_analyzer_path() -> str:
    """$PERF_ANALYZER, else the one bench/install-perf-analyzer.sh put next to this Python."""
    return os.environ.get("PERF_ANALYZER") or str(Path(sys.executable).parent / "perf_analyzer")


@dataclass
class PerfRun:
    """One perf_analyzer invocation; latencies in ms."""

    model: str
    protocol: str
    concurrency: int
    infer_per_s: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    server_ms: dict[str, float] = field(default_factory=dict)
    stability_percent: int = STABILITY_STEPS[0]
    unstable_windows: int = 0  # >0: never stable; numbers are medians over this many windows
    error: str | None = None
    command: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_command(
    model: str, protocol: str, url: str, concurrency: int, interval_ms: int, csv_path: Path, stability: int
) -> list[str]:
    """The perf_analyzer command line for one (model, protocol, concurrency) point; ``grpc-stream`` is gRPC
    over Triton's bidirectional ModelStreamInfer (perf_analyzer --streaming)."""
    streaming = ["--streaming"] if protocol == "grpc-stream" else []
    return [
        perf_analyzer_path(),
        "-m", model,
        "-i", "grpc" if protocol == "grpc-stream" else protocol,
        *streaming,
        "-u", url,
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-mode", "time_windows",
        "--measurement-interval", str(interval_ms),
        "--percentile=50",
        "--stability-percentage", str(stability),
        "--max-trials", str(MAX_TRIALS),
        "-f", str(csv_path),
        "-v",  # prints every window ("Pass [n] ..."), which _salvage_windows falls back on
    ]  # fmt: skip


def parse_csv(path: Path) -> dict[str, str]:
    """The first data row of perf_analyzer's CSV, as column -> text."""
    with path.open(newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if (row.get("Concurrency") or "").strip().isdigit()]
    if not rows:
        raise ValueError(f"no data row in {path}")
    return rows[0]


def _fill_from_row(result: PerfRun, row: dict[str, str]) -> None:
    """Throughput, client latency percentiles and the server-side breakdown (CSV times are in µs)."""
    result.infer_per_s = float(row["Inferences/Second"])
    result.latency_ms = {f"p{p}": float(row[f"p{p} latency"]) / 1e3 for p in PERCENTILES if row.get(f"p{p} latency")}
    result.server_ms = {col: float(row[col]) / 1e3 for col in SERVER_COLUMNS if row.get(col)}


def _error_text(output: str, returncode: int) -> str:
    """The informative part of perf_analyzer's output: lines mentioning errors, else the last lines."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    flagged = [ln for ln in lines if any(w in ln.lower() for w in ("error", "fail", "unable", "invalid"))]
    return f"exit {returncode}: " + " | ".join((flagged or lines)[-3:])[:400]


def _run_once(result: PerfRun, stem: Path, interval_ms: int, cmd: list[str]) -> PerfRun:
    csv_path = stem.with_suffix(".csv")
    csv_path.unlink(missing_ok=True)
    result.command, result.error = cmd, None
    timeout = interval_ms / 1e3 * (MAX_TRIALS + 4) + 60
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    stem.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        result.error = _error_text(proc.stdout + proc.stderr, proc.returncode)
        return result
    try:
        _fill_from_row(result, parse_csv(csv_path))
    except (OSError, ValueError, KeyError) as err:
        result.error = f"unreadable CSV: {err}"
    return result


def _salvage_windows(result: PerfRun, log_path: Path) -> None:
    """After a run that never stabilised, use the median of its windows (p50 and throughput only)."""
    try:
        windows = PASS_LINE.findall(log_path.read_text())
    except OSError:
        return
    if not windows:
        return
    result.infer_per_s = statistics.median(float(rate) for rate, _ in windows)
    result.latency_ms = {"p50": statistics.median(float(p50) for _, p50 in windows) / 1e3}
    result.unstable_windows = len(windows)
    result.error = None


def run_perf(
    model: str,
    protocol: str,
    url: str,
    concurrency: int,
    interval_ms: int,
    out_dir: Path,
    extra: list[str] | None = None,
    name: str | None = None,
) -> PerfRun:
    """Run perf_analyzer, relaxing the stability bound once if the windows disagree too much to settle.

    Its full output is kept beside the CSV (<out_dir>/<name>.log, by default <model>_<protocol>_c<N>) for
    post-mortems.
    """
    stem = out_dir / (name or f"{model}_{protocol}_c{concurrency}")
    result = PerfRun(model, protocol, concurrency)
    for stability in STABILITY_STEPS:
        result.stability_percent = stability
        cmd = build_command(model, protocol, url, concurrency, interval_ms, stem.with_suffix(".csv"), stability)
        _run_once(result, stem, interval_ms, [*cmd, *(extra or [])])
        if result.error is None or "stable measurement" not in result.error:
            return result
    _salvage_windows(result, stem.with_suffix(".log"))
    return result
