"""The in-process onnxruntime ceiling: what the same model file does with no server in the way.

Every server number is read against these, so they use the settings a server would want on this machine
(all cores for intra-op work, every graph optimization) and the same timing discipline: warm up, time a fixed
window, repeat three times and keep the median so one noisy window on a shared machine does not decide.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REPEATS = 3
WARMUP_S = 0.5
MIN_CALLS = 3  # a window always holds a few calls, even when one call outlasts it


@dataclass
class Point:
    """One measured operating point; latencies are per session.run call."""

    batch: int
    p50_ms: float
    p99_ms: float
    calls_per_s: float

    @property
    def samples_per_s(self) -> float:
        return self.calls_per_s * self.batch

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


def make_session(model_path: Path) -> ort.InferenceSession:
    """A CPU session configured the way a tuned server would run it."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def make_feed(session: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 inputs; symbolic dimensions (the batch) are set to `batch`."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in inp.shape]
        feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _run_window(session: ort.InferenceSession, feed: dict[str, np.ndarray], seconds: float) -> list[float]:
    """Call session.run back to back for `seconds`; return each call's latency in seconds."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        session.run(None, feed)
        end = time.perf_counter()
        latencies.append(end - start)
        if end >= deadline and len(latencies) >= MIN_CALLS:
            return latencies


def _summarise(batch: int, latencies: list[float]) -> Point:
    arr = np.asarray(latencies) * 1e3
    return Point(
        batch=batch,
        p50_ms=float(np.percentile(arr, 50)),
        p99_ms=float(np.percentile(arr, 99)),
        calls_per_s=len(latencies) / float(np.sum(latencies)),
    )


def measure_point(session: ort.InferenceSession, batch: int, seconds: float) -> Point:
    """Median over REPEATS windows of one batch size, after a warm-up."""
    feed = make_feed(session, batch)
    _run_window(session, feed, WARMUP_S)
    points = [_summarise(batch, _run_window(session, feed, seconds)) for _ in range(REPEATS)]
    return Point(
        batch=batch,
        p50_ms=statistics.median(p.p50_ms for p in points),
        p99_ms=statistics.median(p.p99_ms for p in points),
        calls_per_s=statistics.median(p.calls_per_s for p in points),
    )


def measure_model(model_path: Path, batches: list[int], seconds: float) -> dict[str, Any]:
    """Batch-1 latency plus a throughput sweep over `batches`; the best batch size is picked out."""
    session = make_session(model_path)
    sweep = [measure_point(session, b, seconds) for b in batches]
    latency = next(p for p in sweep if p.batch == 1) if 1 in batches else measure_point(session, 1, seconds)
    best = max(sweep, key=lambda p: p.samples_per_s)
    return {
        "latency": latency.as_dict(),
        "sweep": [p.as_dict() for p in sweep],
        "best": best.as_dict(),
        "intra_op_threads": os.cpu_count(),
    }
