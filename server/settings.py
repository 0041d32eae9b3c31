"""Server settings: every field is a CLI flag (``--http-port``) and an environment variable
(``OPTISERVE_HTTP_PORT``). The field docstrings are the help text, so the two cannot drift."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
GIB = 1024 * MIB


class Settings(BaseSettings):
    """Everything the composition root needs to build a server."""

    model_config = SettingsConfigDict(
        env_prefix="OPTISERVE_", use_attribute_docstrings=True, extra="ignore", validate_default=True
    )

    model_repository: Path = Path("model_repo")
    """Folder holding models in Triton's layout: <model>/<version>/model.onnx plus an optional config."""

    model_control_mode: Literal["none", "explicit", "poll"] = "explicit"
    """Triton's model control modes; every mode loads all models of the repository at start. explicit: the
    load, unload and upload APIs change what is served (Triton's explicit with --load-model=*). none: the
    repository is read once, and those APIs answer 400. poll: the repository is rescanned every
    --repository-poll-secs and new models and versions are loaded, changed ones reloaded and removed ones
    unloaded, so replicas sharing one repository serve the same models; uploads work (they change the
    repository), load and unload without files answer 400 as in Triton."""

    repository_poll_secs: float = Field(15.0, gt=0, le=3600)
    """poll mode: seconds between two rescans of the repository (Triton's --repository-poll-secs)."""

    host: str = "127.0.0.1"
    """Address both listeners bind to; use 0.0.0.0 inside a container."""

    http_port: int = Field(8000, ge=0, le=65535)
    """HTTP (KServe V2 REST) port; 0 picks a free one."""

    grpc_port: int = Field(8001, ge=0, le=65535)
    """gRPC (KServe V2 / Triton GRPCInferenceService) port; 0 picks a free one."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level of log lines printed."""

    access_log: bool = False
    """Log one line per HTTP request (off by default: it costs throughput)."""

    max_request_bytes: int = Field(64 * MIB, gt=0)
    """Largest HTTP request body accepted, also after gzip/deflate decompression (413 beyond)."""

    max_header_bytes: int = Field(64 * 1024, ge=1024)
    """Largest HTTP request line plus headers accepted (431 beyond, and the connection closes): they are held
    in memory before any body limit applies."""

    header_timeout_s: float = Field(30.0, gt=0)
    """How long an HTTP client may take to send a request line and headers, counted from its first byte (from
    connecting, for a connection's first request): 408 beyond, and the connection closes."""

    max_grpc_message_bytes: int = Field(64 * MIB, gt=0)
    """Largest gRPC message received or sent (RESOURCE_EXHAUSTED beyond)."""

    max_upload_bytes: int = Field(2 * GIB, gt=0)
    """Largest total size of the model files of one upload (413 beyond). Multipart uploads stream to disk;
    Triton's load path (base64 JSON over HTTP, one gRPC message) holds the files in memory."""

    max_tensor_elements: int = Field(1 << 26, gt=0)
    """Largest element count of one input tensor, checked before any allocation (413 beyond)."""

    max_tensor_rank: int = Field(16, gt=0)
    """Largest number of dimensions of one input tensor."""

    max_inputs: int = Field(256, gt=0)
    """Largest number of input or requested output tensors in one request."""

    default_max_batch_size: int = Field(32, ge=0)
    """max_batch_size given to a model whose config leaves it unset and whose graph has a dynamic
    first dimension on every input and output (Triton's --backend-config default-max-batch-size)."""

    default_max_queue_size: int = Field(256, ge=0)
    """Requests a model may hold queued before new ones get 503 + Retry-After (0 = unbounded); a
    model's dynamic_batching.default_queue_policy.max_queue_size overrides it."""

    intra_op_threads: int = Field(0, ge=0)
    """onnxruntime intra-op threads per model instance; 0 splits the machine's cores between the
    instances of a model so that instances x threads <= cores."""

    inter_op_threads: int = Field(1, ge=1)
    """onnxruntime inter-op threads per instance (parallel branches of a graph)."""

    allow_spinning: bool = False
    """Let onnxruntime's idle threads busy-wait for work: ~0.1 ms lower latency for an idle server, but
    under load the spinning threads take CPU from the event loop (off by default)."""

    inline_compute_us: int = Field(500, ge=0)
    """At low load, run a request on the event loop instead of handing it to a worker thread and back (two
    thread wake-ups, ~0.1-0.15 ms on 2 vCPUs) when its model's CPU instances answer one request in under this
    many microseconds; 0 = always use the workers. Batching is unchanged under load (README, Batching)."""

    gc_freeze: bool = True
    """Keep start-up objects and loaded models out of Python's full garbage collections (gc.freeze, redone
    whenever the served models change): under load these otherwise stop the server for ~60 ms every few
    seconds (server/heap.py)."""

    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    """onnxruntime graph optimization level for every session."""

    execution_providers: list[str] = Field(default_factory=list)
    """onnxruntime execution providers in order of preference; empty picks TensorRT, CUDA, then CPU
    among those installed."""

    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    """How the CUDA provider picks convolution kernels: EXHAUSTIVE benchmarks every cuDNN algorithm for each new
    input shape (fastest kernels, but a batcher that forms many batch sizes pays that search again and again),
    HEURISTIC asks cuDNN's heuristics (cheap, near the best), DEFAULT takes the first algorithm."""

    pinned_host_buffers: bool = True
    """GPU instances concatenate batches into page-locked host memory, so the upload to the GPU is one DMA
    instead of a copy through the driver's bounce buffer (needs the CUDA runtime library; off: pageable memory)."""

    tensorrt_workspace_bytes: int = Field(4 * GIB, gt=0)
    """Scratch memory TensorRT may use per engine while building and running (trt_max_workspace_size): more
    lets it consider faster tactics."""

    default_precision: Literal["auto", "fp32", "fp16", "bf16", "int8", "none"] = "auto"
    """Optimization for models whose config has no optimize block: auto lets every candidate the accuracy
    guard accepts compete and serves the fastest (never slower than the original); none serves the file
    as uploaded."""

    optimize_mode: Literal["background", "before_ready"] = "background"
    """When the optimizer runs for models whose optimize block sets no mode: background serves the original
    model as soon as it is loaded and swaps a proven variant in later, with no request lost; before_ready keeps
    the version LOADING until it is optimized. A cached result is applied before READY in both modes."""

    optimize_delay_s: float = Field(0.0, ge=0, le=3600)
    """Background mode: wait this long after a version is READY before optimizing it, so the first traffic
    does not compete with the optimizer for the CPU."""

    optimize_nice: int = Field(10, ge=0, le=19)
    """Background mode: how much lower the background optimizer's OS scheduling priority is (Linux nice
    increment for its thread and the onnxruntime threads of its candidate sessions), so serving keeps the CPU
    under load; the optimized variant's serving sessions are built at normal priority. 0: off."""

    cache_dir: Path = Path(".optiserve-cache")
    """Where optimized artifacts are kept, so a restart or a re-upload of the same bytes reuses them."""

    cache_max_bytes: int = Field(10 * 1024 * MIB, gt=0)
    """Size cap of the optimization cache; least recently used artifacts are evicted beyond it."""

    response_cache_bytes: int = Field(0, ge=0)
    """Size of the response cache shared by every model whose config sets response_cache { enable: true }
    (Triton's --cache-config local,size=N): identical requests are answered from memory, skipping the queue and
    the model; least recently used responses go first. 0: off."""

    exit_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM/SIGINT, how long in-flight and queued requests may take to finish before exit."""

    admin_token: SecretStr | None = None
    """Bearer token required for upload/load/unload from every client; unset, these are allowed from
    loopback clients only. Prefer the environment variable over the flag (process lists show flags)."""

    inference_token: SecretStr | None = None
    """Bearer token required for inference, metadata, statistics and the repository index; unset, they
    are open. Health endpoints stay open either way; the admin token is accepted too."""

    allow_client_shm: bool = False
    """Let clients register system shared memory (Triton's extension): inputs are read from and outputs
    written to a /dev/shm segment the client names, instead of travelling over the socket. Only for clients
    on this host that may read and write this server user's shared memory (off by default)."""

    max_shm_regions: int = Field(64, ge=1, le=4096)
    """Most shared memory regions registered at once (each holds a mapping), so clients cannot exhaust them."""

    metrics: bool = True
    """Serve Prometheus metrics at GET /metrics (--no-metrics turns collection off)."""

    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Also serve /metrics on this separate port (for scrapers kept off the inference port)."""

    tracing: bool = False
    """Trace inference requests with OpenTelemetry (needs the ``tracing`` extra); on as well when
    OTEL_TRACES_EXPORTER is set. Exporter, endpoint, sampler and service name come from the standard OTEL_*
    environment variables (README, "Tracing")."""

    log_format: Literal["text", "json"] = "text"
    """Log lines as plain text or as one JSON object per line (for log collectors)."""

    optimize_from_traffic: bool = True
    """Background mode: while a version serves its original model, keep a bounded uniform sample of the inputs
    of its real requests (in memory only, never logged) and calibrate and check the optimized variants on it
    instead of generated inputs. A model opts out with optimize { from_traffic: false }; a samples.npz beside
    the model wins. --no-optimize-from-traffic turns it off for every model."""

    optimize_traffic_wait_s: float = Field(60.0, ge=0, le=3600)
    """Background mode: how long after READY the optimizer waits for --optimize-traffic-min-samples request
    samples; with fewer by then it uses generated inputs."""

    optimize_traffic_min_samples: int = Field(32, ge=1, le=256)
    """Background mode: request samples (rows of a batch) the optimizer waits for before using traffic."""

    optimize_traffic_max_samples: int = Field(256, ge=1, le=256)
    """Most request samples kept per version (the optimizer uses at most 256)."""

    optimize_traffic_max_bytes: int = Field(64 * MIB, gt=0)
    """Most bytes of request samples kept per version; fewer samples are kept when they are large."""

    model_memory_budget: str = ""
    """Host memory all loaded model versions may hold together: bytes (2GiB, 512MiB, 1073741824) or a fraction
    of the memory the process may use (0.6: of the container's cgroup limit, else of the host's). A load that
    would exceed it first unloads idle models, least recently used first (never pinned ones, nor ones with
    requests in flight); one that can never fit fails with the reason. Empty: no budget (memory is still
    measured and reported)."""

    model_min_residency_s: float = Field(10.0, ge=0, le=86400)
    """With a memory budget: a model loaded less than this long ago is not unloaded to make room (against
    eviction thrash); a load that needs its room waits for it, up to --load-wait-s."""

    load_on_demand: bool = False
    """Load a model that is in the repository but not loaded when a request first needs it (an evicted one
    too), instead of answering 404; concurrent first requests share one load. Start-up then loads only
    pinned models (config parameter "pinned": "true")."""

    load_wait_s: float = Field(60.0, gt=0, le=3600)
    """How long a request waits for an on-demand load, and a load for room in the memory budget, when the
    request sets no timeout of its own (Triton's timeout parameter); then 503 with Retry-After."""

    replica_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """This server's name among the replicas sharing its repository: GET /v2/repository/replicas lists it, and in
    poll mode it names the heartbeat file .optiserve/replicas/<id>.json. Unset: <hostname>-<pid>; in Kubernetes
    set it to the pod name. Two running servers must not share one."""

    @field_validator("model_memory_budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        parse_budget(value, limit=1)  # a clear start-up error for a malformed value; resolved by the manager
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _absolute_paths(cls, value: Any) -> Any:
        """Every path setting is made absolute once, here, against the folder the server was started from:
        a relative path handed on later (to the converter worker, which runs in its own folder, or to a
        native library) would otherwise be resolved against some other working folder. ``~`` is expanded;
        symlinks are kept (``abspath`` only joins and normalises)."""
        if isinstance(value, Path):
            return Path(os.path.abspath(value.expanduser()))
        return value


def parse_budget(text: str, limit: int | None = None) -> int:
    """``--model-memory-budget``: bytes (``2147483648``, ``512MiB``, ``2GB``, ``1.5GiB``) or a fraction of the
    memory this process may use (``0.6``: the cgroup's limit, else the host's memory); ``""``/``0``: off."""
    text = text.strip()
    if not text or text == "0":
        return 0
    units = {"kib": 1024, "mib": MIB, "gib": GIB, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    lowered = text.lower()
    unit = next((u for u in units if lowered.endswith(u)), "")
    try:
        number = float(lowered[: len(lowered) - len(unit)].strip())
    except ValueError:
        number = -1.0
    if unit and number > 0:
        return int(number * units[unit])
    if not unit and 0 < number <= 1:
        return int(number * (limit if limit is not None else memory_limit()))
    if not unit and number > 1 and number.is_integer():
        return int(number)
    raise ValueError(f"{text!r}: give bytes (e.g. 2GiB, 512MiB, 1073741824) or a fraction of memory in (0, 1]")


def memory_limit() -> int:
    """The memory this process may use: its cgroup's limit (a container's), else the host's total."""
    for path in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < (1 << 60):  # cgroup v1 writes a huge number for "no limit"
            return int(value)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
