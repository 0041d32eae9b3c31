"""A bounded, uniform sample of the inputs a version really receives, for the background optimizer: INT8
calibration and the accuracy guard then run on the data the model sees instead of generated inputs.

Reservoir sampling (Li's Algorithm L): every row offered so far has the same chance to be kept, and once the
reservoir is full an offer only advances a counter until the next row to keep comes, so the request path pays
almost nothing. Rows are per sample (a batched request is split along dim 0) so the optimizer can re-batch
them. Bounded by a sample count and by bytes; kept in memory only, and nothing here is ever logged."""

from __future__ import annotations

import io
import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimizers.cache import atomic_write_bytes
from optimizers.reference import TRAFFIC_SUFFIX
from server.protocol.validation import TensorSpec

UNSAMPLED_TYPES = frozenset({"BYTES", "BF16"})
"""Datatypes a .npz cannot carry as plain arrays (strings; ml_dtypes' bfloat16)."""

Row = dict[str, np.ndarray]


@dataclass(frozen=True)
class ReservoirLimits:
    """How much one version may keep."""

    max_samples: int
    max_bytes: int


def unsupported(specs: Sequence[TensorSpec]) -> str | None:
    """Why a model's inputs cannot be sampled (the optimizer needs every input of every sample), or None."""
    for spec in specs:
        if spec.datatype.name in UNSAMPLED_TYPES:
            return f"input {spec.name!r} is {spec.datatype.name}: only fixed-size numeric inputs are sampled"
    return None if specs else "the model has no inputs"


class Reservoir:
    """Up to ``capacity`` rows, a uniform sample of all rows offered. The per-sample shapes of the first row
    offered are kept; rows of other shapes (another sequence length) are counted in :attr:`skipped`."""

    def __init__(self, names: Sequence[str], batched: bool, limits: ReservoirLimits, seed: int | None = None) -> None:
        self.names = tuple(names)
        self.batched = batched
        self.limits = limits
        self.capacity = limits.max_samples
        self.seen = 0
        """Rows offered with the kept shapes."""
        self.skipped = 0
        """Rows offered with other shapes, or after :meth:`take`."""
        self.reason = ""
        """Why nothing is kept although rows came (one row over the byte cap)."""
        self._rows: list[Row] = []
        self._signature: tuple[tuple[str, tuple[int, ...], str], ...] | None = None
        self._rng = random.Random(seed)
        self._weight = 1.0
        self._next = math.inf  # index of the next row to keep once full
        self._closed = False
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Rows held now."""
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(array.nbytes for row in list(self._rows) for array in row.values())

    def offer(self, tensors: Mapping[str, np.ndarray], samples: int) -> None:
        """A validated request's inputs (``samples`` rows along dim 0 when batched, else one sample)."""
        rows = samples if self.batched else 1
        with self._lock:
            if self._closed or not self._fits(tensors):
                self.skipped += rows
                return
            start = self.seen
            self.seen += rows
            index = 0
            while index < rows and len(self._rows) < self.capacity:
                self._rows.append(self._row(tensors, index))
                index += 1
                if len(self._rows) == self.capacity:
                    self._weight = math.exp(math.log(self._uniform()) / self.capacity)
                    self._next = start + index - 1 + self._skip() + 1
            while self._next < self.seen:
                self._rows[self._rng.randrange(self.capacity)] = self._row(tensors, int(self._next) - start)
                self._weight *= math.exp(math.log(self._uniform()) / self.capacity)
                self._next += self._skip() + 1

    def take(self) -> dict[str, np.ndarray]:
        """The rows held, stacked per input (empty when none); the reservoir stops sampling and lets them go."""
        with self._lock:
            self._closed = True
            rows, self._rows = self._rows, []
        if not rows:
            return {}
        return {name: np.stack([row[name] for row in rows]) for name in self.names}

    def _fits(self, tensors: Mapping[str, np.ndarray]) -> bool:
        """Whether a request's per-sample shapes and dtypes are the kept ones (the first request sets them)."""
        signature = tuple(
            (name, tuple(tensors[name].shape[1:] if self.batched else tensors[name].shape), tensors[name].dtype.str)
            for name in self.names
        )
        if self._signature is None:
            self._signature = signature
            row_bytes = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in signature)
            self.capacity = min(self.limits.max_samples, self.limits.max_bytes // max(row_bytes, 1))
            if self.capacity == 0:
                self.reason = f"one sample is {row_bytes} bytes, over the {self.limits.max_bytes}-byte cap"
                self._closed = True
                return False
        return signature == self._signature

    def _row(self, tensors: Mapping[str, np.ndarray], index: int) -> Row:
        """A copy: a request's arrays may be views of its body or of a shared-memory region."""
        if self.batched:
            return {name: np.array(tensors[name][index], copy=True) for name in self.names}
        return {name: np.array(tensors[name], copy=True) for name in self.names}

    def _uniform(self) -> float:
        """Uniform in (0, 1): both logarithms of Algorithm L stay finite."""
        value = self._rng.random()
        while value <= 0.0 or value >= 1.0:
            value = self._rng.random()
        return value

    def _skip(self) -> int:
        """How many rows to pass over before the next one kept (Algorithm L's geometric jump)."""
        if self._weight >= 1.0:
            return 0
        return math.floor(math.log(self._uniform()) / math.log1p(-self._weight))


def write_samples(arrays: Mapping[str, np.ndarray], folder: Path, stem: str) -> Path:
    """Write ``arrays`` as ``<stem>.traffic.npz`` in ``folder``, atomically (the optimizer reads a whole file)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    path = folder / f"{stem}{TRAFFIC_SUFFIX}"
    atomic_write_bytes(path, buffer.getvalue())
    return path
