"""The public entry point: :class:`Pipeline` runs the optimizer for one model file and returns what to serve.
A whole run is cached by (model bytes, samples, options, device, library versions), so a restart or a
re-upload of the same bytes is a file hash and a JSON read away from ready. Servers sharing the cache folder run
each key once: the first takes the key's build lock, the others wait for it and read its result."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from optimizers import custom_ops, engines, openvino
from optimizers.accuracy import Family
from optimizers.cache import Cache, cache_key
from optimizers.device import DeviceInfo, probe_device
from optimizers.errors import OptimizeError
from optimizers.modelinfo import analyze, sha256_file
from optimizers.options import OptimizeOptions
from optimizers.passes import ModelPass, default_passes
from optimizers.providers import TARGET_PROVIDERS
from optimizers.reference import TRAFFIC_SUFFIX, NoRunnableInputs, SessionProbe, build_reference, find_samples
from optimizers.report import Report, Step, summarize
from optimizers.runtime import NO_GUARD, DeviceGuard, SessionSpec
from optimizers.stages import OptimizationRun, Outcome
from optimizers.timing import Benchmark, OrtBenchmark, OrtThroughput, Throughput

log = logging.getLogger("optiserve.optimizers")

#: Bump when a change in this package changes what a run would select: old cached results then miss.
PIPELINE_VERSION = "4"
Progress = Callable[[str], None]
CACHE_RESULTS = ("hit", "miss", "waited")
"""How a run's result was found: in the cache, by optimizing (a miss), or in the cache after waiting for another
server (or thread) that was optimizing the same model."""


@dataclass(frozen=True)
class PipelineResult:
    """What to serve: the ONNX file (the original, or an artifact inside the cache folder), how to run it (the
    session spec the compile step chose: providers and their options, intra-op threads; ``SessionSpec()`` keeps
    the host's defaults), the precision family of the selected model (``fp32`` for the original; on TensorRT an
    ``fp16`` model needs the FP16 flag), and the report."""

    model_path: Path
    session: SessionSpec
    family: Family
    summary: Report
    """The report, typed."""

    @property
    def report(self) -> dict[str, Any]:
        """The report as the JSON-able dict the server returns (``GET .../optimization``) and the CLI writes."""
        return self.summary.model_dump(mode="json")


class StoredResult(BaseModel):
    """A whole run as the result cache keeps it (``results/<key>.json``)."""

    artifact: str | None = None
    """The selected artifact's cache key; None for the original."""
    session: SessionSpec
    family: Family
    report: Report


def library_versions() -> dict[str, str]:
    """Versions whose change invalidates artifacts and results (a new quantizer or optimizer writes different
    graphs; a new OpenVINO runs them differently)."""
    import numpy
    import onnx
    import onnxruntime

    return {
        "optimizers": PIPELINE_VERSION,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "openvino": openvino.availability().version,
    }


