"""Triton's response cache: a model whose config says ``response_cache { enable: true }`` answers a request it
has answered before from memory, skipping the queue and the backend.

One cache per server (``--response-cache-bytes``, 0 = off), shared by every version that enables it; least
recently used entries go first once the stored outputs and keys exceed that size. An entry is keyed by a
256-bit BLAKE2b digest of the version's generation (a number unique to one :class:`ModelVersion` object, so a
reload, a new version or an optimized rebuild never serves another's entries), the model name and version, each
input's name, datatype, shape and bytes, and the requested outputs with their parameters. A 256-bit digest is
taken as exact: a collision is not a practical concern. A closed version's entries are dropped.

Lookups and inserts run on the event loop (and may come from threads in tests); one short lock guards them.
Stored arrays are private read-only copies: what a hit returns cannot be changed by an encoder or a caller.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.protocol.inference import InputTensor, RequestedOutput

log = logging.getLogger("optiserve.models")

_generations = itertools.count(1)
OBJECT_POINTER_BYTES = 8


def next_generation() -> int:
    """A number no other ModelVersion of this process gets: the cache's notion of a version's identity."""
    return next(_generations)


@dataclass(frozen=True)
class CachedOutput:
    """One stored output tensor: its name, V2 datatype name and a read-only array."""

    name: str
    datatype: str
    array: np.ndarray


@dataclass
class _Entry:
    generation: int
    outputs: tuple[CachedOutput, ...]
    size: int


class ResponseCache:
    """An LRU map from request keys to outputs, bounded by ``max_bytes`` (0: off, every call is a no-op)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._by_generation: dict[int, set[bytes]] = {}
        self._retired: set[int] = set()
        self._bytes = 0
        self._evictions = 0
        self._warned_off = False

    @property
    def enabled(self) -> bool:
        """Whether the server gave the cache any room."""
        return self.max_bytes > 0

    @property
    def size_bytes(self) -> int:
        """Bytes held now (stored outputs plus keys)."""
        with self._lock:
            return self._bytes

    @property
    def entries(self) -> int:
        """Responses held now."""
        with self._lock:
            return len(self._entries)

    def for_model(self, name: str, enable: bool) -> ResponseCache | None:
        """The cache a version of model ``name`` should use: None when its config does not enable it, or when
        the server's cache size is 0 (logged once per server, as the model still loads and serves)."""
        if not enable:
            return None
        if not self.enabled:
            with self._lock:
                warn, self._warned_off = not self._warned_off, True
            if warn:
                log.warning(
                    "model %s enables response_cache, but the response cache is off server-wide "
                    "(--response-cache-bytes 0); serving without it",
                    name,
                )
            return None
        return self

    @staticmethod
    def key(
        generation: int,
        model: str,
        version: int,
        inputs: Iterable[InputTensor],
        outputs: Sequence[RequestedOutput],
        output_names: Sequence[str],
    ) -> bytes:
        """The digest of everything that decides a response (see the module's docstring). ``output_names`` are
        the outputs the response will hold, in order (all of them when the request named none)."""
        digest = hashlib.blake2b(digest_size=32)
        _field(digest, b"v1")
        _field(digest, struct.pack("<qq", generation, version))
        _field(digest, model.encode())
        for tensor in sorted(inputs, key=lambda t: t.name):
            array = tensor.array
            _field(digest, tensor.name.encode())
            _field(digest, tensor.datatype.name.encode())
            _field(digest, array.dtype.str.encode())
            _field(digest, struct.pack(f"<{array.ndim + 1}q", array.ndim, *array.shape))
            if array.dtype == np.object_:
                for element in array.reshape(-1):
                    _field(digest, element.encode() if isinstance(element, str) else bytes(element))
            else:
                data = np.ascontiguousarray(array)
                digest.update(struct.pack("<q", data.nbytes))
                digest.update(data.reshape(-1).view(np.uint8).data)
        _field(digest, struct.pack("<q", len(output_names)))
        for name in output_names:
            _field(digest, name.encode())
        _field(digest, struct.pack("<q", len(outputs)))
        for requested in outputs:
            binary = -1 if requested.binary is None else int(requested.binary)
            _field(digest, requested.name.encode())
            _field(digest, struct.pack("<qq", binary, requested.classification))
        return digest.digest()

    def get(self, key: bytes) -> tuple[CachedOutput, ...] | None:
        """The stored outputs for ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.outputs

    def put(self, generation: int, key: bytes, outputs: Iterable[tuple[str, str, np.ndarray]]) -> bool:
        """Store private read-only copies of ``outputs`` (name, datatype, array) under ``key``, evicting the least
        recently used entries until they fit. False when the entry alone is larger than the cache."""
        if not self.enabled:
            return False
        stored = tuple(CachedOutput(name, datatype, _frozen_copy(array)) for name, datatype, array in outputs)
        size = len(key) + sum(_array_bytes(o.array) for o in stored)
        if size > self.max_bytes:
            return False
        with self._lock:
            if generation in self._retired:  # the version closed while this request ran
                return False
            if key in self._entries:
                self._remove(key)
            while self._entries and self._bytes + size > self.max_bytes:
                self._remove(next(iter(self._entries)))
                self._evictions += 1
            self._entries[key] = _Entry(generation, stored, size)
            self._by_generation.setdefault(generation, set()).add(key)
            self._bytes += size
        return True

    def drop(self, generation: int) -> int:
        """Forget every entry of one version (it is closing) and refuse its later inserts; returns how many
        entries went."""
        with self._lock:
            self._retired.add(generation)
            keys = self._by_generation.pop(generation, set())
            for key in keys:
                entry = self._entries.pop(key)
                self._bytes -= entry.size
            return len(keys)

    def metric_families(self) -> list[Metric]:
        """Scrape-time series of the whole cache (none while it is off): its size, the bytes and responses it
        holds, and how many responses the size limit evicted (a version's close drops its own, not counted)."""
        if not self.enabled:
            return []
        with self._lock:
            used, entries, evictions = self._bytes, len(self._entries), self._evictions
        name = "optiserve_response_cache_"
        return [
            GaugeMetricFamily(f"{name}size_bytes", "Room given to the response cache.", self.max_bytes),
            GaugeMetricFamily(f"{name}used_bytes", "Bytes the response cache holds (outputs and keys).", used),
            GaugeMetricFamily(f"{name}entries", "Responses the response cache holds.", entries),
            CounterMetricFamily(f"{name}evictions", "Responses evicted to make room (least recently used).", evictions),
        ]

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
        keys = self._by_generation.get(entry.generation)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_generation[entry.generation]


def _field(digest: hashlib.blake2b, data: bytes) -> None:
    """Length-prefixed, so that no two different sequences of fields hash the same bytes."""
    digest.update(struct.pack("<q", len(data)))
    digest.update(data)


def _frozen_copy(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True, order="C")
    copy.setflags(write=False)
    return copy


def _array_bytes(array: np.ndarray) -> int:
    if array.dtype == np.object_:
        return sum(OBJECT_POINTER_BYTES + len(e) for e in array.reshape(-1))
    return int(array.nbytes)
