"""Building one model version, in a worker thread: read and check the ONNX file, complete the config, run
the optimization pipeline (cached), then create one runtime session per instance and the batcher.

This is the "Loader: Repository -> optimizers.Pipeline -> Backend" box of the design; the ModelManager
decides *when* to build and swaps the result in atomically.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
from tritonclient.grpc import model_config_pb2 as mc

from optimizers import (
    OptimizeError,
    OptimizeOptions,
    OptionsError,
    Pipeline,
    PipelineResult,
    Report,
    SessionSpec,
    probe_device,
)
from optimizers.providers import CPU, Target, target_of, uses_gpu
from server.backends import gpu
from server.backends.base import Backend
from server.backends.capture_lock import CUDA_CAPTURE
from server.backends.onnxruntime import OnnxRuntimeBackend, SessionConfig, choose_providers
from server.batching import Batcher, BatchPolicy
from server.convert import convert_version, is_convertible
from server.errors import LoadFailed
from server.metrics import ServerMetrics
from server.repository.config import (
    MAX_INSTANCES,
    LoadedConfig,
    ModelConfig,
    ModelInstanceGroup,
    complete_config,
    model_filename,
    tensor_specs,
    thread_count,
)
from server.repository.layout import Repository
from server.repository.modelfile import check_external_data
from server.served import ModelVersion
from server.settings import Settings
from server.stats import ModelStats

log = logging.getLogger("optiserve.loader")
Progress = Callable[[str], None]


class VersionLoader:
    """Turns a version folder into a ready :class:`ModelVersion`."""

    def __init__(self, repository: Repository, settings: Settings, metrics: ServerMetrics | None) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self._pipeline: Pipeline | None = None
        self._pipeline_lock = threading.Lock()

    def build(self, name: str, version: int, loaded: LoadedConfig, progress: Progress) -> ModelVersion:
        """Everything from files on disk to a started batcher; raises LoadFailed with the reason."""
        started = time.monotonic()
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
        optimized = self._optimize(name, version, model_path, loaded, config, plan, progress)
        own_threads = bool(thread_parameter(config, "intra_op_thread_count"))  # the model's own setting wins
        plan = apply_session_spec(plan, optimized.session, keep_threads=own_threads)
        plan = gpu.with_gpu_options(plan, config, self.settings, fp16=optimized.family == "fp16")
        selected = optimized.summary.selected
        backends = _make_backends(f"{name}:{version}", optimized.model_path, plan)
        stats = ModelStats(self.metrics.for_version(name, str(version)) if self.metrics else None)
        try:
            batcher = _make_batcher(f"{name}:{version}", config, backends, stats, self.settings)
        except BaseException:  # an instance could not get ready on its worker thread (CUDA graph capture)
            for backend in backends:
                backend.unload()
            raise
        elapsed = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.load_duration.labels(name).observe(elapsed)
        instances = instance_report(backends)
        log.info(
            "model %s version %s ready in %.2fs: %d instance(s) on %s, serving %s",
            name,
            version,
            elapsed,
            len(backends),
            ", ".join(sorted({str(i["device"]) for i in instances})),
            selected,
        )
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
            report=_with_conversion({**optimized.report, "instances": instances}, conversion),
        )

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

    def _optimize(
        self,
        name: str,
        version: int,
        model_path: Path,
        loaded: LoadedConfig,
        config: ModelConfig,
        plan: list[SessionConfig],
        progress: Progress,
    ) -> PipelineResult:
        """Run the optimization pipeline for this version (or skip it), recording its steps as metrics."""
        block = loaded.optimize if loaded.optimize is not None else {"precision": self.settings.default_precision}
        try:
            options = OptimizeOptions.from_config_dict(
                block,
                target=_target(plan),
                max_batch_size=int(config.max_batch_size),
                preferred_batch_sizes=[int(s) for s in config.dynamic_batching.preferred_batch_size],
            )
        except OptionsError as exc:
            raise LoadFailed(f"model {name!r}: {exc}") from None
        try:
            result = self.pipeline().run(model_path, options, progress, name=name, version=str(version))
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


def gpu_serving_available(settings: Settings) -> bool:
    """A GPU execution provider is installed (and allowed by the settings) and a GPU is visible."""
    providers = choose_providers(settings.execution_providers, gpu=True)
    return uses_gpu(providers) and gpu.visible_gpu_count() > 0


def _with_conversion(report: dict[str, Any], conversion: dict[str, Any] | None) -> dict[str, Any]:
    """The conversion, when there was one, is the report's first step."""
    if conversion is None:
        return report
    return {**report, "steps": [conversion, *report.get("steps", [])]}


def _target(plan: list[SessionConfig]) -> Target:
    """The optimizer's target: the best provider of the first instance."""
    return target_of(plan[0].providers if plan else (CPU,))


