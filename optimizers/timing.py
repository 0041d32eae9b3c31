"""Time a candidate on this machine: median latency per batch size within a wall-time budget. The
benchmark is a plain callable so tests (and the GPU-less CI) can inject measured-elsewhere numbers."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from optimizers.runtime import NO_GUARD, DeviceGuard, Feed, SessionSpec, device_work, open_session

Latencies = dict[int, float]  # batch size -> median latency in ms


class Benchmark(Protocol):
    """Times ``model_path`` opened with ``spec`` on each feed (keyed by batch size)."""

    def __call__(self, label: str, model_path: Path, spec: SessionSpec, feeds: Mapping[int, Feed]) -> Latencies: ...


class OrtBenchmark:
    """onnxruntime timing: one warm-up run, then runs until ``min_runs`` are done or the budget is spent
    (at least one measured run; session creation is not counted: TensorRT builds engines there). GPU work runs
    inside ``guard`` (see :data:`optimizers.runtime.DeviceGuard`)."""

    def __init__(
        self, budget_s: float = 1.5, min_runs: int = 5, max_runs: int = 200, *, guard: DeviceGuard = NO_GUARD
    ) -> None:
        self.budget_s = budget_s
        self.min_runs = min_runs
        self.max_runs = max_runs
        self.guard = guard

    def __call__(self, label: str, model_path: Path, spec: SessionSpec, feeds: Mapping[int, Feed]) -> Latencies:
        session = open_session(model_path, spec, self.guard)
        share = self.budget_s / max(1, len(feeds))
        try:
            return {batch: self._median_ms(session, spec, feed, share) for batch, feed in feeds.items()}
        finally:
            with device_work(spec, self.guard):  # freeing a GPU session's memory is GPU work too
                del session

    def _median_ms(self, session: object, spec: SessionSpec, feed: Feed, budget_s: float) -> float:
        run = session.run  # type: ignore[attr-defined]
        deadline = time.perf_counter() + budget_s
        with device_work(spec, self.guard):
            run(None, feed)
        samples: list[float] = []
        while len(samples) < self.max_runs:
            with device_work(spec, self.guard):  # taken before the clock starts
                started = time.perf_counter()
                run(None, feed)
                samples.append((time.perf_counter() - started) * 1000)
            if started > deadline or (len(samples) >= self.min_runs and time.perf_counter() > deadline):
                break
        return statistics.median(samples)


class Throughput(Protocol):
    """Aggregate samples/s of ``instances`` sessions of ``model_path`` opened with ``spec``, each driven by its
    own thread running ``feed`` (``batch`` samples) back to back, as the server's workers run under load."""

    def __call__(
        self, label: str, model_path: Path, spec: SessionSpec, feed: Feed, batch: int, instances: int
    ) -> float: ...


class OrtThroughput:
    """onnxruntime under concurrent load, CPU only: open every session and run each once (warm-up, not
    counted), start the drivers together, count the batches finished in a fixed ``window_s`` (the runs still in
    flight at the end are waited for, and counted with the time they took)."""

    def __init__(self, window_s: float = 1.5) -> None:
        self.window_s = window_s

    def __call__(
        self, label: str, model_path: Path, spec: SessionSpec, feed: Feed, batch: int, instances: int
    ) -> float:
        sessions = [open_session(model_path, spec) for _ in range(instances)]
        for session in sessions:
            session.run(None, feed)
        counts = [0] * instances
        errors: list[BaseException] = []
        stop = threading.Event()
        start = threading.Barrier(instances + 1)

        def drive(index: int) -> None:
            run = sessions[index].run
            start.wait()
            try:
                while not stop.is_set():
                    run(None, feed)
                    counts[index] += 1
            except BaseException as exc:  # re-raised on the caller's thread: a failed run is no timing
                errors.append(exc)
                stop.set()

        drivers = [threading.Thread(target=drive, args=(i,), name=f"timing:{label}:{i}") for i in range(instances)]
        for driver in drivers:
            driver.start()
        start.wait()
        began = time.perf_counter()
        stop.wait(self.window_s)
        stop.set()
        for driver in drivers:
            driver.join()
        elapsed = time.perf_counter() - began
        if errors:
            raise errors[0]
        return sum(counts) * batch / elapsed if elapsed > 0 else 0.0


def throughput(latencies: Mapping[int, float], batch: int) -> float:
    """Samples per second at ``batch`` (0 when not measured)."""
    latency = latencies.get(batch)
    return batch * 1000.0 / latency if latency else 0.0
