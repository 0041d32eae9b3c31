"""Building one model version, in a worker thread: read and check the ONNX file, complete the config, run
the optimization pipeline (cached), then create one runtime session per instance and the batcher.

This is the "Loader: Repository -> optimizers.Pipeline -> Backend" box of the design; the ModelManager
decides *when* to build and swaps the result in atomically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from optimizers import (
    OptimizeError,
    OptimizeOptions,
    OptionsError,
    Pipeline,
    PipelineResult,
    Report,
    probe_device,
)
from optimizers.providers import CPU, Target, target_of
from server.backends import gpu
from server.backends.base import Backend
from server.backends.capture_lock import CUDA_CAPTURE
from server.backends.onnxruntime import OnnxRuntimeBackend, SessionConfig
from server.convert import convert_version, is_convertible
from server.errors import LoadFailed
from server.metrics import ServerMetrics
from server.models.batching import Batcher, BatchPolicy
from server.models.labels import load_labels
from server.models.memory import charge, files_bytes, measure_resident
from server.models.placement import (
    apply_session_spec,
    gpu_serving_available,
    instance_plan,
    instance_report,
    instances_open,
    thread_parameter,
)
from server.models.response_cache import ResponseCache
from server.models.stats import ModelStats
from server.models.version import ModelVersion
from server.models.warmup import warm_up
from server.repository.config import LoadedConfig, ModelConfig, complete_config, model_filename, tensor_specs
from server.repository.layout import Repository
from server.repository.modelfile import check_external_data
from server.settings import Settings

log = logging.getLogger("optiserve.loader")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class PendingOptimization:
    """A version's model as loaded and checked, with its completed config, instance plan and optimize options:
    all the optimizer needs to run later (in background mode) and the loader needs to rebuild the version."""

    name: str
    version: int
    model_path: Path
    options: OptimizeOptions
    config: ModelConfig
    plan: list[SessionConfig]
    conversion: dict[str, Any] | None = None


def phase_of(selected: str) -> str:
    """The report's phase once the optimizer has finished: a variant serves, or the original stays."""
    return "original" if selected == "original" else "optimized"


def phase_fields(phase: str, step: str = "") -> dict[str, str]:
    """``phase`` (optimizing | optimized | original) and ``step`` (the optimizer's step in progress)."""
    return {"phase": phase, "step": step if phase == "optimizing" else ""}


