"""ONNX Runtime backend: one InferenceSession per instance, with threads and providers from settings.

A GPU instance runs through IO binding (inputs bound from host memory, outputs allocated on its device and
copied back once), replays CUDA graphs where its config asks for them, and offers the batcher pinned staging
buffers; a CPU instance uses plain ``session.run``. onnxruntime quietly drops a provider it cannot create (a
missing CUDA or TensorRT library), so after creating a session the providers it really got are compared with
those asked for and any fallback is logged. A model that cannot run as CUDA graphs is served without them,
with a warning and the reason in the optimization report.

An instance whose providers include OpenVINO opens through the plugin (:mod:`optimizers.openvino`, the same code
that opened the optimizer's candidate): explicit precision, never a ``providers`` argument, and OpenVINO's own
thread count set from the instance's intra-op threads. Where the plugin offers no device, the instance serves on
onnxruntime's CPU kernels with a warning (``engine_fallback``); every session records where its nodes run
(``nodes``).

A model that imports onnxruntime-extensions' operator domains gets that library registered on each of its
sessions (:mod:`optimizers.custom_ops`); without the extra installed it fails to load, naming the extra. The
encoded images such a model hands to DecodeImage are checked first (:mod:`server.backends.image_guard`)."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from optimizers import custom_ops, openvino
from optimizers.providers import CPU, CUDA, GPU_PROVIDERS, OPENVINO, PREFERRED, engine_of, uses_gpu
from server.backends import image_guard
from server.backends.base import Backend, Tensors
from server.backends.capture_lock import CUDA_CAPTURE
from server.backends.cuda_graphs import GRAPH_ID, NO_GRAPH, CudaGraphs
from server.backends.pinned import PinnedHost, StagingBuffers
from server.errors import InvalidInput, LoadFailed

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}
CUDA_GRAPH_OPTION = "enable_cuda_graph"

log = logging.getLogger("optiserve.backends")
_preload_lock = threading.Lock()
_preloaded = False


@dataclass(frozen=True)
class SessionConfig:
    """How to build one session: threads, optimization level, providers in order of preference."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization_level: str = "all"
    providers: tuple[str, ...] = (CPU,)
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    device_id: int | None = None
    """The GPU this instance is placed on (CUDA ordinal); None for a CPU instance."""
    cuda_graphs: bool = False
    """Replay CUDA graphs on the CUDA provider (the provider options then carry ``enable_cuda_graph``)."""
    graph_batch_sizes: tuple[int, ...] = ()
    """The batch sizes to capture; empty for a model without a batch dimension (one graph, its fixed shapes)."""
    pinned_host_buffers: bool = False
    """Offer the batcher pinned host buffers to concatenate batches into (GPU instances only)."""

    @property
    def wants_gpu(self) -> bool:
        """Whether a GPU provider was asked for."""
        return uses_gpu(self.providers)


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime build."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(requested: list[str], *, gpu: bool) -> tuple[str, ...]:
    """The providers to use: those requested that are installed, else TensorRT, CUDA, CPU as present.
    CPU instances (``gpu=False``) never get GPU providers."""
    installed = available_providers()
    wanted = requested or list(PREFERRED)
    chosen = [p for p in wanted if p in installed and (gpu or p not in GPU_PROVIDERS)]
    if CPU not in chosen:
        chosen.append(CPU)
    return tuple(chosen)


