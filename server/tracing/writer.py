"""Writing a sampled request's spans off the request path, many at a time.

A request keeps only plain values while it is served (its arrival, the batcher's phase times, its end, its
error). A few times a second this writer's thread hands the finished ones on: in the server to the export process
(export_process.py), which makes and exports the spans; in a tracer without one (the unit tests), it makes the
OpenTelemetry SDK spans itself, with their original timestamps. Why not on the request's threads: at a 1% ratio a
sampled request comes among ~100 others, and by then the SDK's code is cold: recording its three spans took 250
to 270 µs of CPU there, against 65 µs when spans are made one after another (BENCHMARKS.md §11).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Protocol

PERIOD_S = 0.2
"""How often the thread writes what has finished (the spans' own timestamps are unaffected)."""
MAX_WAITS = 50
"""Writes an item may wait for others (a batch for the requests it links) before it is written anyway."""


class Record(Protocol):
    """A finished request or batch, written as spans."""

    def write(self, force: bool) -> bool:
        """Make the spans; False (nothing made) when it must wait for other records first, unless ``force``."""
        ...


class SpanWriter:
    """Queues finished records and writes them on its own thread (started with the first record)."""

    def __init__(self, period_s: float = PERIOD_S, on_round: Callable[[], None] | None = None) -> None:
        """``on_round``: called after each round of writes (the export process's pipe is written then)."""
        self._queue: collections.deque[Record] = collections.deque()
        self._waiting: list[tuple[Record, int]] = []
        self._period_s = period_s
        self._lock = threading.Lock()  # one writer at a time: the thread, a flush, the close
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._on_round = on_round

    def put(self, record: Record) -> None:
        """Any thread: queue a record (a deque append; nothing else happens on the caller's thread)."""
        self._queue.append(record)
        if self._thread is None:
            self._start()

    def flush(self) -> None:
        """Write everything queued now, on the calling thread (tests, and the close)."""
        with self._lock:
            self._write_all(force=False)

    def close(self) -> None:
        """Stop the thread and write everything left, whatever it waits for."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            self._write_all(force=True)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="optiserve-span-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._period_s)
            self.flush()

    def _write_all(self, force: bool) -> None:
        waiting, self._waiting = self._waiting, []
        while self._queue:
            record = self._queue.popleft()
            if not record.write(force):
                waiting.append((record, 0))
        for record, waits in waiting:
            if not record.write(force or waits >= MAX_WAITS):
                self._waiting.append((record, waits + 1))
        if self._on_round is not None:
            self._on_round()