class Pipeline:
    """Optimizes model files for this device. Thread-safe: the server may run one per loading model.
    ``device_guard`` wraps every piece of the optimizer's GPU work (see :data:`optimizers.runtime.DeviceGuard`);
    a host that captures CUDA graphs must pass one."""

    def __init__(
        self,
        cache_dir: Path,
        cache_max_bytes: int | None = None,
        device: DeviceInfo | None = None,
        *,
        passes: list[ModelPass[Any]] | None = None,
        benchmark: Benchmark | None = None,
        device_guard: DeviceGuard = NO_GUARD,
        throughput: Throughput | None = None,
    ) -> None:
        self.cache = Cache(Path(cache_dir), cache_max_bytes)
        self.device = device if device is not None else probe_device()
        self.passes = passes if passes is not None else default_passes()
        self.benchmark = benchmark
        self.throughput = throughput
        self.device_guard = device_guard
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    def cache_counts(self) -> dict[str, int]:
        """Whole-run results by how they were found (hit, miss, waited) since this pipeline was built: a miss
        is a run of the optimizer, so with a shared cache a fleet should show one miss per model."""
        with self._counts_lock:
            return {result: self._counts[result] for result in CACHE_RESULTS}

    def run(
        self,
        model_path: Path,
        options: OptimizeOptions | None = None,
        progress: Progress | None = None,
        *,
        name: str = "",
        version: str = "",
    ) -> PipelineResult:
        """Optimize ``model_path`` (blocking: call it from a worker thread). Raises :class:`OptimizeError` for
        a wrong request (bad samples file, a target this machine lacks); a failing pass is only reported."""
        started = time.monotonic()
        model_path = Path(model_path)
        options = options or OptimizeOptions()
        notify = progress or _ignore
        label = name or model_path.stem
        if options.precision == "none":
            return self._disabled(model_path, options, label, version, started)
        self._check_target(options)
        samples = find_samples(model_path, options.samples_path)
        model_sha = sha256_file(model_path)
        libraries = library_versions()
        key = self._result_key(model_sha, samples, options, libraries)
        # A server's traffic sample is its own: servers sharing the cache meet on the key without it.
        fleet_key = self._fleet_key(model_path, model_sha, samples, options, libraries) or key
        cached = self._shared(key, fleet_key, model_path, label, version, started)
        if cached is not None:
            notify("optimize: cache hit")
            return cached
        waiting = f"optimize: waiting for another server optimizing the same model (lock {fleet_key[:12]})"
        with self.cache.build_lock(fleet_key, on_wait=lambda: notify(waiting)) as waited:
            # Another server may have stored it since the miss above, or while we waited for its lock.
            cached = self._shared(key, fleet_key, model_path, label, version, started, waited=waited)
            if cached is not None:
                notify("optimize: cache hit" + (" after waiting for another server" if waited else ""))
                return cached
            outcome = self._optimize(model_path, model_sha, options, samples, notify, label, version, libraries)
            outcome.report.summary = outcome.report.summary or summarize(outcome.report)
            outcome.report.duration_s = round(time.monotonic() - started, 3)
            self._store(key, outcome)
            if fleet_key != key:  # shared before the lock is released, so a server waiting for it finds it
                self._share(key, fleet_key)
        self._count("miss")
        notify(f"optimize: done, serving {outcome.report.selected}")
        log.info("optimized %s in %.2fs: %s", label, outcome.report.duration_s, outcome.report.selected)
        return _result(outcome)

    def lookup(
        self, model_path: Path, options: OptimizeOptions | None = None, *, name: str = "", version: str = ""
    ) -> PipelineResult | None:
        """What :meth:`run` would return without optimizing anything: the cached result (or the disabled
        pipeline's, for ``precision: none``); None when only a real run can tell. A file hash and a JSON read,
        so a server can decide before a version is READY whether it must serve the original first."""
        started = time.monotonic()
        model_path = Path(model_path)
        options = options or OptimizeOptions()
        label = name or model_path.stem
        if options.precision == "none":
            return self._disabled(model_path, options, label, version, started)
        self._check_target(options)
        samples = find_samples(model_path, options.samples_path)
        key = self._result_key(sha256_file(model_path), samples, options, library_versions())
        return self._from_cache(key, model_path, label, version, started)

    def _share(self, key: str, other: str) -> bool:
        """Store the result under ``key`` under ``other`` too, unless ``other`` has a result of its own."""
        stored = self.cache.get_result(key)
        if stored is None or self.cache.get_result(other) is not None:
            return False
        self.cache.put_result(other, stored)
        return True

    def share_result(self, model_path: Path, ran: OptimizeOptions, options: OptimizeOptions) -> bool:
        """Let :meth:`lookup` with ``options`` answer with the cached result of a run with ``ran`` (the same model,
        options that differ only in ``samples_path``: a server's sample of real requests, deleted after the run),
        unless ``options`` has a result of its own. A restart then serves the variant proven on real traffic at
        once, and no request data is kept for it. Call it while ``ran``'s samples file still exists."""
        model_path = Path(model_path)
        model_sha, libraries = sha256_file(model_path), library_versions()
        ran_key = self._result_key(model_sha, find_samples(model_path, ran.samples_path), ran, libraries)
        key = self._result_key(model_sha, find_samples(model_path, options.samples_path), options, libraries)
        return self._share(ran_key, key)

    def pending(
        self, model_path: Path, options: OptimizeOptions | None = None, *, name: str = "", version: str = ""
    ) -> PipelineResult:
        """The original model, served while a run has not finished: a report with no steps yet."""
        options = options or OptimizeOptions()
        report = self._new_report(options, name or Path(model_path).stem, version)
        report.selected = "original"
        report.reference = {"source": "none", "count": 0, "note": "the optimizer has not finished yet"}
        report.summary = "the optimizer has not finished yet: serving the original"
        return PipelineResult(Path(model_path), SessionSpec(), "fp32", report)

    def _result_key(
        self, model_sha: str, samples: Path | None, options: OptimizeOptions, libraries: dict[str, str]
    ) -> str:
        return cache_key(
            kind="result",
            pipeline=PIPELINE_VERSION,
            model=model_sha,
            samples=sha256_file(samples) if samples else None,
            options=options.cache_dict(),
            device=self.device.fingerprint,
            libraries=libraries,
            passes=[p.name for p in self.passes],
        )

    def _optimize(
        self,
        model_path: Path,
        model_sha: str,
        options: OptimizeOptions,
        samples: Path | None,
        notify: Progress,
        label: str,
        version: str,
        libraries: dict[str, str],
    ) -> Outcome:
        report = self._new_report(options, label, version)
        if custom_ops.uses_custom_ops(model_path):
            return self._unchanged(model_path, report, custom_ops.OPTIMIZER_SKIP)
        info = analyze(model_path)
        if info.external_data or not info.inputs:
            why = "weights in external data files are not supported yet" if info.inputs else "model has no inputs"
            return self._unchanged(model_path, report, why)
        batch_dim = options.max_batch_size > 0 and info.batch_dynamic
        probe = SessionProbe(model_path)
        try:
            reference = build_reference(
                info,
                samples,
                options.reference_samples,
                batch_dim,
                probe=probe,
                config_shapes=options.input_shapes,
            )
        except NoRunnableInputs as exc:
            report.reference = exc.summary()
            return self._unchanged(model_path, report, str(exc))
        finally:
            probe.close()
        report.reference = reference.summary()
        run = OptimizationRun(
            cache=self.cache,
            device=self.device,
            passes=self.passes,
            benchmark=self.benchmark or OrtBenchmark(options.time_budget_s, guard=self.device_guard),
            model_path=model_path,
            model_sha=model_sha,
            info=info,
            options=options,
            reference=reference,
            report=report,
            progress=notify,
            libraries=libraries,
            guard=self.device_guard,
            throughput=self.throughput or OrtThroughput(options.time_budget_s),
        )
        try:
            return run.execute()
        except OptimizeError:
            raise
        except Exception as exc:  # the original itself fails on the reference inputs, or a bug: serve as is
            log.warning("optimizing %s failed; serving the original", label, exc_info=True)
            report.steps = []
            return self._unchanged(model_path, report, f"optimization failed: {type(exc).__name__}: {exc}")

    # ---- cache ---------------------------------------------------------------------------------
    def _fleet_key(
        self,
        model_path: Path,
        model_sha: str,
        samples: Path | None,
        options: OptimizeOptions,
        libraries: dict[str, str],
    ) -> str | None:
        """For a run on a server's sample of its traffic: the key of the same model and options without it, which
        every server sharing the cache computes alike (see :meth:`share_result`); None for any other run."""
        if samples is None or not samples.name.endswith(TRAFFIC_SUFFIX):
            return None
        base = options.model_copy(update={"samples_path": None})
        return self._result_key(model_sha, find_samples(model_path, None), base, libraries)

    def _shared(
        self,
        key: str,
        fleet_key: str,
        model_path: Path,
        label: str,
        version: str,
        started: float,
        *,
        waited: bool = False,
    ) -> PipelineResult | None:
        """The result under this run's own key, else (a traffic run) one another server proved on its traffic."""
        cached = self._from_cache(key, model_path, label, version, started, waited=waited)
        if cached is not None or fleet_key == key:
            return cached
        stored = self.cache.get_result(fleet_key)
        if stored is None or stored.get("report", {}).get("reference", {}).get("source") != "traffic":
            return None  # a result checked on generated inputs does not stand in for a check on real requests
        return self._from_cache(fleet_key, model_path, label, version, started, waited=waited)

    def _count(self, result: str) -> None:
        with self._counts_lock:
            self._counts[result] += 1

    def _from_cache(
        self, key: str, model_path: Path, label: str, version: str, started: float, *, waited: bool = False
    ) -> PipelineResult | None:
        data = self.cache.get_result(key)
        if data is None:
            return None
        try:
            stored = StoredResult.model_validate(data)
        except ValidationError:  # written by an older version of this package: recompute (artifacts still hit)
            log.info("optimizer cache entry %s has an older layout; optimizing %s again", key[:12], label)
            return None
        path = model_path
        if stored.artifact:
            hit = self.cache.get_artifact(stored.artifact)
            if hit is None:  # evicted since: recompute
                return None
            path = hit[0]
        duration_s = round(time.monotonic() - started, 3)
        how = "waited" if waited else "hit"
        report = stored.report.model_copy(
            update={"model": label, "version": version, "cache_hit": True, "cache": how, "duration_s": duration_s}
        )
        self._count(how)
        log.info("optimizer cache %s for %s: serving %s", how, label, report.selected)
        return PipelineResult(path, stored.session, stored.family, report)

    def _store(self, key: str, outcome: Outcome) -> None:
        stored = StoredResult(
            artifact=outcome.artifact_key, session=outcome.session, family=outcome.family, report=outcome.report
        )
        self.cache.put_result(key, stored.model_dump(mode="json"))
        self.cache.evict(keep=[outcome.model_path, self.cache.results / f"{key}.json"])

    # ---- reports without a run -----------------------------------------------------------------
    def _new_report(self, options: OptimizeOptions, label: str, version: str) -> Report:
        return Report(
            model=label,
            version=version,
            device=self.device.summary(),
            target=options.target,
            precision=options.precision,
            notes=engines.provider_notes(options.execution_providers, self.device),
        )

    def _unchanged(self, model_path: Path, report: Report, reason: str) -> Outcome:
        names = [p.name for p in self.passes] + [e.name for e in engines.candidates(report.target)] + ["compile"]
        report.steps = [Step(name=name, reason=reason) for name in names]
        report.reference = report.reference or {"source": "none", "count": 0, "note": reason}
        report.selected = "original"
        report.summary = summarize(report, reason)
        return Outcome(model_path, None, SessionSpec(), "fp32", report)

    def _disabled(
        self, model_path: Path, options: OptimizeOptions, label: str, version: str, started: float
    ) -> PipelineResult:
        report = self._new_report(options, label, version)
        outcome = self._unchanged(model_path, report, "precision none: the optimizer is off for this model")
        report.duration_s = round(time.monotonic() - started, 3)
        return _result(outcome)

    def _check_target(self, options: OptimizeOptions) -> None:
        needed = TARGET_PROVIDERS[options.target][0]
        if needed not in self.device.providers:
            raise OptimizeError(
                f"target {options.target}: onnxruntime's {needed} is not available here "
                f"(have {', '.join(self.device.providers)}); install onnxruntime-gpu on a GPU machine or use target cpu"
            )


def _result(outcome: Outcome) -> PipelineResult:
    return PipelineResult(outcome.model_path, outcome.session, outcome.family, outcome.report)


def _ignore(_message: str) -> None:
    """The default progress callback."""
