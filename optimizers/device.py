"""Probe the machine once: CPU instruction sets, GPUs, onnxruntime's providers, the OpenVINO plugin, TensorRT. The
answers decide which candidates can pay (INT8 needs fast integer dot products; FP16 needs a GPU; bf16 needs
avx512_bf16 or AMX) and, as a fingerprint, key the cache: an artifact tuned for one machine is never reused on
another."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from optimizers import openvino
from optimizers.providers import CPU, uses_gpu

log = logging.getLogger("optiserve.optimizers")

#: CPU flags that matter for inference kernels (x86 names from /proc/cpuinfo; ARM ``asimddp`` = dot product).
INTERESTING_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "sve",
)
_TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt_libs", "tensorrt-cu12-libs")


class GpuInfo(BaseModel):
    """One NVIDIA GPU as NVML or nvidia-smi describes it."""

    model_config = ConfigDict(frozen=True)

    name: str
    compute_capability: str = ""
    memory_mb: int = 0


class DeviceInfo(BaseModel):
    """What this machine offers to the optimizer; build it with :func:`probe_device`."""

    model_config = ConfigDict(frozen=True)

    arch: str
    cpu_model: str = ""
    cores: int = 1
    cpu_flags: tuple[str, ...] = ()
    providers: tuple[str, ...] = (CPU,)
    gpus: tuple[GpuInfo, ...] = ()
    tensorrt_version: str = ""
    onnxruntime_version: str = ""
    openvino_version: str = ""
    """The ``onnxruntime-ep-openvino`` plugin's version; empty when it is not installed."""
    openvino_devices: tuple[str, ...] = ()
    """The devices the plugin offers here (OpenVINO's names: ``CPU``...); none on non-Intel hardware."""
    openvino_note: str = ""
    """Why the plugin offers no device, for the report."""

    @property
    def has_vnni(self) -> bool:
        """VNNI (or AMX) multiplies u8 x s8 without the 16-bit saturation of plain AVX2."""
        return any(flag in self.cpu_flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))

    @property
    def int8_pays(self) -> bool:
        """Whether INT8 kernels can beat FP32 here: x86 with AVX2 or better, ARM with dot products."""
        return self.has_vnni or "avx2" in self.cpu_flags or "asimddp" in self.cpu_flags

    @property
    def has_bf16(self) -> bool:
        """bf16 arithmetic in hardware (avx512_bf16 or AMX): where OpenVINO's bf16 can pay."""
        return any(flag in self.cpu_flags for flag in ("avx512_bf16", "amx_bf16"))

    @property
    def openvino_cpu(self) -> bool:
        """Whether OpenVINO can run on this CPU (the plugin is installed and offers it)."""
        return "CPU" in self.openvino_devices

    @property
    def has_gpu(self) -> bool:
        """A CUDA-capable onnxruntime provider is installed (GPUs themselves may not be listed without NVML)."""
        return uses_gpu(self.providers)

    @property
    def fingerprint(self) -> str:
        """A short stable id: readable prefix + hash of everything that changes what is fastest or valid."""
        gpu = self.gpus[0].name.replace(" ", "_") if self.gpus else "nogpu"
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]
        return f"{self.arch}-{self.isa_level}-{self.cores}c-{gpu}-{digest}"

    @property
    def isa_level(self) -> str:
        """The best integer-matmul level: amx > vnni > avx512 > avx2 > base."""
        for level, flag in (("amx", "amx_int8"), ("vnni", "avx512_vnni"), ("vnni", "avx_vnni"), ("avx512", "avx512f")):
            if flag in self.cpu_flags:
                return level
        return "avx2" if "avx2" in self.cpu_flags else "dotprod" if "asimddp" in self.cpu_flags else "base"

    def summary(self) -> dict[str, object]:
        """The JSON-able description that goes into reports."""
        return {"fingerprint": self.fingerprint, **self.model_dump(mode="json")}


def probe_device() -> DeviceInfo:
    """Look at the machine (cheap: a file read and an import; NVML only when a GPU stack is installed)."""
    import onnxruntime as ort

    providers = tuple(ort.get_available_providers())
    cpu_model, flags = read_cpuinfo(Path("/proc/cpuinfo"))
    wants_gpu = uses_gpu(providers)
    plugin = openvino.availability()
    device = DeviceInfo(
        arch=platform.machine() or "unknown",
        cpu_model=cpu_model,
        cores=usable_cores(),
        cpu_flags=flags,
        providers=providers,
        gpus=probe_gpus() if wants_gpu or _has_module("pynvml") else (),
        tensorrt_version=tensorrt_version(),
        onnxruntime_version=str(ort.__version__),
        openvino_version=plugin.version,
        openvino_devices=plugin.devices,
        openvino_note=plugin.reason,
    )
    engines = f"OpenVINO on {','.join(plugin.devices)}" if plugin.devices else f"no OpenVINO ({plugin.reason})"
    log.info("device %s: flags %s, providers %s, %s", device.fingerprint, ",".join(flags), ",".join(providers), engines)
    return device


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask in containers), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_cpuinfo(path: Path) -> tuple[str, tuple[str, ...]]:
    """(model name, interesting flags) from /proc/cpuinfo; empty where the file does not exist."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return platform.processor(), ()
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """Parse the first processor's ``model name`` and ``flags`` (x86) or ``Features`` (ARM) lines."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, tuple(flag for flag in INTERESTING_FLAGS if flag in flags)


def probe_gpus() -> tuple[GpuInfo, ...]:
    """GPUs via NVML (nvidia-ml-py) when importable, else nvidia-smi; nothing when neither works."""
    try:
        return _gpus_from_nvml()
    except Exception as exc:  # NVML missing or no driver: try the CLI
        log.debug("NVML unavailable (%s), trying nvidia-smi", exc)
    return _gpus_from_smi()


def _gpus_from_nvml() -> tuple[GpuInfo, ...]:
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
            text = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(GpuInfo(name=text, compute_capability=f"{major}.{minor}", memory_mb=int(memory)))
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


def _gpus_from_smi() -> tuple[GpuInfo, ...]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    query = [smi, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_smi(out)


def parse_smi(text: str) -> tuple[GpuInfo, ...]:
    """``name, compute_cap, memory`` CSV lines from nvidia-smi."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3:
            memory = int(parts[2]) if parts[2].isdigit() else 0
            gpus.append(GpuInfo(name=parts[0], compute_capability=parts[1], memory_mb=memory))
    return tuple(gpus)


def tensorrt_version() -> str:
    """The installed TensorRT wheel's version, read from package metadata (importing TensorRT is slow)."""
    for distribution in _TENSORRT_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
