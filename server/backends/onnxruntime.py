"""ONNX Runtime backend: one InferenceSession per instance, with threads and providers from settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.base import Backend, Tensors
from server.errors import InvalidInput, LoadFailed

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}
_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class SessionConfig:
    """How to build one session: threads, optimization level, providers in order of preference."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization_level: str = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime build."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(requested: list[str], *, gpu: bool) -> tuple[str, ...]:
    """The providers to use: those requested that are installed, else TensorRT, CUDA, CPU as present.
    CPU instances (``gpu=False``) never get GPU providers."""
    installed = available_providers()
    wanted = requested or list(_PREFERRED_PROVIDERS)
    chosen = [p for p in wanted if p in installed and (gpu or p not in GPU_PROVIDERS)]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return tuple(chosen)


class OnnxRuntimeBackend(Backend):
    """Serves one ONNX file with onnxruntime. ``session.run`` releases the GIL, so instances run in
    parallel on worker threads."""

    def __init__(self, name: str, model_path: Path, config: SessionConfig) -> None:
        super().__init__(name)
        self.model_path = model_path
        self.config = config
        self._session: Any = None
        self._string_inputs: set[str] = set()
        self.providers: list[str] = []

    def load_impl(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.intra_op_threads
        options.inter_op_num_threads = self.config.inter_op_threads
        if not self.config.allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        level = _OPT_LEVELS.get(self.config.graph_optimization_level, "ORT_ENABLE_ALL")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        providers = [(p, self.config.provider_options.get(p, {})) for p in self.config.providers]
        try:
            self._session = ort.InferenceSession(str(self.model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad models
            raise LoadFailed(f"{self.name}: onnxruntime could not load the model: {exc}") from None
        for value in [*self._session.get_inputs(), *self._session.get_outputs()]:
            if value.type == "tensor(bfloat16)":
                raise LoadFailed(f"{self.name}: {value.name!r} is BF16, which onnxruntime's Python API cannot feed")
        self._string_inputs = {i.name for i in self._session.get_inputs() if i.type == "tensor(string)"}
        self.providers = list(self._session.get_providers())

    def infer_impl(self, inputs: Tensors) -> Tensors:
        feed = {name: _as_ort_strings(name, a) if name in self._string_inputs else a for name, a in inputs.items()}
        names = [o.name for o in self._session.get_outputs()]
        results = self._session.run(None, feed)
        return {name: _from_ort(value) for name, value in zip(names, results, strict=True)}

    def unload_impl(self) -> None:
        self._session = None


def _as_ort_strings(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime string tensors take Python ``str``: decode UTF-8 bytes, refusing anything else."""
    try:
        decoded = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidInput(f"input {name!r}: BYTES elements must be UTF-8 for this model's string input") from None
    out = np.empty(len(decoded), dtype=object)
    out[:] = decoded
    return out.reshape(array.shape)


def _from_ort(value: Any) -> np.ndarray:
    """onnxruntime returns strings as ``str`` objects; the wire wants bytes."""
    array = np.asarray(value)
    if array.dtype == object:
        encoded = np.empty(array.size, dtype=object)
        encoded[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in array.reshape(-1)]
        return encoded.reshape(array.shape)
    return array
