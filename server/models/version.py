"""A served model version: what it accepts, the instances that run it, its batcher, statistics and the
optimizer's report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from server.backends.base import Backend
from server.errors import InvalidInput
from server.models.batching import Batcher
from server.models.response_cache import ResponseCache, next_generation
from server.models.stats import ModelStats
from server.protocol import classification, datatypes
from server.protocol.inference import InferenceRequest, InferenceResponse, OutputTensor
from server.protocol.validation import TensorSpec, check_requested_outputs, prepare_inputs
from server.repository.config import ModelConfig

if TYPE_CHECKING:
    from server.models.loader import PendingOptimization
    from server.models.reservoir import Reservoir


@dataclass
class ModelVersion:
    """One served version: what it accepts, the instances that run it, and its statistics."""

    name: str
    version: int
    config: ModelConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    backends: list[Backend]
    batcher: Batcher
    stats: ModelStats
    variant: str = "original"
    report: dict[str, Any] = field(default_factory=dict)
    pending: PendingOptimization | None = None
    """What the background optimizer needs (a loader's PendingOptimization) while this version serves its
    original model; None once optimized, or when nothing is left to do."""
    reservoir: Reservoir | None = None
    """While ``pending``: the sample of real requests' inputs the background optimizer collects (reservoir.py)."""
    labels: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    """Each output's labels from its ``label_filename`` (server/models/labels.py), for classification."""
    response_cache: ResponseCache | None = None
    """The server's response cache when this model's config enables it and the server gave it room."""
    generation: int = field(default_factory=next_generation)
    """This object's identity in the response cache: a rebuilt or reloaded version never shares entries."""
    memory_bytes: int = 0
    """Host memory this version holds (all its instances), as the memory budget counts it (server/models/memory.py)."""
    in_flight: int = 0
    """Requests looked up for this version and not yet answered (the data plane counts them), so the memory
    budget never unloads a version a request is about to use."""

    @property
    def max_batch_size(self) -> int:
        """The config's max_batch_size (0: the model takes no batch dimension)."""
        return int(self.config.max_batch_size)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Validate, queue, wait, and pick the requested outputs. The data plane counts the outcome."""
        prepared = prepare_inputs(request, self.inputs, self.max_batch_size)
        names = check_requested_outputs(request, self.outputs)
        top = self._classifications(request)
        priority, timeout_us = scheduling_parameters(request.parameters)
        if self.reservoir is not None:  # a valid request to a version the background optimizer still samples
            self.reservoir.offer(prepared.tensors, prepared.samples)
        cache = self.response_cache
        if cache is not None:
            started = time.perf_counter_ns()
            key = cache.key(self.generation, self.name, self.version, request.inputs, request.outputs, names)
            cached = cache.get(key)
            if cached is not None:  # a hit: no queue, no execution
                self.stats.record_cache(True, time.perf_counter_ns() - started)
                hit = [OutputTensor(o.name, datatypes.BY_NAME[o.datatype], o.array) for o in cached]
                return InferenceResponse(self.name, str(self.version), hit, id=request.id)
            lookup_ns = time.perf_counter_ns() - started
        results = await self.batcher.submit(
            prepared.tensors, prepared.samples, prepared.key, priority=priority, timeout_us=timeout_us
        )
        outputs = [self._output(n, results[n], top.get(n, 0)) for n in names]
        if cache is not None:
            started = time.perf_counter_ns()
            cache.put(self.generation, key, ((o.name, o.datatype.name, o.array) for o in outputs))
            self.stats.record_cache(False, lookup_ns + time.perf_counter_ns() - started)
        return InferenceResponse(self.name, str(self.version), outputs, id=request.id)

    def _classifications(self, request: InferenceRequest) -> dict[str, int]:
        """The outputs asked for as top-k classes (Triton's classification extension), checked before
        anything is queued: only outputs that hold numbers can be classified."""
        top = {o.name: o.classification for o in request.outputs if o.classification}
        for spec in self.outputs:
            if spec.name in top:
                classification.check_classifiable(spec.name, spec.datatype)
        return top

    def _output(self, name: str, array: np.ndarray, k: int) -> OutputTensor:
        """One result tensor, or its top ``k`` classes when the request asked for them."""
        if k:
            classification.check_classifiable(name, datatypes.of_array(array))
            labels = self.labels.get(name, ())
            array = classification.top_k(array, k, batched=self.max_batch_size > 0, labels=labels)
        return OutputTensor(name, datatypes.of_array(array), array)

    def close(self, timeout_s: float, *, replaced: bool = False) -> None:
        """Drain the queue, then release every instance (``replaced``: a newer version now serves)."""
        self.batcher.close(timeout_s, replaced=replaced)
        for backend in self.backends:
            backend.unload()
        if self.response_cache is not None:
            self.response_cache.drop(self.generation)


def scheduling_parameters(parameters: dict[str, Any]) -> tuple[int, int | None]:
    """Triton's schedule-policy request parameters: ``priority`` (1 = highest) and ``timeout`` (us)."""
    priority, timeout = parameters.get("priority", 0), parameters.get("timeout")
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise InvalidInput(f"parameters.priority: must be a non-negative integer, got {priority!r}")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise InvalidInput(f"parameters.timeout: must be a non-negative integer of microseconds, got {timeout!r}")
    return priority, timeout or None