class OnnxRuntimeBackend(Backend):
    """Serves one ONNX file with onnxruntime. ``session.run`` releases the GIL, so instances run in
    parallel on worker threads."""

    def __init__(self, name: str, model_path: Path, config: SessionConfig) -> None:
        super().__init__(name)
        self.model_path = model_path
        self.config = config
        self._ort: Any = None
        self._session: Any = None
        self._string_inputs: set[str] = set()
        self._outputs: list[tuple[str, bool]] = []  # (name, is a string tensor)
        self.providers: list[str] = []
        """The providers onnxruntime really uses, best first (may be fewer than asked for)."""
        self.nodes: dict[str, int] = {}
        """How many nodes each provider runs, as onnxruntime placed them (empty where it kept no record)."""
        self.engine_fallback: str | None = None
        """Why OpenVINO was asked for and the instance runs on onnxruntime's CPU kernels instead; None otherwise."""
        self.gpu_device: int | None = None
        """The GPU the session runs on (its first provider is CUDA or TensorRT); None on the CPU."""
        self.graphs_off_reason: str | None = None
        """Why CUDA graphs were asked for and are not used; None when they are, or were not asked for."""
        self._graphs: CudaGraphs | None = None
        self._graphs_pending = False  # captured by prepare(), on the worker thread that will replay them
        self._plain_run_options: Any = None  # gpu_graph_id -1: a run that must not be captured
        self._staging: StagingBuffers | None = None
        self._custom_ops: str | None = None  # onnxruntime-extensions' library, for a model that uses its ops
        self._image_inputs: frozenset[str] = frozenset()  # inputs fed to DecodeImage: checked before each run

    def load_impl(self) -> None:
        import onnxruntime as ort

        self._ort = ort
        try:
            self._custom_ops = custom_ops.library_for(self.model_path)
        except custom_ops.CustomOpsUnavailable as exc:
            raise LoadFailed(f"{self.name}: {exc}") from None
        if self._custom_ops is not None:
            self._image_inputs = image_guard.guarded_inputs(self.model_path, self.name)
        if self.config.wants_gpu:
            _preload_gpu_libraries(ort)
        config = self.config
        try:
            session = self._create_session(config)
        except LoadFailed as exc:
            if not (config.cuda_graphs and "graph" in str(exc).lower()):
                raise
            config = self._without_graphs(config, f"onnxruntime refused CUDA graphs for this model ({exc})")
            session = self._create_session(config)
        self._adopt(session, config)
        if not config.cuda_graphs:
            return
        if self.gpu_device is None or self.providers[0] != CUDA:
            first = self.providers[0] if self.providers else "no provider"
            self._without_graphs(config, f"the instance runs on {first}; CUDA graphs are for the CUDA provider only")
        else:
            self._graphs_pending = True

    def prepare(self) -> None:
        """Capture the CUDA graphs, on the calling thread: onnxruntime keeps captured graphs per thread, so this
        runs on the instance's worker thread before it takes work. Other CUDA work of the server waits meanwhile
        (see capture_lock). A model that cannot be captured gets a fresh session without graphs."""
        if not self._graphs_pending or self.gpu_device is None:
            return
        self._graphs_pending = False
        host = PinnedHost.shared() if self.config.pinned_host_buffers else None
        with CUDA_CAPTURE.exclusive():
            try:
                self._graphs = CudaGraphs.capture(
                    self._session, self._ort, self.gpu_device, self.config.graph_batch_sizes, host
                )
                return
            except Exception as exc:  # GraphsUnsupported, or onnxruntime's capture error
                reason = str(exc) or type(exc).__name__
            # still inside the lock: the half-built graphs' buffers and the session are freed here, before the
            # new session takes its own GPU memory
            self._session = None
        config = self._without_graphs(self.config, reason)
        self._adopt(self._create_session(config), config)

    def _create_session(self, config: SessionConfig) -> Any:
        ort = self._ort
        try:
            if OPENVINO in config.providers:
                return self._openvino_session(config)
            with CUDA_CAPTURE.shared() if config.wants_gpu else contextlib.nullcontext():
                options = self._session_options(ort)
                return ort.InferenceSession(str(self.model_path), options, providers=provider_list(config))
        except Exception as exc:  # onnxruntime raises its own exception types for bad models
            raise LoadFailed(f"{self.name}: onnxruntime could not load the model: {exc}") from None

    def _openvino_session(self, config: SessionConfig) -> Any:
        """A session on OpenVINO through the plugin, or on onnxruntime's CPU kernels (with a warning) where the
        plugin offers no device: the same model file, run at least as precisely."""
        options = config.provider_options.get(OPENVINO, {})
        try:
            return openvino.PLUGIN.create_session(
                self.model_path, self._session_options(self._ort), options, config.intra_op_threads
            )
        except openvino.OpenVinoUnavailable as exc:
            self.engine_fallback = f"OpenVINO unavailable ({exc}); serving on onnxruntime's CPU kernels"
            log.warning("%s: %s", self.name, self.engine_fallback)
        return self._ort.InferenceSession(str(self.model_path), self._session_options(self._ort), providers=[CPU])

    def _adopt(self, session: Any, config: SessionConfig) -> None:
        """Serve ``session``, created from ``config``: check its tensors, see where it really runs (logging any
        fallback), and set up IO binding's run options and the pinned staging buffers."""
        for value in [*session.get_inputs(), *session.get_outputs()]:
            if value.type == "tensor(bfloat16)":
                raise LoadFailed(f"{self.name}: {value.name!r} is BF16, which onnxruntime's Python API cannot feed")
        self.nodes = openvino.placement(session)
        self.providers = _providers_used(session, self.nodes)
        if self.engine_fallback is None:  # already logged
            warn_on_fallback(self.name, config, session)
            if OPENVINO in config.providers and self.nodes and not self.nodes.get(OPENVINO):
                log.warning("%s: OpenVINO took no node of this model; onnxruntime's CPU kernels run it", self.name)
        self.gpu_device = _running_device(session, self.providers, config)
        self._string_inputs = {i.name for i in session.get_inputs() if i.type == "tensor(string)"}
        self._outputs = [(o.name, o.type == "tensor(string)") for o in session.get_outputs()]
        self._plain_run_options = None
        if CUDA_GRAPH_OPTION in config.provider_options.get(CUDA, {}):
            self._plain_run_options = self._ort.RunOptions()  # runs no graph fits must not be captured
            self._plain_run_options.add_run_config_entry(GRAPH_ID, NO_GRAPH)
        host = PinnedHost.shared() if self.gpu_device is not None and config.pinned_host_buffers else None
        self._staging = StagingBuffers(host) if host is not None else None
        self._session = session

    def _without_graphs(self, config: SessionConfig, reason: str) -> SessionConfig:
        """``config`` without CUDA graphs; the reason is logged and kept for the optimization report."""
        self.graphs_off_reason = reason
        log.warning("%s: serving without CUDA graphs: %s", self.name, reason)
        options = {
            provider: {k: v for k, v in values.items() if k != CUDA_GRAPH_OPTION}
            for provider, values in config.provider_options.items()
        }
        return replace(config, cuda_graphs=False, provider_options=options)

    def _session_options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.intra_op_threads
        options.inter_op_num_threads = self.config.inter_op_threads
        if not self.config.allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        level = _OPT_LEVELS.get(self.config.graph_optimization_level, "ORT_ENABLE_ALL")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.add_session_config_entry(openvino.ASSIGNMENT_ENTRY, "1")
        custom_ops.register(options, self._custom_ops)
        return options

    @property
    def cuda_graph_sizes(self) -> tuple[int, ...] | None:
        """The batch sizes replayed as CUDA graphs (empty for an unbatched model's single graph); None when off."""
        return None if self._graphs is None else self._graphs.sizes

    @property
    def any_thread(self) -> bool:
        """A CPU session (onnxruntime's or OpenVINO's) runs from any thread; a GPU one keeps to its worker
        (CUDA graphs are captured per thread, and GPU compute is too long to run on the event loop anyway)."""
        return self.gpu_device is None

    @property
    def pinned(self) -> bool:
        """Whether batches are staged in pinned host memory (false again once pinned memory was refused)."""
        return self._staging is not None and self._staging.active

    def staging_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        return self._staging.get(name, shape, dtype) if self._staging is not None else None

    @property
    def engine(self) -> dict[str, Any]:
        """What computes, for the report's instance entries: ``engine`` (as the optimizer names it, from the
        providers that really run: OpenVINO only where it took nodes), OpenVINO's ``precision_hint``, ``nodes`` by
        provider and any ``fallback``."""
        used = [p for p in self.providers if p != OPENVINO or self.nodes.get(OPENVINO) or not self.nodes]
        summary: dict[str, Any] = {"engine": engine_of(used)}
        if summary["engine"] == "openvino":
            summary["precision_hint"] = openvino.precision_hint(self.config.provider_options.get(OPENVINO, {}))
        summary["nodes"] = dict(self.nodes)
        if self.engine_fallback is not None:
            summary["fallback"] = self.engine_fallback
        return summary

    @property
    def device(self) -> str:
        """Where the instance really runs: ``gpu:<id>`` or ``cpu``."""
        return "cpu" if self.gpu_device is None else f"gpu:{self.gpu_device}"

    def infer_impl(self, inputs: Tensors) -> Tensors:
        return self._infer(inputs, None)

    def probe_impl(self, inputs: Tensors) -> Tensors:
        """A run whose failure the caller reports: onnxruntime's own ``[E:onnxruntime ...]`` line for a failing
        node would otherwise reach stderr at every size the warmup tries (the GPU path logs as usual)."""
        quiet = self._ort.RunOptions()
        quiet.log_severity_level = 4  # fatal only
        return self._infer(inputs, quiet)

    def _infer(self, inputs: Tensors, cpu_run_options: Any) -> Tensors:
        for name in self._image_inputs:
            image_guard.check_images(name, inputs[name])
        feed = {name: _as_ort_strings(name, a) if name in self._string_inputs else a for name, a in inputs.items()}
        names = [name for name, _ in self._outputs]
        if self.gpu_device is None:
            results = self._session.run(None, feed, cpu_run_options)
        else:
            with CUDA_CAPTURE.shared():
                replayed = self._graphs.run(feed) if self._graphs is not None else None
                results = replayed if replayed is not None else self._run_bound(feed)
        return {name: _from_ort(value) for name, value in zip(names, results, strict=True)}

    def _run_bound(self, feed: Tensors) -> list[Any]:
        """One run through IO binding: inputs are bound from host memory, outputs are allocated on the
        instance's GPU by onnxruntime's arena and copied back once, after the run (a fresh host array: the
        batcher hands out views of it after the worker moved on). Inputs the batcher concatenated into the
        instance's pinned staging buffers upload by DMA. String outputs cannot live on a GPU and stay on the
        host. In a session with CUDA graphs on, this is the path for runs no graph fits."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, is_string in self._outputs:
            if is_string:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, "cuda", self.gpu_device)
        self._session.run_with_iobinding(binding, self._plain_run_options)  # None: onnxruntime's defaults
        return list(binding.copy_outputs_to_cpu())

    def unload_impl(self) -> None:
        with CUDA_CAPTURE.shared() if self.gpu_device is not None else contextlib.nullcontext():
            self._graphs = None
            self._staging = None
            self._session = None  # freeing GPU memory must not interleave with a capture elsewhere


def _providers_used(session: Any, nodes: dict[str, int]) -> list[str]:
    """The session's providers, best first, plus any that onnxruntime placed nodes on without listing it."""
    listed = list(session.get_providers())
    return [name for name in nodes if nodes[name] and name not in listed] + listed


