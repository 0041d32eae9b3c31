"""The GPUs this process sees, and the onnxruntime options of GPU instances.

Instances are placed on GPUs by :mod:`server.models.placement` (Triton's ``instance_group`` rules), which asks
:func:`visible_gpu_count` here. Each placed GPU instance then gets CUDA and TensorRT provider options for its
device: its ``device_id``, the cuDNN search mode, TensorRT's engine and timing caches (an engine build takes
minutes, a cached one loads in seconds) and an optimization profile covering the batch sizes the batcher
forms. What the optimizer's compile step chose is kept: these options only fill in what it left out.
Instances whose first provider is CUDA also get CUDA graphs when the config asks (Triton's
``optimization { cuda { graphs: true } }``), and every GPU instance stages its batches in pinned host memory
unless ``--no-pinned-host-buffers``.

Nothing here imports a GPU library at import time: nvidia-ml-py is imported only to count GPUs, so a CPU
install never needs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace

from tritonclient.grpc import model_config_pb2 as mc

from optimizers.providers import CUDA, PROFILE_KEYS, TENSORRT, TensorrtProfile, tensorrt_cache_dirs, tensorrt_options
from server.backends import onnxruntime as ort_backend
from server.backends.onnxruntime import CUDA_GRAPH_OPTION, SessionConfig
from server.errors import LoadFailed
from server.repository.config import ModelConfig, ModelInput
from server.settings import Settings

log = logging.getLogger("optiserve.gpu")


def visible_gpu_count(environ: Mapping[str, str] | None = None) -> int:
    """GPUs this process may use. NVML's count when nvidia-ml-py is importable and a driver answers (capped
    by CUDA_VISIBLE_DEVICES, which renumbers the devices CUDA sees), else the CUDA_VISIBLE_DEVICES entries,
    else 1 when onnxruntime has the CUDA provider (a GPU we cannot count), else 0."""
    env = os.environ if environ is None else environ
    listed = visible_devices_entries(env.get("CUDA_VISIBLE_DEVICES"))
    counted = _nvml_count()
    if counted is not None:
        return counted if listed is None else min(counted, listed)
    if listed is not None:
        return listed
    return 1 if CUDA in ort_backend.available_providers() else 0


def visible_devices_entries(value: str | None) -> int | None:
    """How many devices CUDA_VISIBLE_DEVICES exposes; None when unset. CUDA reads indices or GPU-/MIG- UUIDs
    and stops at the first invalid entry, so "" and "-1" hide every GPU."""
    if value is None:
        return None
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        count += 1
    return count


def _nvml_count() -> int | None:
    """NVML's device count; None when nvidia-ml-py is missing or no driver answers."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, or not an NVIDIA machine
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)


def tensorrt_profile(config: ModelConfig) -> TensorrtProfile | None:
    """TensorRT's (min, opt, max) shapes, ``name:AxBxC,...`` each: batch 1, the largest preferred batch size
    (else max_batch_size), and max_batch_size, with the config's other dims. None when no profile is needed
    (fixed shapes) or none can be given (a dynamic non-batch dim: TensorRT then builds for the shapes it sees)."""
    inputs = [(t.name, _model_dims(t)) for t in config.input if t.data_type != mc.TYPE_STRING]
    dynamic = [name for name, dims in inputs if any(d < 0 for d in dims)]
    if dynamic:
        log.warning(
            "model %r: no TensorRT optimization profile, input(s) %s have a dynamic non-batch dimension; "
            "TensorRT will build an engine for each new shape at inference time (fix the dims in the config)",
            config.name,
            ", ".join(dynamic),
        )
        return None
    largest = int(config.max_batch_size)
    if largest < 1 or not inputs:
        return None
    fitting = preferred_sizes(config, largest)
    rows = (1, max(fitting) if fitting else largest, largest)
    shapes = [",".join(f"{name}:{'x'.join(str(d) for d in (batch, *dims))}" for name, dims in inputs) for batch in rows]
    return shapes[0], shapes[1], shapes[2]


def preferred_sizes(config: ModelConfig, largest: int) -> list[int]:
    """The config's preferred batch sizes the batcher can form (1..``largest``)."""
    return [int(s) for s in config.dynamic_batching.preferred_batch_size if 0 < s <= largest]


def _model_dims(tensor: ModelInput) -> list[int]:
    """The dims the model sees (after ``reshape``), without the batch dim."""
    return [int(d) for d in (tensor.reshape.shape if tensor.HasField("reshape") else tensor.dims)]


