"""A process-wide lock that keeps other CUDA work out of the way while a CUDA graph is captured.

onnxruntime's CUDA provider (1.31 and earlier) captures in ``cudaStreamCaptureModeGlobal``: while any thread
captures, a "potentially unsafe" CUDA call from any other thread (a synchronous copy, an allocation, pinned
memory being allocated or freed) fails and spoils the capture. So capturing takes this lock exclusively, and
every GPU instance's run and every pinned allocation or free takes it shared. Captures happen only while a
model loads, so serving never waits on it otherwise. The stdlib has no shared/exclusive lock; this one is a
few lines on ``threading.Condition``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SharedExclusiveLock:
    """Many shared holders or one exclusive holder. Waiting exclusive requests go first (a stream of runs cannot
    starve a capture). Re-entrant where it cannot deadlock: the exclusive holder may also take it shared (a
    pinned buffer freed by the garbage collector inside a capture), and a shared holder may take it shared
    again (the collector freeing one during a run)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive: int | None = None  # the holder's thread id
        self._waiting_exclusive = 0
        self._mine = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared for the block."""
        me = threading.get_ident()
        depth = getattr(self._mine, "depth", 0)
        if depth or self._exclusive == me:
            self._mine.depth = depth + 1
            try:
                yield
            finally:
                self._mine.depth = depth
            return
        with self._cond:
            while self._exclusive is not None or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        self._mine.depth = 1
        try:
            yield
        finally:
            self._mine.depth = 0
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock alone for the block (not re-entrant; never take it while holding it shared)."""
        with self._cond:
            self._waiting_exclusive += 1
            try:
                while self._exclusive is not None or self._shared:
                    self._cond.wait()
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = None
                self._cond.notify_all()


CUDA_CAPTURE = SharedExclusiveLock()
"""Taken exclusively around CUDA graph captures, shared around all other CUDA work of the server."""