def provider_list(config: SessionConfig) -> list[tuple[str, dict[str, str]]]:
    """(provider, options) pairs for onnxruntime; GPU providers always carry the instance's ``device_id``."""
    pairs = []
    for provider in config.providers:
        options = dict(config.provider_options.get(provider, {}))
        if provider in GPU_PROVIDERS and config.device_id is not None:
            options["device_id"] = str(config.device_id)
        pairs.append((provider, options))
    return pairs


def warn_on_fallback(name: str, config: SessionConfig, session: Any) -> str | None:
    """Log (never silently accept) a session that did not get every provider asked for, or got its GPU
    provider on another device than planned; returns the warning, None when all is as asked."""
    actual = list(session.get_providers())
    missing = [p for p in config.providers if p not in actual]
    problems = []
    if missing:
        problems.append(f"onnxruntime could not use {', '.join(missing)}")
    if config.device_id is not None:
        placed = _provider_device(session, actual)
        if placed is not None and placed != config.device_id:
            problems.append(f"the GPU provider runs on GPU {placed}, not on GPU {config.device_id} as placed")
    if not problems:
        return None
    message = (
        f"{name}: {'; '.join(problems)} (asked for {', '.join(config.providers)}); running on {', '.join(actual)}. "
        "Check that the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs are installed (onnxruntime logs why)."
    )
    log.warning(message)
    return message