class VersionLoader:
    """Turns a version folder into a ready :class:`ModelVersion`."""

    def __init__(
        self,
        repository: Repository,
        settings: Settings,
        metrics: ServerMetrics | None,
        response_cache: ResponseCache | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.response_cache = response_cache
        self._pipeline: Pipeline | None = None
        self._pipeline_lock = threading.Lock()

    def build(self, name: str, version: int, loaded: LoadedConfig, progress: Progress) -> ModelVersion:
        """Everything from files on disk to a started batcher; raises LoadFailed with the reason. In background
        mode a cache miss serves the original model and leaves ``pending`` on the version for the manager."""
        started = time.monotonic()
        source = self._source(name, version, loaded, progress)
        optimized, background = self._first_choice(source, progress)
        built = self._assemble(source, optimized, started, phase="optimizing" if background else None)
        if self.metrics is not None:
            self.metrics.load_duration.labels(name).observe(time.monotonic() - started)
        if background:
            built.pending = source
        return built

    def _source(self, name: str, version: int, loaded: LoadedConfig, progress: Progress) -> PendingOptimization:
        """Read and check the version's model (converting a framework upload), complete its config, plan its
        instances and read its optimize options."""
        label = f"model {name!r} version {version}"
        version_dir = self.repository.version_dir(name, version)
        filename = model_filename(loaded.config)  # a plain name, never a path
        self.repository.check_tree(version_dir, label)  # nothing read here may resolve out of the repository
        model_path = version_dir / filename
        conversion: dict[str, Any] | None = None
        if not model_path.is_file() and is_convertible(version_dir):
            model_path, conversion = self._convert(version_dir, loaded, progress)
        if not model_path.is_file():
            raise LoadFailed(f"{label}: {filename} is missing")
        try:
            graph = onnx.load(str(model_path), load_external_data=False)
        except Exception as exc:
            raise LoadFailed(f"{label}: not a valid ONNX file ({exc})") from None
        check_external_data(graph, version_dir, label)
        config = complete_config(
            loaded, name, graph, self.settings.default_max_batch_size, gpu_serving_available(self.settings)
        )
        plan = instance_plan(config, self.settings)
        options = self._options(name, loaded, config, plan)
        return PendingOptimization(name, version, model_path, options, config, plan, conversion)

    def _first_choice(self, source: PendingOptimization, progress: Progress) -> tuple[PipelineResult, bool]:
        """What serves when the version becomes READY, and whether the optimizer still has to run afterwards:
        before_ready runs it now; background applies a cached result at once and otherwise serves the original."""
        mode = source.options.mode or self.settings.optimize_mode
        if mode == "before_ready":
            return self._run(source, progress), False
        try:
            cached = self.pipeline().lookup(
                source.model_path, source.options, name=source.name, version=str(source.version)
            )
        except OptimizeError as exc:
            raise LoadFailed(f"model {source.name!r} version {source.version}: {exc}") from None
        if cached is not None:
            progress("optimize: cache hit")
            self._record(source.name, cached.summary)
            return cached, False
        pending = self.pipeline().pending(
            source.model_path, source.options, name=source.name, version=str(source.version)
        )
        return pending, True

    def optimize(self, source: PendingOptimization, progress: Progress) -> PipelineResult:
        """The background run for a version that serves its original model (blocking: a worker thread)."""
        return self._run(source, progress)

    def rebuild(self, source: PendingOptimization, optimized: PipelineResult, stats: ModelStats) -> ModelVersion:
        """A new ModelVersion for the same (name, version) serving the optimizer's choice; it keeps the
        statistics of the version it replaces."""
        return self._assemble(source, optimized, time.monotonic(), stats=stats)

    def _assemble(
        self,
        source: PendingOptimization,
        optimized: PipelineResult,
        started: float,
        *,
        phase: str | None = None,
        stats: ModelStats | None = None,
    ) -> ModelVersion:
        """Sessions per instance and a started batcher for ``optimized``'s model and session spec."""
        name, version, config = source.name, source.version, source.config
        own_threads = bool(thread_parameter(config, "intra_op_thread_count"))  # the model's own setting wins
        plan = source.plan
        if optimized.session.instances and source.options.tune_instances:  # the count was the optimizer's to pick
            plan = instance_plan(config, self.settings, instances=optimized.session.instances)
        plan = apply_session_spec(plan, optimized.session, keep_threads=own_threads)
        plan = gpu.with_gpu_options(plan, config, self.settings, fp16=optimized.family == "fp16")
        selected = optimized.summary.selected
        labels = load_labels(config, self.repository.model_dir(name), self.repository)  # before any session
        reused_stats = stats is not None
        if stats is None:
            stats = ModelStats(self.metrics.for_version(name, str(version)) if self.metrics else None)
        label = f"model {name!r} version {version}"
        with measure_resident() as memory:  # what the sessions and their warmup keep, for the memory budget
            backends = _make_backends(f"{name}:{version}", optimized.model_path, plan)
            try:  # warmup on every instance (before the workers: CUDA graphs belong to their threads)
                warmup = warm_up(backends, config, self.repository.model_dir(name), self.repository, label=label)
            except BaseException:  # a failed model_warmup entry
                for backend in backends:
                    backend.unload()
                raise
        try:
            batcher = _make_batcher(f"{name}:{version}", config, backends, stats, self.settings)
        except BaseException:  # an instance not ready on its worker (graph capture)
            for backend in backends:
                backend.unload()
            raise
        file_bytes = files_bytes(self.repository.version_dir(name, version))
        resident = charge(memory.bytes, _size(optimized.model_path))  # the served file: the variant's, if one
        elapsed = time.monotonic() - started
        instances = instance_report(backends)
        log.info(
            "model %s version %s %s in %.2fs: %d instance(s) on %s, serving %s%s",
            name,
            version,
            "rebuilt" if reused_stats else "ready",
            elapsed,
            len(backends),
            ", ".join(sorted({str(i["device"]) for i in instances})),
            selected,
            "; optimizing in the background" if phase == "optimizing" else "",
        )
        report = {
            **optimized.report,
            "instances": instances,
            "warmup": warmup,
            "memory": {"resident_bytes": resident, "measured_bytes": memory.bytes, "files_bytes": file_bytes},
            **phase_fields(phase or phase_of(selected)),
        }
        return ModelVersion(
            name,
            version,
            config,
            tensor_specs(config, inputs=True),
            tensor_specs(config, inputs=False),
            backends,
            batcher,
            stats,
            variant=selected,
            report=_with_conversion(report, source.conversion),
            labels=labels,
            response_cache=self._response_cache(name, config),
            memory_bytes=resident,
        )

    def _response_cache(self, name: str, config: ModelConfig) -> ResponseCache | None:
        """The server's response cache for a version whose config sets ``response_cache { enable: true }``."""
        if self.response_cache is None:
            return None
        return self.response_cache.for_model(name, bool(config.response_cache.enable))

    def _convert(self, version_dir: Path, loaded: LoadedConfig, progress: Progress) -> tuple[Path, dict[str, Any]]:
        """A framework model (torch.export, SavedModel, XGBoost, LightGBM) becomes guarded ONNX, cached next
        to the optimizer's artifacts; the original upload stays in the version folder."""
        progress("converting to ONNX")
        explicit_batch = "max_batch_size" in loaded.explicit
        result = convert_version(
            version_dir,
            max_batch_size_hint=int(loaded.config.max_batch_size) if explicit_batch else None,
            cache_dir=self.settings.cache_dir / "converted",
            samples=None,
        )
        return result.onnx_path, result.report_step

    def _options(
        self, name: str, loaded: LoadedConfig, config: ModelConfig, plan: list[SessionConfig]
    ) -> OptimizeOptions:
        """The version's optimize options: its config's block (or the server's default precision) plus what the
        server knows (target, batch sizes)."""
        block = loaded.optimize if loaded.optimize is not None else {"precision": self.settings.default_precision}
        try:
            return OptimizeOptions.from_config_dict(
                block,
                target=_target(plan),
                max_batch_size=int(config.max_batch_size),
                preferred_batch_sizes=[int(s) for s in config.dynamic_batching.preferred_batch_size],
                input_shapes=_config_shapes(config, explicit_inputs="input" in loaded.explicit),
                tune_instances=_target(plan) == "cpu" and instances_open(config, loaded.explicit, self.settings),
                execution_providers=tuple(self.settings.execution_providers),
            )
        except OptionsError as exc:
            raise LoadFailed(f"model {name!r}: {exc}") from None

    def _run(self, source: PendingOptimization, progress: Progress) -> PipelineResult:
        """Run the optimization pipeline for this version (or skip it), recording its steps as metrics."""
        name, version = source.name, source.version
        try:
            result = self.pipeline().run(source.model_path, source.options, progress, name=name, version=str(version))
        except OptimizeError as exc:
            raise LoadFailed(f"model {name!r} version {version}: {exc}") from None
        self._record(name, result.summary)
        return result

    def pipeline(self) -> Pipeline:
        """The optimizer, built on first use (probing the device takes a moment)."""
        with self._pipeline_lock:
            if self._pipeline is None:
                self._pipeline = Pipeline(
                    cache_dir=self.settings.cache_dir,
                    cache_max_bytes=self.settings.cache_max_bytes,
                    device=probe_device(),
                    device_guard=CUDA_CAPTURE.shared,  # the optimizer's GPU runs must not break a graph capture
                )
            return self._pipeline

    def _record(self, name: str, report: Report) -> None:
        if self.metrics is None:
            return
        if report.cache_hit:
            self.metrics.cache_hits.labels(name).inc()
        for step in report.steps:
            self.metrics.optimization_step.labels(name, step.name, step.status).observe(step.duration_s)


def _with_conversion(report: dict[str, Any], conversion: dict[str, Any] | None) -> dict[str, Any]:
    """The conversion, when there was one, is the report's first step."""
    if conversion is None:
        return report
    return {**report, "steps": [conversion, *report.get("steps", [])]}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _target(plan: list[SessionConfig]) -> Target:
    """The optimizer's target: the best provider of the first instance."""
    return target_of(plan[0].providers if plan else (CPU,))


def _make_batcher(
    label: str, config: ModelConfig, backends: list[Backend], stats: ModelStats, settings: Settings
) -> Batcher:
    batching = config.max_batch_size if config.HasField("dynamic_batching") else 0
    policy = BatchPolicy.from_config(config, settings.default_max_queue_size)
    batcher = Batcher(
        label,
        [b.infer for b in backends],
        stagers=[b.staging_buffer for b in backends],
        preparers=[b.prepare for b in backends],
        inline_below_ns=settings.inline_compute_us * 1000 if all(b.any_thread for b in backends) else 0,
        max_batch_size=batching,
        max_queue_size=policy.default_queue.max_queue_size,
        stats=stats,
        policy=policy,
    )
    batcher.start()
    return batcher


def _make_backends(label: str, model_path: Path, plan: list[SessionConfig]) -> list[Backend]:
    backends: list[Backend] = []
    try:
        for index, session_config in enumerate(plan):
            backend: Backend = OnnxRuntimeBackend(f"{label}#{index}", model_path, session_config)
            backend.load()
            backends.append(backend)
    except BaseException:
        for backend in backends:
            backend.unload()
        raise
    return backends


def _config_shapes(config: ModelConfig, *, explicit_inputs: bool) -> dict[str, list[int]]:
    """The shapes the user gave per input, for the optimizer's first reference guess: a ``model_warmup``
    entry's dims (a shape the user says runs), else the config's own ``dims``. Dims that auto-completion copied
    from the graph add nothing (and would only change the cache key), so they are left out."""
    shapes = {tensor.name: [int(d) for d in tensor.dims] for tensor in config.input} if explicit_inputs else {}
    known = {tensor.name for tensor in config.input}
    for warmup in config.model_warmup:
        for name, data in warmup.inputs.items():
            if name in known and data.dims:
                shapes[name] = [int(d) for d in data.dims]
    return shapes