def cuda_graph_sizes(config: ModelConfig) -> tuple[int, ...] | None:
    """The batch sizes to capture as CUDA graphs; None when the config does not ask for graphs, empty for a
    model without a batch dimension (one graph for its fixed shapes). ``graph_spec`` batch sizes win; the
    default is every power of two up to ``max_batch_size``, the preferred batch sizes (the batcher aims at
    them) and ``max_batch_size`` itself, so padding a batch up to its graph at most doubles it. ``graph_spec``
    input shapes and lower bounds are not used: the model's own dims must be fixed."""
    cuda = config.optimization.cuda
    if not cuda.graphs:
        return None
    largest = int(config.max_batch_size)
    specified = [int(spec.batch_size) for spec in cuda.graph_spec]
    if largest < 1:
        if any(specified):
            raise LoadFailed("optimization.cuda.graph_spec.batch_size: must be 0 for a model with max_batch_size 0")
        return ()
    outside = [size for size in specified if not 1 <= size <= largest]
    if outside:
        raise LoadFailed(
            f"optimization.cuda.graph_spec.batch_size: {outside[0]} is outside 1..max_batch_size ({largest})"
        )
    if specified:
        return tuple(sorted(set(specified)))
    powers = [1 << bit for bit in range(largest.bit_length()) if 1 << bit <= largest]
    return tuple(sorted({*powers, *preferred_sizes(config, largest), largest}))


def cuda_options(device_id: int, settings: Settings) -> dict[str, str]:
    """CUDA provider options for one instance. Copies run on the compute stream (``do_copy_in_default_stream``):
    onnxruntime warns that separate copy streams can race."""
    return {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "do_copy_in_default_stream": "True",
    }


def with_gpu_options(
    plan: list[SessionConfig], config: ModelConfig, settings: Settings, *, fp16: bool
) -> list[SessionConfig]:
    """The plan with per-device CUDA/TensorRT options, CUDA graphs and pinned staging on every GPU instance.
    Options already there (the optimizer's compile step) win, except ``device_id``, which is the instance's
    placement. TensorRT gets the shared engine and timing caches (engine files are named by model and GPU
    architecture), the workspace, the profile, and FP16 only for an FP16 model (``fp16``)."""
    gpu_plan = [s for s in plan if s.device_id is not None and s.wants_gpu]
    if not gpu_plan:
        return plan
    graph_sizes = cuda_graph_sizes(config)
    if graph_sizes is not None and any(s.providers[0] != CUDA for s in gpu_plan):
        log.warning(
            "model %r: CUDA graphs are used on instances whose first provider is %s only; instances on "
            "TensorRT run without them (set execution_providers to CUDAExecutionProvider to use them)",
            config.name,
            CUDA,
        )
    trt = [s for s in gpu_plan if TENSORRT in s.providers]
    profiled = all(PROFILE_KEYS[0] in s.provider_options.get(TENSORRT, {}) for s in trt)
    profile = tensorrt_profile(config) if trt and not profiled else None  # the optimizer's profile wins
    if trt:
        _make_cache_folders(settings)
    updated = []
    for session in plan:
        if session.device_id is None or not session.wants_gpu:
            updated.append(session)
            continue
        graphs = graph_sizes is not None and session.providers[0] == CUDA
        generated = {
            CUDA: cuda_options(session.device_id, settings) | ({CUDA_GRAPH_OPTION: "1"} if graphs else {}),
            TENSORRT: tensorrt_options(
                settings.cache_dir,
                fp16=fp16,
                profile=profile,
                device_id=session.device_id,
                workspace_bytes=settings.tensorrt_workspace_bytes,
            ),
        }
        updated.append(
            replace(
                session,
                provider_options=merge_options(session, generated),
                cuda_graphs=graphs,
                graph_batch_sizes=graph_sizes if graphs and graph_sizes is not None else (),
                pinned_host_buffers=settings.pinned_host_buffers,
            )
        )
    return updated


def _make_cache_folders(settings: Settings) -> None:
    """TensorRT writes its caches there; a folder it cannot create would only show as slow engine rebuilds."""
    for path in tensorrt_cache_dirs(settings.cache_dir):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoadFailed(f"cannot create the TensorRT cache folder {path} ({exc}); check --cache-dir") from None


def merge_options(session: SessionConfig, generated: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Per provider: generated options, then the session's own on top, then the placement's ``device_id``."""
    merged = {name: dict(options) for name, options in session.provider_options.items()}
    for provider in session.providers:
        ours = generated.get(provider)
        if ours is None:
            continue
        merged[provider] = {**ours, **merged.get(provider, {}), "device_id": ours["device_id"]}
    return merged
