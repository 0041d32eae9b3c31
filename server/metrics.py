"""Prometheus metrics: one registry per server (no global registry, so tests run in parallel), children
bound once per model version so the hot path does no label lookups.

Request and queue durations are observed per request; compute durations and batch sizes per execution
(one batched run), which is what capacity planning needs. Series that describe state (pending requests,
model states, GPUs) are read at scrape time by a custom collector instead of being updated on every change.

Requests follow Prometheus' instrumentation practice: ``optiserve_inference_requests_total`` counts every
inference request once, when it ends, whatever its outcome, and ``optiserve_inference_failures_total{reason}``
the ones that failed, so ``failures / requests`` is the error ratio. A request that fails before it reaches a
served version (unknown model or version, a model still loading, a draining server) is counted under
``model="" version=""``: those names come from the client, and a label per name would let any client create
series without bound. Requests the access policy refuses (401/403) are refused before the model is looked up,
so a client without credentials cannot probe which models exist; they are not inference requests of any model
and are not counted here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "FAILURE_REASONS",
    "Metric",
    "RequestCounters",
    "ServerMetrics",
    "VersionMetrics",
    "optimizer_cache_families",
    "state_families",
]

log = logging.getLogger("optiserve.metrics")

# 0.1 ms .. 30 s, roughly x2.5 per step.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Why a request failed: refused for now, retry (503: queue full or timed out, shutting down, model not ready
# yet); the client went away; the model or runtime failed (500); the request was malformed (400/413); no such
# model or version (404); anything else.
FAILURE_REASONS = ("rejected", "canceled", "backend", "invalid", "not_found", "other")
NS = 1e-9


class ServerMetrics:
    """Every metric family of one server process."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        reg = self.registry
        self.requests = Counter(
            "optiserve_inference_requests",
            "Inference requests, every outcome (failures_total / requests_total is the error ratio).",
            labels,
            registry=reg,
        )
        self.failures = Counter(
            "optiserve_inference_failures", "Failed inference requests by reason.", (*labels, "reason"), registry=reg
        )
        self.inferences = Counter(
            "optiserve_inferences", "Samples inferred (a batched request counts each sample).", labels, registry=reg
        )
        self.executions = Counter("optiserve_executions", "Model executions (batches run).", labels, registry=reg)
        self.request_duration = self._histogram("request", "End-to-end time of a request inside the server.")
        self.queue_duration = self._histogram("queue", "Time a request waited in the batcher queue.")
        self.compute_input = self._histogram("compute_input", "Time to assemble one execution's input batch.")
        self.compute_infer = self._histogram("compute_infer", "Time the runtime took for one execution.")
        self.compute_output = self._histogram("compute_output", "Time to split one execution's outputs.")
        self.batch_size = Histogram(
            "optiserve_batch_size", "Samples per execution.", labels, buckets=BATCH_BUCKETS, registry=reg
        )
        self.load_duration = Histogram(
            "optiserve_model_load_duration_seconds",
            "Time to load one model version, optimization included.",
            ("model",),
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=reg,
        )
        self.optimization_step = Histogram(
            "optiserve_optimization_step_duration_seconds",
            "Time of each optimizer step by outcome.",
            ("model", "step", "status"),
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=reg,
        )
        self.time_to_ready = Gauge(
            "optiserve_model_time_to_ready_seconds",
            "Seconds from the start of a model's load until this version served (READY).",
            labels,
            registry=reg,
        )
        self.time_to_optimized = Gauge(
            "optiserve_model_time_to_optimized_seconds",
            "Seconds from the start of a model's load until this version served the optimizer's final choice.",
            labels,
            registry=reg,
        )
        self.cache_hits = Counter(
            "optiserve_optimization_cache_hits",
            "Model loads served from the optimization cache.",
            ("model",),
            registry=reg,
        )
        self.response_cache_hits = Counter(
            "optiserve_response_cache_hits",
            "Requests answered from the response cache (no queue, no execution).",
            labels,
            registry=reg,
        )
        self.response_cache_misses = Counter(
            "optiserve_response_cache_misses",
            "Requests of a response-cached model that the cache could not answer.",
            labels,
            registry=reg,
        )
        # Triton's nv_cache_hit_duration_per_model / nv_cache_miss_duration_per_model, in seconds.
        self.response_cache_hit_seconds = Counter(
            "optiserve_response_cache_hit_duration_seconds",
            "Time spent answering response cache hits (key and lookup).",
            labels,
            registry=reg,
        )
        self.response_cache_miss_seconds = Counter(
            "optiserve_response_cache_miss_duration_seconds",
            "Time spent on response cache misses (key, lookup, and inserting the response).",
            labels,
            registry=reg,
        )
        self.loads = Counter(
            "optiserve_model_loads",
            "Model loads that succeeded, by what started them (startup, explicit: load API or upload, poll, "
            "on_demand: a request); on_demand loads of evicted models show eviction thrash.",
            ("model", "trigger"),
            registry=reg,
        )
        self.evictions = Counter(
            "optiserve_model_evictions",
            "Models unloaded to make room in the memory budget (--model-memory-budget).",
            ("model",),
            registry=reg,
        )
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)

    def _histogram(self, stage: str, doc: str) -> Histogram:
        return Histogram(
            f"optiserve_{stage}_duration_seconds",
            doc,
            ("model", "version"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def for_version(self, model: str, version: str) -> VersionMetrics | None:
        """Children bound to one model version (None when metrics are off)."""
        if not self.enabled:
            return None
        ids = (model, version)
        return VersionMetrics(
            requests=self.requests.labels(*ids),
            failures=_failure_children(self.failures, ids),
            inferences=self.inferences.labels(*ids),
            executions=self.executions.labels(*ids),
            request_duration=self.request_duration.labels(*ids),
            queue_duration=self.queue_duration.labels(*ids),
            compute_input=self.compute_input.labels(*ids),
            compute_infer=self.compute_infer.labels(*ids),
            compute_output=self.compute_output.labels(*ids),
            batch_size=self.batch_size.labels(*ids),
            cache_hits=self.response_cache_hits.labels(*ids),
            cache_misses=self.response_cache_misses.labels(*ids),
            cache_hit_seconds=self.response_cache_hit_seconds.labels(*ids),
            cache_miss_seconds=self.response_cache_miss_seconds.labels(*ids),
        )

    def for_unrouted(self) -> RequestCounters | None:
        """Counters for requests that fail before they reach a served version, under ``model="" version=""``
        (None when metrics are off). Bound at once, so the series exist before the first failure."""
        if not self.enabled:
            return None
        return RequestCounters(self.requests.labels("", ""), _failure_children(self.failures, ("", "")))

    def add_state_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register a scrape-time collector (model states, pending requests, GPUs)."""
        self.registry.register(_CallbackCollector(collect))


def _failure_children(failures: Counter, ids: tuple[str, str]) -> dict[str, Any]:
    return {reason: failures.labels(*ids, reason) for reason in FAILURE_REASONS}


@dataclass
class RequestCounters:
    """The request and failure counters of requests no model version took (see the module's docstring)."""

    requests: Any
    failures: dict[str, Any]

    def count(self, reason: str) -> None:
        """One request failed before it reached a model version."""
        self.requests.inc()
        self.failures[reason if reason in self.failures else "other"].inc()


@dataclass
class VersionMetrics:
    """Bound children for one model version; called from the event loop and from worker threads."""

    requests: Any
    failures: dict[str, Any]
    inferences: Any
    executions: Any
    request_duration: Any
    queue_duration: Any
    compute_input: Any
    compute_infer: Any
    compute_output: Any
    batch_size: Any
    cache_hits: Any
    cache_misses: Any
    cache_hit_seconds: Any
    cache_miss_seconds: Any

    def observe_cache(self, hit: bool, duration_ns: int) -> None:
        """One response cache lookup of this version and the time the cache took for it."""
        if hit:
            self.cache_hits.inc()
            self.cache_hit_seconds.inc(duration_ns * NS)
        else:
            self.cache_misses.inc()
            self.cache_miss_seconds.inc(duration_ns * NS)

    def observe_request(self, reason: str | None, duration_ns: int) -> None:
        """One request ended: ``reason`` None is a success. Every request counts in ``requests``."""
        self.requests.inc()
        if reason is not None:
            self.failures[reason if reason in self.failures else "other"].inc()
        self.request_duration.observe(duration_ns * NS)

    def observe_execution(
        self, samples: int, queue_ns: list[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One batched execution serving ``len(queue_ns)`` requests."""
        self.inferences.inc(samples)
        self.executions.inc()
        self.batch_size.observe(samples)
        for waited in queue_ns:
            self.queue_duration.observe(waited * NS)
        self.compute_input.observe(input_ns * NS)
        self.compute_infer.observe(infer_ns * NS)
        self.compute_output.observe(output_ns * NS)


class _CallbackCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must never fail because one state probe did
            log.exception("state collector failed")


def state_families(
    states: list[tuple[str, str, str]], pending: list[tuple[str, str, int]], selected: list[tuple[str, str, str]]
) -> list[Metric]:
    """Gauges for model states (one series per state, 1 for the current one), pending requests, and the
    optimizer's selected variant as an info metric."""
    state_family = GaugeMetricFamily(
        "optiserve_model_state", "1 for the state each model version is in.", labels=["model", "version", "state"]
    )
    for model, version, current in states:
        for state in ("LOADING", "READY", "UNAVAILABLE"):
            state_family.add_metric([model, version, state], 1.0 if state == current else 0.0)
    pending_family = GaugeMetricFamily(
        "optiserve_pending_requests", "Requests queued or running.", labels=["model", "version"]
    )
    for model, version, count in pending:
        pending_family.add_metric([model, version], float(count))
    info = InfoMetricFamily("optiserve_model_variant", "Variant the optimizer selected.", labels=["model", "version"])
    for model, version, variant in selected:
        info.add_metric([model, version], {"selected": variant})
    return [state_family, pending_family, info, *gpu_families()]


def optimizer_cache_families(counts: dict[str, int]) -> list[Metric]:
    """Whole optimizer runs by how their result was found (``hit``: the cache; ``miss``: this server optimized;
    ``waited``: the cache, after another server sharing --cache-dir finished optimizing the same model). Replicas
    sharing a cache folder should show one miss per model between them."""
    family = CounterMetricFamily(
        "optiserve_optimizer_cache", "Optimizer runs by where their result came from.", labels=["result"]
    )
    for result, count in sorted(counts.items()):
        family.add_metric([result], float(count))
    return [family]


def memory_families(versions: list[tuple[str, str, str, int]], budget: int, used: int) -> list[Metric]:
    """Host memory per loaded version (``device`` is where it lives: ``cpu`` for host RSS), the budget (0: none)
    and the total the budget counts."""
    per_version = GaugeMetricFamily(
        "optiserve_model_memory_bytes",
        "Memory a loaded model version holds (RSS growth of its sessions and warmup, at least its files).",
        labels=["model", "version", "device"],
    )
    for model, version, device, size in versions:
        per_version.add_metric([model, version, device], float(size))
    limit = GaugeMetricFamily("optiserve_model_memory_budget_bytes", "The model memory budget; 0: no budget.")
    limit.add_metric([], float(budget))
    total = GaugeMetricFamily("optiserve_model_memory_used_bytes", "Memory all loaded model versions hold.")
    total.add_metric([], float(used))
    return [per_version, limit, total]


def gpu_families() -> list[Metric]:
    """Utilization and memory per NVIDIA GPU when nvidia-ml-py is importable and a driver answers."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    utilization = GaugeMetricFamily("optiserve_gpu_utilization_ratio", "GPU busy fraction.", labels=["gpu"])
    used = GaugeMetricFamily("optiserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
    total = GaugeMetricFamily("optiserve_gpu_memory_total_bytes", "GPU memory size.", labels=["gpu"])
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization.add_metric([str(index)], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
    finally:
        pynvml.nvmlShutdown()
    return [utilization, used, total]
