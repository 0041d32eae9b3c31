"""Where a model version's instances run and with how many threads: one session config per instance of the
config's instance groups, each on the CPU or a GPU, CPU threads split so that instances x intra-op threads <=
cores, and how the optimizer's chosen session spec is applied to that plan.

GPU placement follows Triton: an ``instance_group { kind: KIND_GPU, count: N, gpus: [...] }`` puts N instances on
EACH listed GPU, and a group without ``gpus`` uses every visible GPU (counted by
:func:`server.backends.gpu.visible_gpu_count`). The per-device CUDA and TensorRT options of a placed GPU instance
are the backend's business (:func:`server.backends.gpu.with_gpu_options`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from optimizers import SessionSpec
from optimizers.providers import uses_gpu
from server.backends import gpu
from server.backends.base import Backend
from server.backends.onnxruntime import OnnxRuntimeBackend, SessionConfig, choose_providers
from server.errors import LoadFailed
from server.repository.config import MAX_INSTANCES, ModelConfig, ModelInstanceGroup, thread_count
from server.settings import Settings


def instance_plan(config: ModelConfig, settings: Settings, instances: int | None = None) -> list[SessionConfig]:
    """One session config per instance of the model's instance groups, GPU instances placed on their GPU.
    CPU threads are split so that instances x intra-op threads <= cores unless ``intra_op_threads`` is set.
    ``instances``: the optimizer's count (:attr:`optimizers.SessionSpec.instances`), for a config that leaves
    the count open (:func:`instances_open`); it replaces the count of a plan that is one CPU group."""
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
        devices.extend(spread(count, group_gpus(group, index, visible)))
    if instances and len(config.instance_group) == 1 and all(device is None for device in devices):
        devices = [None] * max(1, min(instances, MAX_INSTANCES))
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


def _group_wants_gpu(group: ModelInstanceGroup, settings: Settings) -> bool:
    """KIND_GPU needs a GPU provider (clear failure otherwise); KIND_AUTO uses one when present."""
    has_gpu = uses_gpu(choose_providers(settings.execution_providers, gpu=True))
    if group.kind == mc.ModelInstanceGroup.KIND_GPU and not has_gpu:
        raise LoadFailed("instance_group kind KIND_GPU, but no GPU execution provider (CUDA/TensorRT) is available")
    return group.kind in (mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_AUTO) and has_gpu


def group_gpus(group: ModelInstanceGroup, index: int, visible: int) -> list[int]:
    """The GPUs of one GPU instance group: its ``gpus`` list, or every visible GPU; each must exist."""
    kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
    if visible < 1:
        raise LoadFailed(
            f"instance_group[{index}] kind {kind}: no GPU is visible to this process "
            "(check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)"
        )
    gpus = [int(g) for g in group.gpus] or list(range(visible))
    missing = sorted({g for g in gpus if not 0 <= g < visible})
    if missing:
        raise LoadFailed(
            f"instance_group[{index}].gpus: GPU {', '.join(map(str, missing))} is not visible; "
            f"this process sees {visible} GPU(s), numbered 0..{visible - 1}"
        )
    return gpus


def spread(count: int, gpus: list[int]) -> list[int]:
    """``count`` instances on each GPU, in Triton's order (GPUs inner), so consecutive instances land on
    different GPUs and a lightly loaded model still uses them all."""
    return [gpu for _ in range(count) for gpu in gpus]


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


def instances_open(config: ModelConfig, explicit: set[str], settings: Settings) -> bool:
    """Whether the optimizer may choose the instance count and threads: the config gives no instance_group
    count (none at all: auto-completed, or groups with count left out) and no thread parameters, and the
    operator set no ``--intra-op-threads``. An explicit count or thread setting always wins."""
    counted = "instance_group" in explicit and any(group.count for group in config.instance_group)
    threads = any(thread_parameter(config, key) for key in ("intra_op_thread_count", "inter_op_thread_count"))
    return not counted and not threads and not settings.intra_op_threads


def thread_parameter(config: ModelConfig, key: str) -> int:
    """Triton's onnxruntime-backend thread parameters (``parameters { key: "intra_op_thread_count" ... }``),
    0 when absent; a per-model setting beats the server's and the optimizer's choice."""
    return thread_count(config, key)


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


def gpu_serving_available(settings: Settings) -> bool:
    """A GPU execution provider is installed (and allowed by the settings) and a GPU is visible."""
    providers = choose_providers(settings.execution_providers, gpu=True)
    return uses_gpu(providers) and gpu.visible_gpu_count() > 0


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
    entry.update(backend.engine)  # what really computes: engine, OpenVINO's precision hint, nodes, any fallback
    if backend.gpu_device is not None:
        entry["pinned_host_buffers"] = backend.pinned
        sizes = backend.cuda_graph_sizes
        entry["cuda_graphs"] = sizes is not None
        if sizes:
            entry["cuda_graph_batch_sizes"] = list(sizes)
        if backend.graphs_off_reason is not None:
            entry["cuda_graphs_off"] = backend.graphs_off_reason
    return entry