def apply_session_spec(
    plan: list[SessionConfig], spec: SessionSpec, *, keep_threads: bool = False
) -> list[SessionConfig]:
    """Apply how the optimizer's compile step chose to run the model, keeping instances x threads <= cores
    (``keep_threads``: the model set its own intra-op threads, and they win). Its providers go to the instances
    of their kind only: a GPU choice never lands on a CPU instance, nor a CPU one on a GPU."""
    threads = None if keep_threads else spec.intra_op_threads
    if threads is None and not spec.chooses_providers:
        return plan
    cpu_instances = max(1, sum(1 for p in plan if not uses_gpu(p.providers)))
    budget = max(1, available_cpus() // cpu_instances)
    gpu_choice = uses_gpu(spec.providers)
    updated: list[SessionConfig] = []
    for session in plan:
        if threads is not None:
            session = replace(session, intra_op_threads=max(1, min(threads, budget)))
        if spec.chooses_providers and session.wants_gpu == gpu_choice:
            options = {name: dict(values) for name, values in spec.provider_options.items()}
            session = replace(session, providers=spec.providers, provider_options=options)
        updated.append(session)
    return updated


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


def available_cpus() -> int:
    """CPUs this process may use: the cgroup quota (a container's CPU limit) or the affinity mask, which
    ``os.cpu_count()`` ignores (it sees the whole node)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def instance_plan(config: ModelConfig, settings: Settings) -> list[SessionConfig]:
    """One session config per instance of the model's instance groups, GPU instances placed on their GPU.
    CPU threads are split so that instances x intra-op threads <= cores unless ``intra_op_threads`` is set."""
    devices: list[int | None] = []  # GPU id per instance; None = CPU instance
    visible: int | None = None  # the GPU count, asked for once and only when a group wants GPUs
    for index, group in enumerate(config.instance_group):
        if not 0 <= group.count <= MAX_INSTANCES:  # parse_config refuses it too; never [None] * -3
            raise LoadFailed(f"instance_group[{index}].count: {group.count} is outside 0..{MAX_INSTANCES}")
        count = group.count or 1
        if not _group_wants_gpu(group, settings):
            devices.extend([None] * count)
            continue
        if visible is None:
            visible = gpu.visible_gpu_count()
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO and visible < 1:
            devices.extend([None] * count)  # a GPU provider is installed but no GPU is visible
            continue
        devices.extend(gpu.spread(count, gpu.group_gpus(group, index, visible)))
    if len(devices) > MAX_INSTANCES:
        raise LoadFailed(f"instance_group: {len(devices)} instances in all (count x GPUs), at most {MAX_INSTANCES}")
    cpu_instances = max(1, sum(1 for device in devices if device is None))
    threads = (
        thread_parameter(config, "intra_op_thread_count")
        or settings.intra_op_threads
        or max(1, available_cpus() // cpu_instances)
    )
    return [
        SessionConfig(
            intra_op_threads=threads,
            inter_op_threads=thread_parameter(config, "inter_op_thread_count") or settings.inter_op_threads,
            allow_spinning=settings.allow_spinning,
            graph_optimization_level=settings.graph_optimization_level,
            providers=choose_providers(settings.execution_providers, gpu=device is not None),
            device_id=device,
        )
        for device in devices
    ]


def thread_parameter(config: ModelConfig, key: str) -> int:
    """Triton's onnxruntime-backend thread parameters (``parameters { key: "intra_op_thread_count" ... }``),
    0 when absent; a per-model setting beats the server's and the optimizer's choice."""
    return thread_count(config, key)


def instance_report(backends: list[Backend]) -> list[dict[str, Any]]:
    """Where each instance really runs, for the optimization report: the providers onnxruntime gave it (a
    fallback from TensorRT or CUDA shows here), its device and, on a GPU, whether its batches are staged in
    pinned memory and whether it replays CUDA graphs (for which batch sizes, or why not)."""
    return [
        _instance_entry(index, backend)
        for index, backend in enumerate(backends)
        if isinstance(backend, OnnxRuntimeBackend)
    ]


def _instance_entry(index: int, backend: OnnxRuntimeBackend) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "device": backend.device, "providers": list(backend.providers)}
    if backend.gpu_device is not None:
        entry["pinned_host_buffers"] = backend.pinned
        sizes = backend.cuda_graph_sizes
        entry["cuda_graphs"] = sizes is not None
        if sizes:
            entry["cuda_graph_batch_sizes"] = list(sizes)
        if backend.graphs_off_reason is not None:
            entry["cuda_graphs_off"] = backend.graphs_off_reason
    return entry


def _group_wants_gpu(group: ModelInstanceGroup, settings: Settings) -> bool:
    """KIND_GPU needs a GPU provider (clear failure otherwise); KIND_AUTO uses one when present."""
    has_gpu = uses_gpu(choose_providers(settings.execution_providers, gpu=True))
    if group.kind == mc.ModelInstanceGroup.KIND_GPU and not has_gpu:
        raise LoadFailed("instance_group kind KIND_GPU, but no GPU execution provider (CUDA/TensorRT) is available")
    return group.kind in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO) and has_gpu
