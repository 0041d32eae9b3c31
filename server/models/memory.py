"""What a loaded model version costs in host memory, measured rather than guessed.

onnxruntime does not report a session's memory, so the loader measures what session creation and warmup
add: the larger of the growth of the process's resident set (RSS) and of malloc's bytes in use. RSS alone was
measured wrong here: a session built on a worker thread reuses memory that thread's malloc arena kept from
an earlier free (its RSS delta read 0 for a 1.1 MB model whose heap use grew 1.2 MB), and freed memory that
glibc keeps hides a cost the same way, so the heap is trimmed before each reading. Concurrent loads would mix
their costs, so measurements take one process-wide lock (only session creation and warmup; the optimizer
runs outside it), and garbage collection runs first so that a checked ONNX graph freed late is not counted
against the new session.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_MEASURING = threading.Lock()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
ESTIMATE_FACTOR = 2
"""A never-measured model is estimated at this many times its files per instance (a 1.1 MB MLP measured 2.15x
in the server: weights prepacked by MLAS, the graph, warmup's allocator arena)."""
ESTIMATE_BASE = 1024 * 1024
"""Plus this per instance (the session's own structures and thread pool)."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


_LIBC = _libc()
_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only; musl and macOS have none
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc 2.33+
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def heap_in_use_bytes() -> int:
    """Bytes malloc has handed out and not had back, in every arena (0 where glibc's mallinfo2 is missing).
    Unlike RSS, it grows by what a worker thread allocates even when that reuses memory its arena kept."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def resident_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def release_freed_memory() -> None:
    """Hand memory that was freed back to the operating system (glibc's malloc_trim), so that RSS follows
    what is really in use after a model is unloaded."""
    if _TRIM is not None:
        _TRIM(0)


@dataclass
class Measurement:
    """The resident bytes a block of work added, set when the block ends."""

    bytes: int = 0


@contextlib.contextmanager
def measure_resident() -> Iterator[Measurement]:
    """Measure the RSS growth of the block (sessions created, warmed up and kept), one block at a time."""
    measurement = Measurement()
    with _MEASURING:
        gc.collect()  # what the load read before (the ONNX graph it checked) is freed now, not in the block
        release_freed_memory()
        before, heap_before = resident_bytes(), heap_in_use_bytes()
        yield measurement
        release_freed_memory()
        grown = max(resident_bytes() - before, heap_in_use_bytes() - heap_before)
        measurement.bytes = max(0, grown)


def files_bytes(folder: Path) -> int:
    """Size of every file under a version folder (the model, its external data, a conversion's source)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def estimate(file_bytes: int, instances: int) -> int:
    """The cost assumed for a version never measured in this process."""
    return max(1, instances) * (ESTIMATE_FACTOR * file_bytes + ESTIMATE_BASE)


def charge(measured: int, file_bytes: int) -> int:
    """What the budget counts for a loaded version: what was measured, but never less than the model file it
    serves (noise from other threads can only shrink a delta, and the weights are in memory at least once)."""
    return max(measured, file_bytes)


def prime_onnxruntime() -> None:
    """Create and drop one tiny session, so that onnxruntime's one-time set-up (about 10 MB here: its
    environment, kernel registries) is not measured as the first model's cost."""
    import numpy
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "prime",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": numpy.zeros(1, dtype=numpy.float32)})
