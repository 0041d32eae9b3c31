"""One vocabulary for onnxruntime's execution providers (the engines: CPU/MLAS, OpenVINO, CUDA, TensorRT), shared
by the optimizer and the server, and the one builder of TensorRT provider options.

Nothing here imports onnxruntime: the names are plain strings, so a CPU install can speak about GPUs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"

GPU_PROVIDERS = (TENSORRT, CUDA)
"""The providers that compute on an NVIDIA GPU."""
PREFERRED = (TENSORRT, CUDA, CPU)
"""The server's default order when no ``execution_providers`` are configured: best first."""

Target = Literal["cpu", "cuda", "tensorrt"]
TARGET_PROVIDERS: dict[Target, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),
    "tensorrt": (TENSORRT, CUDA, CPU),
}
"""The providers a session for each optimizer target uses, best first (the first one must be installed)."""

TensorrtProfile = tuple[str, str, str]
"""TensorRT's (min, opt, max) optimization profile shapes, ``name:AxBxC,...`` each."""
PROFILE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")


def uses_gpu(providers: Iterable[str]) -> bool:
    """Whether any of ``providers`` computes on a GPU."""
    return any(provider in GPU_PROVIDERS for provider in providers)


def engine_of(providers: Iterable[str]) -> str:
    """The engine that computes with ``providers`` (the report's name): ``openvino``, ``tensorrt``, ``cuda``, or
    ``onnxruntime`` for its own CPU kernels (MLAS)."""
    listed = set(providers)
    for provider, engine in ((OPENVINO, "openvino"), (TENSORRT, "tensorrt"), (CUDA, "cuda")):
        if provider in listed:
            return engine
    return "onnxruntime"


def target_of(providers: Iterable[str]) -> Target:
    """The optimizer target for a provider list: its best GPU provider, else ``cpu``."""
    listed = set(providers)
    if TENSORRT in listed:
        return "tensorrt"
    return "cuda" if CUDA in listed else "cpu"


def tensorrt_cache_dirs(cache_root: Path) -> tuple[Path, Path]:
    """The (engine, timing) cache folders under a cache root: ``ROOT/tensorrt/engines`` and ``ROOT/tensorrt/timing``.
    The optimizer's candidates and the served instances share them, so an engine built while timing is reused."""
    root = Path(cache_root) / "tensorrt"
    return root / "engines", root / "timing"


def tensorrt_options(
    cache_root: Path,
    *,
    fp16: bool,
    int8: bool | None = None,
    sparsity: bool | None = None,
    profile: TensorrtProfile | None = None,
    device_id: int | None = None,
    workspace_bytes: int | None = None,
) -> dict[str, str]:
    """TensorRT provider options: the engine and timing caches under ``cache_root`` always (an engine build takes
    minutes, a cached one loads in seconds), the precision flags, and the profile when shapes are dynamic.
    ``int8``/``sparsity`` None, ``device_id`` None and ``workspace_bytes`` None leave those options out
    (TensorRT's defaults: off, off, device 0, its own workspace limit). FP16 is always explicit: on an FP32 model
    the flag would let TensorRT pick FP16 kernels the accuracy guard never checked."""
    engines, timing = tensorrt_cache_dirs(cache_root)
    options: dict[str, str] = {}
    if device_id is not None:
        options["device_id"] = str(device_id)
    if workspace_bytes is not None:
        options["trt_max_workspace_size"] = str(workspace_bytes)
    options |= {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(timing),
        "trt_fp16_enable": str(fp16),
    }
    if int8 is not None:
        options["trt_int8_enable"] = str(int8)
    if sparsity is not None:
        options["trt_sparsity_enable"] = str(sparsity)
    if profile is not None:
        options |= dict(zip(PROFILE_KEYS, profile, strict=True))
    return options
