"""The dynamic batcher: one bounded queue per model version, pulled by one worker thread per instance.

Design choices (see README, "Batching"):
- No idle wait. A free worker takes whatever compatible requests are queued and runs them at once, so
  at low load a request never waits for a batch window. Batches form naturally while every worker is
  busy: requests that arrive meanwhile are queued and leave together.
- Requests join a batch only with requests whose non-batch dims and datatypes match, never beyond
  ``max_batch_size`` samples; outputs are split back by each request's sample count.
- A full queue rejects at once (503 + Retry-After) instead of growing latency without bound.
- Workers are threads: onnxruntime releases the GIL while it computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np

from server.errors import ServerError, ServerUnavailable
from server.stats import ModelStats

Tensors = dict[str, np.ndarray]
Runner = Callable[[Tensors], Tensors]


@dataclass(eq=False)
class WorkItem:
    """One queued request: its inputs, how many samples it carries, and where its answer goes."""

    inputs: Tensors
    samples: int
    key: Hashable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Tensors]
    enqueued_ns: int = field(default_factory=time.monotonic_ns)


class Batcher:
    """Queues requests for one model version and runs them, batched, on its instances' threads."""

    def __init__(
        self,
        name: str,
        runners: list[Runner],
        *,
        max_batch_size: int,
        max_queue_size: int,
        stats: ModelStats,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.stats = stats
        self._runners = runners
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._busy = 0
        self._closing = False
        self._threads = [
            threading.Thread(target=self._work, args=(runner,), name=f"{name}-worker-{i}", daemon=True)
            for i, runner in enumerate(runners)
        ]

    def start(self) -> None:
        """Start the worker threads."""
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._cond:
            return len(self._queue) + self._busy

    async def submit(self, inputs: Tensors, samples: int, key: Hashable) -> Tensors:
        """Queue one request and wait for its outputs; 503 at once when the queue is full."""
        loop = asyncio.get_running_loop()
        item = WorkItem(inputs, samples, key, loop, loop.create_future())
        with self._cond:
            if self._closing:
                raise ServerUnavailable(f"model {self.name!r} is shutting down", retry_after_s=1)
            if self.max_queue_size and len(self._queue) >= self.max_queue_size:
                raise ServerUnavailable(
                    f"model {self.name!r}: queue is full ({self.max_queue_size} requests); retry later",
                    retry_after_s=1,
                )
            self._queue.append(item)
            self._cond.notify()
        return await item.future

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, let the queue drain (up to ``timeout_s``), then stop the workers.
        Anything still queued at the deadline gets 503."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
        _deliver_errors(leftover, ServerUnavailable(f"model {self.name!r} was unloaded", retry_after_s=1))

    def _work(self, runner: Runner) -> None:
        """Worker loop: take a batch, run it, deliver the results."""
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take_batch()
                self._busy += 1
            try:
                if batch:
                    self._run(runner, batch)
            finally:
                with self._cond:
                    self._busy -= 1

    def _take_batch(self) -> list[WorkItem]:
        """Pop the oldest live request plus every queued request compatible with it, up to the cap."""
        first = self._queue.popleft()
        while first.future.cancelled():
            if not self._queue:
                return []
            first = self._queue.popleft()
        batch = [first]
        if self.max_batch_size <= 0 or not self._queue:
            return batch
        total, kept = first.samples, deque[WorkItem]()
        for item in self._queue:
            if item.future.cancelled():
                continue
            if item.key == first.key and total + item.samples <= self.max_batch_size:
                batch.append(item)
                total += item.samples
            else:
                kept.append(item)
        self._queue = kept
        return batch

    def _run(self, runner: Runner, batch: list[WorkItem]) -> None:
        """Execute one batch and hand each request its slice of the outputs."""
        start = time.monotonic_ns()
        try:
            inputs = batch[0].inputs if len(batch) == 1 else _concat(batch)
            ran = time.monotonic_ns()
            outputs = runner(inputs)
            done = time.monotonic_ns()
            results = [outputs] if len(batch) == 1 else _split(outputs, [item.samples for item in batch])
        except ServerError as exc:
            _deliver_errors(batch, exc)
            return
        except Exception as exc:  # a runtime failure must reach the client, not kill the worker
            _deliver_errors(batch, exc)
            return
        finished = time.monotonic_ns()
        samples = sum(item.samples for item in batch)
        self.stats.record_execution(
            samples, [start - item.enqueued_ns for item in batch], ran - start, done - ran, finished - done
        )
        _deliver(zip(batch, results, strict=True))


def _concat(batch: list[WorkItem]) -> Tensors:
    """Stack the requests' inputs along the batch dimension."""
    return {name: np.concatenate([item.inputs[name] for item in batch]) for name in batch[0].inputs}


def _split(outputs: Tensors, sizes: list[int]) -> list[Tensors]:
    """Cut every output back into per-request slices (views, no copies)."""
    results: list[Tensors] = [{} for _ in sizes]
    for name, array in outputs.items():
        offset = 0
        for result, size in zip(results, sizes, strict=True):
            result[name] = array[offset : offset + size]
            offset += size
    return results


def _deliver(pairs: Iterable[tuple[WorkItem, Tensors]]) -> None:
    """Resolve futures on their event loop: one thread-safe call per loop, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Tensors], Tensors]]] = {}
    for item, result in pairs:
        by_loop.setdefault(item.loop, []).append((item.future, result))
    for loop, results in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_set_results, results)


def _deliver_errors(items: list[WorkItem], error: BaseException) -> None:
    """Fail every request of ``items`` with ``error``."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[Tensors]]] = {}
    for item in items:
        by_loop.setdefault(item.loop, []).append(item.future)
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_errors, futures, error)


def _set_results(results: list[tuple[asyncio.Future[Tensors], Tensors]]) -> None:
    for future, result in results:
        if not future.done():
            future.set_result(result)


def _set_errors(futures: list[asyncio.Future[Tensors]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
