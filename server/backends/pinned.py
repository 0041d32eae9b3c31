"""Page-locked ("pinned") host memory for GPU instances, and the per-instance staging buffers built on it.

A copy from ordinary (pageable) host memory to a GPU goes through a driver bounce buffer: the driver first
copies the bytes into pinned memory it owns, then DMAs them. The batcher already copies every request's
inputs once, to concatenate them into the batch; when it concatenates straight into pinned memory, that
copy replaces the driver's and the upload becomes a plain DMA at full link speed.

onnxruntime's Python API cannot hand out pinned host memory (its ``OrtDevice`` only offers device memory),
and PyTorch or CuPy would each add a gigabyte for two functions. So ``cudaHostAlloc``/``cudaFreeHost`` are
called through ctypes on the CUDA runtime that onnxruntime-gpu already loaded. Nothing here is imported or
loaded on a CPU instance, and every failure just means "no pinned memory": callers fall back to numpy's.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.capture_lock import CUDA_CAPTURE

log = logging.getLogger("optiserve.gpu")
CUDA_RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
"""Sonames tried in order: a name already loaded by onnxruntime-gpu (``preload_dlls``) resolves to that copy."""
_HOST_ALLOC_PORTABLE = 1  # cudaHostAllocPortable: pinned for every CUDA context, not only the current one


class PinnedHost:
    """Allocates numpy arrays in pinned host memory; each block is freed when its last array is gone."""

    _shared: PinnedHost | None = None
    _shared_lock = threading.Lock()
    _shared_tried = False

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    @classmethod
    def shared(cls) -> PinnedHost | None:
        """The process-wide allocator, or None (logged once) when no CUDA runtime can be loaded."""
        with cls._shared_lock:
            if not cls._shared_tried:
                cls._shared_tried = True
                cls._shared = cls._open()
            return cls._shared

    @classmethod
    def _open(cls) -> PinnedHost | None:
        """The first CUDA runtime that loads and pins a probe allocation (a CUDA toolkit on a machine without a
        GPU loads, then fails every allocation)."""
        for name in runtime_names():
            try:
                runtime = ctypes.CDLL(name)
            except OSError:
                continue
            runtime.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
            runtime.cudaHostAlloc.restype = ctypes.c_int
            runtime.cudaFreeHost.argtypes = [ctypes.c_void_p]
            runtime.cudaFreeHost.restype = ctypes.c_int
            return cls.probed(runtime, name)
        log.warning("no CUDA runtime (%s) could be loaded: GPU instances upload from pageable memory", CUDA_RUNTIMES[0])
        return None

    @classmethod
    def probed(cls, runtime: Any, name: str = "the CUDA runtime") -> PinnedHost | None:
        """An allocator on ``runtime`` if it can pin one page now, else None (logged)."""
        pointer = ctypes.c_void_p()
        with CUDA_CAPTURE.shared():
            status = runtime.cudaHostAlloc(ctypes.byref(pointer), 4096, _HOST_ALLOC_PORTABLE)
        if status != 0 or not pointer.value:
            log.warning(
                "%s cannot pin host memory (CUDA error %d): GPU instances upload from pageable memory", name, status
            )
            return None
        with CUDA_CAPTURE.shared():
            runtime.cudaFreeHost(pointer)
        return cls(runtime)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        """An uninitialized array in pinned memory; None when the driver refuses (out of pinned memory)."""
        block = self.allocate(math.prod(shape) * dtype.itemsize)
        return None if block is None else as_array(block, shape, dtype)

    def allocate(self, nbytes: int) -> np.ndarray | None:
        """``nbytes`` (at least 1) of pinned memory as a uint8 array; None when the driver refuses (logged)."""
        nbytes = max(1, nbytes)
        pointer = ctypes.c_void_p()
        with CUDA_CAPTURE.shared():
            status = self._runtime.cudaHostAlloc(ctypes.byref(pointer), nbytes, _HOST_ALLOC_PORTABLE)
        if status != 0 or not pointer.value:
            log.warning("cudaHostAlloc(%d bytes) failed with CUDA error %d; using pageable memory", nbytes, status)
            return None
        block = _PinnedBlock(pointer.value, nbytes)
        release = weakref.finalize(block, self._free, pointer.value)
        release.atexit = False  # at exit the CUDA runtime may already be torn down; the OS takes the pages back
        return np.asarray(block)  # the array keeps the block (and so the memory) alive

    def _free(self, address: int) -> None:
        with CUDA_CAPTURE.shared():
            status = self._runtime.cudaFreeHost(ctypes.c_void_p(address))
        if status != 0:
            log.warning("cudaFreeHost failed with CUDA error %d", status)


def as_array(block: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A ``shape``/``dtype`` view of the start of a byte block (pinned blocks are page-aligned)."""
    return block[: math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


def runtime_names(maps: Path = Path("/proc/self/maps")) -> list[str]:
    """CUDA runtime sonames to try: those this process already loaded first (onnxruntime-gpu's own, so no second
    runtime is loaded beside it), then ``CUDA_RUNTIMES``."""
    try:
        loaded = re.findall(r"libcudart\.so\.\d+", maps.read_text())
    except OSError:
        loaded = []
    return list(dict.fromkeys([*loaded, *CUDA_RUNTIMES]))


class _PinnedBlock:
    """One pinned allocation, exposed to numpy as a byte array; numpy keeps it as the arrays' base."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
        }


class StagingBuffers:
    """One instance's reusable pinned input buffers: one byte block per input name, grown (to a power of two) to
    the largest batch seen, whatever its dtype or sample shape (a text model's sequence length changes from
    batch to batch, and ``cudaFreeHost`` waits for the whole device).

    The batcher concatenates a batch into ``get(...)``'s view; the instance's worker thread runs batches one
    after another and the upload finishes inside the run, so the buffer is free again when the next batch of
    the same instance is formed. Not for sharing between instances."""

    def __init__(self, host: PinnedHost) -> None:
        self._host: PinnedHost | None = host
        self._blocks: dict[str, np.ndarray] = {}

    @property
    def active(self) -> bool:
        """False once pinned memory was refused: batches then go to numpy's memory."""
        return self._host is not None

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        """A pinned array of ``shape`` and ``dtype`` for input ``name``; None for object (BYTES) tensors, an
        empty shape, or when pinned memory cannot be had."""
        if dtype.hasobject or not shape or self._host is None:
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        block = self._blocks.get(name)
        if block is None or len(block) < nbytes:
            grown = self._host.allocate(1 << max(0, nbytes - 1).bit_length())
            if grown is None:
                self._host = None  # out of pinned memory: stop asking (the failure was logged once)
                self._blocks.clear()
                return None
            block = self._blocks[name] = grown
        return as_array(block, shape, dtype)