def _provider_device(session: Any, actual: list[str]) -> int | None:
    """The device id of the session's first GPU provider as onnxruntime reports it; None when unknown."""
    gpu = next((p for p in actual if p in GPU_PROVIDERS), None)
    if gpu is None or not hasattr(session, "get_provider_options"):
        return None
    value = str(session.get_provider_options().get(gpu, {}).get("device_id", ""))
    return int(value) if value.isdigit() else None


def _running_device(session: Any, actual: list[str], config: SessionConfig) -> int | None:
    """The GPU the session computes on when its first provider is a GPU one, else None (CPU)."""
    if not actual or actual[0] not in GPU_PROVIDERS:
        return None
    placed = _provider_device(session, actual)
    if placed is not None:
        return placed
    return config.device_id if config.device_id is not None else 0


def _preload_gpu_libraries(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries from the nvidia-* wheels (PyTorch's, for one) once per process, where
    onnxruntime-gpu can find them (onnxruntime >= 1.21; a no-op for a CPU build and where they are loaded)."""
    global _preloaded
    with _preload_lock:
        if _preloaded or not hasattr(ort, "preload_dlls"):
            return
        _preloaded = True
        try:
            ort.preload_dlls()
        except Exception as exc:  # the libraries may still be on the loader's default path
            log.info("onnxruntime.preload_dlls() failed (%s); relying on the default library path", exc)


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
