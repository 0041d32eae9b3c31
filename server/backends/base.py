"""The lifecycle every backend shares: load -> infer* -> unload.

The public methods enforce the lifecycle; subclasses fill the ``*_impl`` hooks, so a backend cannot
be run before it is loaded or after it is unloaded whatever the subclass does.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

import numpy as np

from server.errors import InternalError, ModelNotReady

Tensors = dict[str, np.ndarray]


class Lifecycle(Enum):
    """Where a backend instance is in its life."""

    CREATED = "created"
    LOADED = "loaded"
    UNLOADED = "unloaded"


class Backend(ABC):
    """One instance of a model on one device. ``infer`` may be called from worker threads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._state = Lifecycle.CREATED
        self._lock = threading.Lock()

    @property
    def state(self) -> Lifecycle:
        """Current lifecycle stage."""
        return self._state

    def load(self) -> None:
        """Create the runtime session; only once."""
        with self._lock:
            if self._state is not Lifecycle.CREATED:
                raise InternalError(f"{self.name}: load() called in state {self._state.value}")
            self.load_impl()
            self._state = Lifecycle.LOADED

    def infer(self, inputs: Tensors) -> Tensors:
        """Run one (possibly batched) execution; the inputs were validated by the caller."""
        self._check_loaded()
        return self.infer_impl(inputs)

    def probe(self, inputs: Tensors) -> Tensors:
        """:meth:`infer` for a run that may well fail and whose caller reports the failure itself (the default
        warmup trying sizes for dynamic dims): the runtime keeps its own error log quiet."""
        self._check_loaded()
        return self.probe_impl(inputs)

    def _check_loaded(self) -> None:
        if self._state is not Lifecycle.LOADED:
            raise ModelNotReady(f"{self.name}: backend is {self._state.value}, not loaded")

    def prepare(self) -> None:
        """Called once on the worker thread that will run this instance, before its first batch: for work tied to
        that thread (CUDA graphs). Nothing by default."""
        return None

    @property
    def any_thread(self) -> bool:
        """Whether ``infer`` may run on any thread, the event loop's included (the batcher's inline runs at low
        load), rather than only on the worker thread that ran ``prepare``. No by default."""
        return False

    def staging_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        """A buffer the batcher may concatenate input ``name`` of the next batch into, valid until that batch
        has run (pinned host memory on a GPU instance); None: let numpy allocate."""
        return None

    def unload(self) -> None:
        """Release the runtime session; safe to call more than once."""
        with self._lock:
            if self._state is Lifecycle.LOADED:
                self.unload_impl()
            self._state = Lifecycle.UNLOADED

    @abstractmethod
    def load_impl(self) -> None:
        """Create the runtime objects."""

    @abstractmethod
    def infer_impl(self, inputs: Tensors) -> Tensors:
        """Compute every output of the model for ``inputs``."""

    def probe_impl(self, inputs: Tensors) -> Tensors:
        """:meth:`probe`'s run: :meth:`infer_impl` unless the runtime logs failures of its own."""
        return self.infer_impl(inputs)

    @abstractmethod
    def unload_impl(self) -> None:
        """Drop the runtime objects."""
