"""Per-model-version statistics in Triton's shape (``/v2/models/{m}/stats``, gRPC ModelStatistics).

Updated from worker threads and the event loop, so every update takes one short lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.metrics import VersionMetrics


@dataclass
class Duration:
    """A count and a total in nanoseconds, Triton's ``StatisticDuration``."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        """Record ``count`` events taking ``ns`` nanoseconds in all."""
        self.count += count
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        """Triton's JSON form."""
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchDurations:
    """Compute durations of executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStats:
    """Counters for one served model version."""

    def __init__(self, metrics: VersionMetrics | None = None) -> None:
        self._lock = threading.Lock()
        self.metrics = metrics
        self.rejected = Duration()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.cache_hit = Duration()
        self.cache_miss = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchDurations] = {}

    def record_execution(
        self, batch_size: int, queue_ns: list[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One execution of ``batch_size`` samples serving ``len(queue_ns)`` requests. As in Triton, each
        request is charged the whole batch's compute time."""
        requests = len(queue_ns)
        with self._lock:
            self.inference_count += batch_size
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            self.queue.add(sum(queue_ns), requests)
            self.compute_input.add(input_ns * requests, requests)
            self.compute_infer.add(infer_ns * requests, requests)
            self.compute_output.add(output_ns * requests, requests)
            durations = self.batches.setdefault(batch_size, BatchDurations())
            durations.compute_input.add(input_ns)
            durations.compute_infer.add(infer_ns)
            durations.compute_output.add(output_ns)
        if self.metrics is not None:
            self.metrics.observe_execution(batch_size, queue_ns, input_ns, infer_ns, output_ns)

    def record_request(self, ok: bool, duration_ns: int, reason: str = "other") -> None:
        """One request finished, end to end inside the server (the data plane calls this once per request,
        whatever ended it). Rejections (queue full, queue timeout, shutting down, not ready yet) are counted
        apart from failures, as overload is not an error of the model."""
        with self._lock:
            if ok:
                self.success.add(duration_ns)
            elif reason == "rejected":
                self.rejected.add(duration_ns)
            else:
                self.fail.add(duration_ns)
        if self.metrics is not None:
            self.metrics.observe_request(None if ok else reason, duration_ns)

    def record_cache(self, hit: bool, ns: int) -> None:
        """One response cache lookup: a hit (``ns``: the lookup) or a miss (``ns``: the lookup and the insert
        after the backend answered), Triton's ``cache_hit``/``cache_miss``. A hit runs nothing, so, as in
        Triton, it counts in neither ``inference_count`` nor ``execution_count``."""
        with self._lock:
            (self.cache_hit if hit else self.cache_miss).add(ns)
        if self.metrics is not None:
            self.metrics.observe_cache(hit, ns)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` JSON."""
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_json(),
                    "fail": self.fail.to_json(),
                    "rejected": self.rejected.to_json(),
                    "queue": self.queue.to_json(),
                    "compute_input": self.compute_input.to_json(),
                    "compute_infer": self.compute_infer.to_json(),
                    "compute_output": self.compute_output.to_json(),
                    "cache_hit": self.cache_hit.to_json(),
                    "cache_miss": self.cache_miss.to_json(),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": d.compute_input.to_json(),
                        "compute_infer": d.compute_infer.to_json(),
                        "compute_output": d.compute_output.to_json(),
                    }
                    for size, d in sorted(self.batches.items())
                ],
            }
