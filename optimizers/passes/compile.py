"""Compile: choose how the selected model is *run* rather than changing it. On CPU, candidate session
configs with different intra-op thread counts for onnxruntime's own kernels (OpenVINO competes earlier, as an
engine candidate: :mod:`optimizers.engines`); on NVIDIA GPUs, TensorRT provider options (engine + timing caches
under the cache folder, an optimization profile from the batch sizes, FP16/INT8/sparsity flags) with CUDA as
the fallback provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optimizers.accuracy import Family
from optimizers.modelinfo import ModelInfo
from optimizers.options import OptimizeOptions
from optimizers.passes.base import PassConfig
from optimizers.providers import CPU, CUDA, TENSORRT, TensorrtProfile, tensorrt_options
from optimizers.runtime import Feed, SessionSpec


class CompileConfig(PassConfig):
    """Everything that shapes the session candidates."""

    target: str = "cpu"
    thread_candidates: tuple[int, ...] = ()
    splits: tuple[tuple[int, int], ...] = ()
    """(instances, intra-op threads) to time under concurrent load, the first being one instance on every core;
    empty unless the host leaves instances and threads open (``tune_instances``) on CPU."""
    allow_fp16: bool = False
    """TensorRT may pick FP16 kernels (lossy: only under precision auto/fp16)."""
    cache_root: str = ""
    """The optimizer's cache folder: TensorRT's engine and timing caches live under it."""
    profile: TensorrtProfile | None = None
    """TensorRT optimization profile (min, opt, max) as ``name:AxBxC,...``; None for static shapes."""


@dataclass(frozen=True)
class SessionCandidate:
    """One way to run the model. ``family`` is set when it changes the numbers (then the guard checks it)."""

    label: str
    spec: SessionSpec
    family: Family | None = None


def configure(options: OptimizeOptions, info: ModelInfo, cores: int, cache_root: Path, sample: Feed) -> CompileConfig:
    """The compile config for this model, machine and cache folder."""
    return CompileConfig(
        target=options.target,
        thread_candidates=thread_candidates(cores),
        splits=instance_splits(cores) if options.tune_instances and options.target == "cpu" else (),
        allow_fp16=options.precision in ("auto", "fp16"),
        cache_root=str(cache_root),
        profile=profile_shapes(info, options, sample),
    )


def thread_candidates(cores: int) -> tuple[int, ...]:
    """Powers of two below the core count, and the core count itself: 1, 2, 4, ..., cores."""
    counts = {cores}
    power = 1
    while power < cores:
        counts.add(power)
        power *= 2
    return tuple(sorted(counts))


MAX_SPLIT_INSTANCES = 4
"""The most instances the compile step times: more sessions cost memory for a gain the timings rarely show."""


def instance_splits(cores: int, cap: int = MAX_SPLIT_INSTANCES) -> tuple[tuple[int, int], ...]:
    """N instances x T threads with N in 1, 2, 4, ... up to ``cap`` and ``cores``, T = cores // N (so N x T <=
    cores, every core busy where N divides them): ``((1, 2), (2, 1))`` on 2 cores. One split (or none) on 1 core."""
    found = []
    count = 1
    while count <= min(cap, cores):
        found.append((count, cores // count))
        count *= 2
    return tuple(found) if len(found) > 1 else ()


def profile_shapes(info: ModelInfo, options: OptimizeOptions, sample: Feed) -> TensorrtProfile | None:
    """TensorRT's (min, opt, max) shapes: batch 1 / preferred / max_batch_size on dim 0, the sample's size
    on other dynamic dims. None when every input shape is static (no profile needed)."""
    if all(all(isinstance(d, int) for d in t.shape) for t in info.inputs):
        return None
    batching = options.max_batch_size > 0 and info.batch_dynamic
    rows = [1, options.preferred_batch_size, options.max_batch_size] if batching else [0, 0, 0]
    profiles = []
    for batch in rows:
        parts = []
        for tensor in info.inputs:
            dims = list(sample[tensor.name].shape)
            if batching:
                dims[0] = batch
            parts.append(f"{tensor.name}:{'x'.join(str(d) for d in dims)}")
        profiles.append(",".join(parts))
    return profiles[0], profiles[1], profiles[2]


def _tensorrt_options(config: CompileConfig, *, fp16: bool, int8: bool, sparsity: bool) -> dict[str, str]:
    """TensorRT provider options for a candidate: every precision flag explicit, the profile when shapes are
    dynamic (see :func:`optimizers.providers.tensorrt_options`)."""
    return tensorrt_options(Path(config.cache_root), fp16=fp16, int8=int8, sparsity=sparsity, profile=config.profile)


def target_spec(config: CompileConfig, family: Family = "fp32", sparse_24: bool = False) -> SessionSpec:
    """The spec a model of ``family`` is timed and served with on the target, before any tuning. On
    TensorRT an INT8 (QDQ) model needs the INT8 flag and an FP16 model the FP16 flag; a 2:4-pruned model
    gets the sparsity flag."""
    if config.target == "cuda":
        return SessionSpec(providers=(CUDA, CPU))
    if config.target == "tensorrt":
        trt = _tensorrt_options(config, fp16=family == "fp16", int8=family == "int8", sparsity=sparse_24)
        return SessionSpec(providers=(TENSORRT, CUDA, CPU), provider_options={TENSORRT: trt})
    return SessionSpec()


def candidates(config: CompileConfig, family: Family, sparse_24: bool) -> list[SessionCandidate]:
    """Session configs to race against :func:`target_spec` for the selected model."""
    if config.target == "cpu":
        return [SessionCandidate(f"threads={n}", SessionSpec(intra_op_threads=n)) for n in config.thread_candidates]
    if config.target == "tensorrt":
        found = [SessionCandidate("cuda", SessionSpec(providers=(CUDA, CPU)))]
        if config.allow_fp16 and family in ("fp32", "sparse"):
            trt = _tensorrt_options(config, fp16=True, int8=False, sparsity=sparse_24)
            spec = SessionSpec(providers=(TENSORRT, CUDA, CPU), provider_options={TENSORRT: trt})
            found.append(SessionCandidate("tensorrt_fp16", spec, family="fp16"))
        return found
    return []
