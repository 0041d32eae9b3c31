"""Keeping the server's long-lived objects out of Python's full garbage collections.

Under load a full collection ran every 3 to 8 s and stopped the process for 60 to 70 ms here (BENCHMARKS.md §11): it
walks every object the process holds, and nearly all of them were made at start-up (imported modules, the apps,
loaded models) and are never garbage. ``gc.freeze()`` moves the objects alive at that moment into a generation
the collector skips, so a full collection walks only what came after. Measured under load: GC time per request
4.3 → 1.5 µs, and the spans that tracing at 1% keeps waiting for export no longer bring full collections of
their own (7.5 → 1.9 µs). A frozen object that later becomes cyclic garbage (part of a model unloaded since)
would never be collected, so whenever the set of served versions changes the keeper unfreezes, collects and
freezes again: such garbage lives at most one check period longer than it would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Hashable

log = logging.getLogger("optiserve.heap")

CHECK_PERIOD_S = 1.0


def settle() -> float:
    """Unfreeze, collect everything, freeze what is left; returns the seconds it took (the process is stopped
    meanwhile: one full collection)."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


class HeapKeeper:
    """Settles the heap (:func:`settle`) when ``served()`` (the served versions) changes; run as a task."""

    def __init__(self, served: Callable[[], Hashable], period_s: float = CHECK_PERIOD_S) -> None:
        self._served = served
        self._period_s = period_s
        self.settled: Hashable = None
        """What ``served()`` said at the last settle (None before the first)."""

    def check(self) -> bool:
        """Settle when the served versions changed since the last settle; True when it did."""
        current = self._served()
        if current == self.settled:
            return False
        took = settle()
        self.settled = current
        log.debug("heap settled in %.1f ms; %d objects frozen", took * 1e3, gc.get_freeze_count())
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Check every period until ``stop`` is set; leave nothing frozen behind."""
        try:
            while not stop.is_set():
                self.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._period_s)
        finally:
            gc.unfreeze()
