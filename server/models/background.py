"""Background optimization (``--optimize-mode background``): a version serves its original model as soon as it
is READY, the optimizer runs later on a worker thread (one at a time per server, at lower priority), and its
choice is swapped in atomically under the model's lock. A reload, unload or shutdown cancels what is pending."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from optimizers import OptimizeError, PipelineResult
from optimizers.runtime import SessionSpec
from server.errors import LoadFailed
from server.metrics import ServerMetrics
from server.models.entry import ModelEntry, ModelState, VersionStatus
from server.models.loader import PendingOptimization, Progress, VersionLoader, phase_fields, phase_of
from server.models.threads import in_daemon_thread, lower_thread_priority
from server.models.traffic import TrafficSamples, TrafficSampling
from server.models.version import ModelVersion
from server.settings import Settings

log = logging.getLogger("optiserve.models")
T = TypeVar("T")
_ORIGINAL_SESSION = SessionSpec()
Retire = Callable[[dict[int, ModelVersion]], Awaitable[None]]


class BackgroundOptimizer:
    """The background optimizations of one server: which are pending, and the gate that runs one at a time."""

    def __init__(
        self, loader: VersionLoader, settings: Settings, metrics: ServerMetrics | None, retire: Retire
    ) -> None:
        self.loader = loader
        self.settings = settings
        self.metrics = metrics
        self._retire = retire
        self._gate = threading.Lock()  # one background optimization at a time per server
        self._tasks: dict[tuple[str, int], tuple[asyncio.Task[None], threading.Event]] = {}
        self.traffic = TrafficSampling(settings)

    @property
    def pending(self) -> list[tuple[str, int]]:
        """(model, version) of every optimization waiting or running."""
        return list(self._tasks)

    def start(self, entry: ModelEntry, built: dict[int, ModelVersion], started: float) -> None:
        """Record time to ready; versions serving their original model get a background optimization (one
        server-wide at a time); the rest are already served as the optimizer chose."""
        self.cancel(entry.name)  # a reload replaces what an older load was still optimizing
        elapsed = time.monotonic() - started
        for number, served in built.items():
            self._gauge("time_to_ready", served, elapsed)
            if served.pending is None:
                self._gauge("time_to_optimized", served, elapsed)
                continue
            cancelled = threading.Event()
            self.traffic.attach(served, served.pending)  # its requests from now on may become the reference
            task = asyncio.get_running_loop().create_task(
                self._optimize_later(entry, served, served.pending, started, cancelled),
                name=f"optimize-{entry.name}-{number}",
            )
            self._tasks[(entry.name, number)] = (task, cancelled)
            task.add_done_callback(functools.partial(self._forget, (entry.name, number)))

    def _forget(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        current = self._tasks.get(key)
        if current is not None and current[0] is task:
            del self._tasks[key]

    def cancel(self, name: str) -> None:
        """Stop the background optimizations of a model (unload, reload, shutdown): a waiting one never runs,
        a running one finishes on its thread and its result is discarded."""
        for key in [k for k in self._tasks if k[0] == name]:
            task, cancelled = self._tasks.pop(key)
            cancelled.set()
            task.cancel()

    async def _optimize_later(
        self,
        entry: ModelEntry,
        served: ModelVersion,
        source: PendingOptimization,
        started: float,
        cancelled: threading.Event,
    ) -> None:
        """Optimize a READY version serving its original model (on a sample of its requests once enough came, or
        the wait for them ended), then swap the chosen variant in."""
        ready = time.monotonic()
        if self.settings.optimize_delay_s > 0:
            await asyncio.sleep(self.settings.optimize_delay_s)
        progress = self._optimizing(entry, served)
        deadline = ready + self.settings.optimize_traffic_wait_s
        traffic = await self.traffic.collect(served, source, deadline, progress)
        try:
            result = await in_daemon_thread(
                lambda: self._run_then_discard(cancelled, source, traffic, progress),
                name=f"optimize-{entry.name}",
            )
            if result is None or not self._still_served(entry, served):
                return
            rebuilt = None
            if result.model_path != source.model_path or result.session != _ORIGINAL_SESSION:
                # A fresh thread started from the loop's: the serving sessions (and their onnxruntime pools)
                # get normal priority, not the optimizer thread's lowered one.
                rebuilt = await in_daemon_thread(
                    lambda: self.loader.rebuild(source, result, served.stats),
                    name=f"rebuild-{entry.name}",
                    orphan=_close_version,
                )
        except asyncio.CancelledError:
            log.info("model %s version %s: background optimization cancelled", entry.name, served.version)
            raise
        except Exception as exc:  # the original keeps serving; the report says why
            log.warning("model %s version %s: background optimization failed: %s", entry.name, served.version, exc)
            served.report = {**served.report, **phase_fields("original"), "error": str(exc), "traffic": traffic.facts}
            served.pending = None
            if self._still_served(entry, served):
                entry.status[served.version] = VersionStatus(ModelState.READY)
            return
        await self._swap_in(entry, served, rebuilt, {**result.report, "traffic": traffic.facts}, started)

    def _run_then_discard(
        self, cancelled: threading.Event, source: PendingOptimization, traffic: TrafficSamples, progress: Progress
    ) -> PipelineResult | None:
        """The gated run (on its thread); the samples file goes when it ends, even if nobody awaits it any more."""
        try:
            return self._gated(cancelled, lambda: self._optimize(source, traffic, progress), lowered=True)
        finally:
            traffic.discard()

    def _optimize(self, source: PendingOptimization, traffic: TrafficSamples, progress: Progress) -> PipelineResult:
        """The pipeline on the traffic samples when there are any; where it refuses them (an input whose dtype the
        model does not take), on generated inputs."""
        if traffic.path is not None:
            sampled = traffic.source_for(source)
            try:
                result = self.loader.optimize(sampled, progress)
                self._share(sampled, source)
                return result
            except LoadFailed as exc:
                log.warning("model %s version %s: request samples refused: %s", source.name, source.version, exc)
                traffic.refused(str(exc))
        return self.loader.optimize(source, progress)

    def _share(self, sampled: PendingOptimization, source: PendingOptimization) -> None:
        """The next load of this model (a restart, a replica on the same cache) finds the result proven on traffic
        in its cache lookup, before READY, instead of serving the original and waiting for traffic again."""
        try:
            self.loader.pipeline().share_result(source.model_path, sampled.options, source.options)
        except (OSError, OptimizeError) as exc:  # the result still serves now; only the next load is slower
            log.warning("model %s version %s: result not shared with later loads: %s", source.name, source.version, exc)

    def _gated(self, cancelled: threading.Event, fn: Callable[[], T], *, lowered: bool = False) -> T | None:
        """Run ``fn`` under the server's optimizer gate unless cancelled while waiting for it (on a thread: the
        gate stays held until a running optimization really ends, even when nobody waits for it any more).
        ``lowered``: at --optimize-nice lower priority (this thread ends with the run), so serving keeps the CPU."""
        if lowered:
            lower_thread_priority(self.settings.optimize_nice)
        with self._gate:
            return None if cancelled.is_set() else fn()

    async def _swap_in(
        self,
        entry: ModelEntry,
        served: ModelVersion,
        rebuilt: ModelVersion | None,
        report: dict[str, Any],
        started: float,
    ) -> None:
        """Serve the optimizer's choice on the same (name, version), atomically; the replaced version drains
        (queued requests finish or are retried on the new one). A version no longer served is not resurrected."""
        number = served.version
        async with entry.lock:
            if not self._still_served(entry, served):
                log.info("model %s version %s: no longer served; optimized variant discarded", entry.name, number)
                if rebuilt is not None:
                    await asyncio.to_thread(rebuilt.close, 0)
                return
            phase = phase_of(str(report.get("selected", "original")))
            serving = rebuilt if rebuilt is not None else served
            full = {**report, **_served_facts(serving.report), **phase_fields(phase)}
            conversion = [s for s in served.report.get("steps", [])[:1] if s.get("name") == "convert"]
            if conversion:
                full["steps"] = conversion + list(full.get("steps", []))
            serving.report, serving.pending = full, None
            if rebuilt is not None:
                entry.served = {**entry.served, number: rebuilt}
            entry.status[number] = VersionStatus(ModelState.READY)
        elapsed = time.monotonic() - started
        self._gauge("time_to_optimized", served, elapsed)
        log.info(
            "model %s version %s %s %.2fs after its load began: serving %s",
            entry.name,
            number,
            phase,
            elapsed,
            report.get("selected", "original"),
        )
        if rebuilt is not None:
            await self._retire({number: served})

    @staticmethod
    def _still_served(entry: ModelEntry, served: ModelVersion) -> bool:
        return entry.served.get(served.version) is served

    def _optimizing(self, entry: ModelEntry, served: ModelVersion) -> Callable[[str], None]:
        """Progress of a background run: the report's ``step`` and the index reason, while the version serves."""

        def report(step: str) -> None:
            if self._still_served(entry, served):
                served.report = {**served.report, **phase_fields("optimizing", step)}
                entry.status[served.version] = VersionStatus(ModelState.READY, f"optimizing: {step}")

        return report

    def _gauge(self, which: str, served: ModelVersion, seconds: float) -> None:
        if self.metrics is not None and self.metrics.enabled:
            getattr(self.metrics, which).labels(served.name, str(served.version)).set(round(seconds, 3))


def _served_facts(report: dict[str, Any]) -> dict[str, Any]:
    """What the loader adds to the optimizer's report about the instances that really serve."""
    return {key: report[key] for key in ("instances", "warmup", "memory") if key in report}


def _close_version(version: ModelVersion) -> None:
    version.close(0)
