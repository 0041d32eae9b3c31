"""The dynamic batcher: bounded priority queues per model version, pulled by one worker thread per instance.

Design choices (README, "Batching"):
- No idle wait. When no instance is busy, a free worker takes whatever compatible requests are queued and
  runs them at once: at low load a request never waits for a batch window. Under load (another instance
  is busy) a worker whose batch is below the target size may wait up to ``max_queue_delay_microseconds``
  for more; with one instance, batches form simply because requests queue while it computes.
- Requests join a batch only with requests whose non-batch dims match, never beyond ``max_batch_size``
  samples (or the largest ``preferred_batch_size``); outputs are split back by each request's samples.
- Full queues reject at once (503 + Retry-After); queue timeouts reject (503 / DEADLINE_EXCEEDED) or
  demote (Triton's DELAY); cancelled requests are dropped before they run.
- Workers are threads: onnxruntime releases the GIL while it computes.
- Inline at low load. Handing a request to a worker thread and its answer back costs two thread wake-ups
  (~0.1-0.15 ms on 2 vCPUs, more than a small model's compute). When the version has been idle for the last
  ``QUIET_BEFORE_INLINE`` submissions and single-request runs of the request's shape took under
  ``inline_below_ns``, a request runs on the caller's thread (the event loop) instead. Running inline hides
  concurrency (the loop is busy, so nothing else arrives), so every ``PROBE_EVERY``-th quiet request still
  goes through a worker: requests arriving meanwhile find it busy, the quiet streak ends, and batching resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.errors import DeadlineExceeded, InternalError, InvalidInput, ServerUnavailable
from server.models.stats import ModelStats
from server.repository.config import ModelConfig
from server.tracing import CURRENT, BatchTimes, RequestTrace

log = logging.getLogger("optiserve.batching")
Tensors = dict[str, np.ndarray]
Runner = Callable[[Tensors], Tensors]
Stager = Callable[[str, tuple[int, ...], np.dtype[Any]], np.ndarray | None]
"""An instance's staging buffers (``Backend.staging_buffer``): where to concatenate one input of its next batch."""


QUIET_BEFORE_INLINE = 8
"""Submissions in a row that found the version idle before requests may run inline."""
PROBE_EVERY = 4
"""While quiet, every PROBE_EVERY-th request still takes a worker, so that concurrency can show."""
MAX_SHAPES = 256
"""Request shapes whose single-request run times a batcher keeps for its inline decisions."""


class BatcherClosed(ServerUnavailable):
    """The version is being replaced or unloaded; the caller may retry on the current version."""


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    max_queue_size: int = 0
    timeout_ns: int = 0
    reject_on_timeout: bool = True
    allow_timeout_override: bool = False

    def deadline_ns(self, request_timeout_us: int | None) -> int:
        """How long a request may wait (0 = forever); a request may shorten but not extend the default."""
        timeout = self.timeout_ns
        if request_timeout_us and self.allow_timeout_override:
            requested = request_timeout_us * 1000
            timeout = min(timeout, requested) if timeout else requested
        return timeout


@dataclass(frozen=True)
class BatchPolicy:
    """How one model batches and queues (Triton's dynamic_batching block)."""

    max_queue_delay_ns: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority: int = 0
    default_queue: QueuePolicy = field(default_factory=QueuePolicy)
    level_queues: dict[int, QueuePolicy] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ModelConfig, default_max_queue_size: int) -> BatchPolicy:
        """Read the policy from a ModelConfig message."""
        dynamic = config.dynamic_batching

        def policy(message: Any) -> QueuePolicy:
            return QueuePolicy(
                max_queue_size=int(message.max_queue_size) or default_max_queue_size,
                timeout_ns=int(message.default_timeout_microseconds) * 1000,
                reject_on_timeout=message.timeout_action == 0,  # 0 = REJECT, 1 = DELAY
                allow_timeout_override=bool(message.allow_timeout_override),
            )

        levels = int(dynamic.priority_levels)
        return cls(
            max_queue_delay_ns=int(dynamic.max_queue_delay_microseconds) * 1000,
            preferred_batch_sizes=tuple(int(s) for s in dynamic.preferred_batch_size),
            priority_levels=levels,
            default_priority=int(dynamic.default_priority_level) or (levels + 1) // 2 if levels else 0,
            default_queue=policy(dynamic.default_queue_policy),
            level_queues={int(k): policy(v) for k, v in dynamic.priority_queue_policy.items()},
        )

    def queue_for(self, level: int) -> QueuePolicy:
        """The queue policy of one priority level."""
        return self.level_queues.get(level, self.default_queue)


@dataclass(eq=False)
class WorkItem:
    """One queued request: its inputs, how many samples it carries, and where its answer goes."""

    inputs: Tensors
    samples: int
    key: Hashable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Tensors]
    enqueued_ns: int = field(default_factory=time.monotonic_ns)
    deadline_ns: int = 0
    reject_on_timeout: bool = True
    dispatched: bool = False
    timer: asyncio.TimerHandle | None = None
    trace: RequestTrace | None = None
    """The request's span when tracing is on (server/tracing.py); the worker leaves its phase times there."""

    def expired(self, now_ns: int) -> bool:
        """Past its queue timeout."""
        return bool(self.deadline_ns) and now_ns >= self.deadline_ns


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
        policy: BatchPolicy | None = None,
        stagers: list[Stager] | None = None,
        preparers: list[Callable[[], None]] | None = None,
        inline_below_ns: int = 0,
    ) -> None:
        """``stagers``, one per runner, give each instance's batches a buffer to be concatenated into;
        ``preparers``, one per runner, run on the runner's worker thread before its first batch;
        ``inline_below_ns`` > 0 lets an idle version run a request on the caller's thread when its
        single-request runs take less (only for runners that may run on any thread)."""
        self.name = name
        self.max_batch_size = max_batch_size
        self.stats = stats
        self.policy = policy or BatchPolicy(default_queue=QueuePolicy(max_queue_size=max_queue_size))
        levels = max(1, self.policy.priority_levels)
        self._queues: list[deque[WorkItem]] = [deque() for _ in range(levels)]
        self._queued = 0
        self._cond = threading.Condition()
        self._busy = 0
        self._closing = False
        count = len(runners)
        self._ready = [threading.Event() for _ in range(count)]
        self._prepare_errors: list[BaseException] = []
        self._instance_locks = [threading.Lock() for _ in range(count)]
        """Held while an instance runs, by its worker or by an inline run: one execution per instance at a time."""
        self._runners = list(runners)
        self._inline_below_ns = inline_below_ns
        self._single_run_ns: dict[tuple[Hashable, int], float] = {}
        """Moving average of single-request runs per (shape key, samples): a request runs inline only when requests
        of its own shape were measured fast (a large input of a dynamic-shape model must not block the loop)."""
        self._quiet = 0
        workers = zip(runners, stagers or [_no_staging] * count, preparers or [_nothing] * count, strict=True)
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(*worker, self._ready[i], self._instance_locks[i]),
                name=f"{name}-worker-{i}",
                daemon=True,
            )
            for i, worker in enumerate(workers)
        ]
        sizes = [s for s in self.policy.preferred_batch_sizes if 0 < s <= max_batch_size]
        self._target = max(sizes) if sizes else max_batch_size

    def start(self) -> None:
        """Start the worker threads and wait until each has run its preparer; the first preparer error stops
        the workers and is raised here (so a model whose instances cannot get ready fails its load)."""
        for thread in self._threads:
            thread.start()
        for ready in self._ready:
            ready.wait()
        if self._prepare_errors:
            self.close(0)
            raise self._prepare_errors[0]

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._cond:
            return self._queued + self._busy

    async def submit(
        self, inputs: Tensors, samples: int, key: Hashable, *, priority: int = 0, timeout_us: int | None = None
    ) -> Tensors:
        """Queue one request and wait for its outputs; 503 at once when its queue is full."""
        level = self._level(priority)
        queue_policy = self.policy.queue_for(level)
        loop = asyncio.get_running_loop()
        item = WorkItem(inputs, samples, key, loop, loop.create_future(), trace=CURRENT.get())
        timeout_ns = queue_policy.deadline_ns(timeout_us)
        if timeout_ns:
            item.deadline_ns = item.enqueued_ns + timeout_ns
            item.reject_on_timeout = queue_policy.reject_on_timeout
        queue = self._queues[level - 1 if self.policy.priority_levels else 0]
        with self._cond:
            if self._closing:
                raise BatcherClosed(f"model {self.name!r} is shutting down", retry_after_s=1)
            if queue_policy.max_queue_size and len(queue) >= queue_policy.max_queue_size:
                raise ServerUnavailable(
                    f"model {self.name!r}: queue is full ({queue_policy.max_queue_size} requests); retry later",
                    retry_after_s=1,
                )
            inline = self._claim_inline(item)
            if not inline:
                queue.append(item)
                self._queued += 1
                self._cond.notify()
        if inline:
            return self._run_inline(item)
        if timeout_ns and item.reject_on_timeout:
            item.timer = loop.call_later(timeout_ns / 1e9, self._expire, item)
        try:
            return await item.future
        finally:
            if item.timer is not None:
                item.timer.cancel()
            if item.future.cancelled():
                with self._cond:
                    if not item.dispatched:  # the client went away while queued: free its slot now
                        item.dispatched = True
                        self._forget(item)

    def _claim_inline(self, item: WorkItem) -> bool:
        """Under the lock: whether ``item`` runs inline (then it counts as busy until it has run)."""
        if self._queued or self._busy:
            self._quiet = 0
            return False
        self._quiet += 1
        inline = (
            self._quiet >= QUIET_BEFORE_INLINE
            and self._quiet % PROBE_EVERY != 0
            and self._single_run_ns.get((item.key, item.samples), self._inline_below_ns) < self._inline_below_ns
        )
        if inline:
            self._busy += 1
        return inline

    def _run_inline(self, item: WorkItem) -> Tensors:
        """Run one request on this thread, with the bookkeeping of a worker's batch; errors reach the caller."""
        item.dispatched = True
        try:
            with self._instance_locks[0]:
                (outputs,), times = self._execute(self._runners[0], [item], _no_staging)
        finally:
            with self._cond:
                self._busy -= 1
        self._account([item], times)
        self._trace_batch([item], times)
        return outputs

    def _level(self, priority: int) -> int:
        levels = self.policy.priority_levels
        if not levels:
            return 0
        if priority == 0:
            return self.policy.default_priority
        if not 1 <= priority <= levels:
            raise InvalidInput(f"parameters.priority: {priority} is outside 1..{levels} (priority_levels)")
        return priority

    def _expire(self, item: WorkItem) -> None:
        """Event-loop timer: reject a request still queued at its deadline."""
        with self._cond:
            if item.dispatched or item.future.done():
                return
            item.dispatched = True  # never run it now
            self._forget(item)  # and free its queue slot at once
        item.future.set_exception(
            DeadlineExceeded(f"model {self.name!r}: request waited longer than its queue timeout")
        )

    def _forget(self, item: WorkItem) -> None:
        """Under the lock: take a request that will never run out of its queue."""
        for queue in self._queues:
            if item in queue:
                queue.remove(item)
                self._queued -= 1
                return

    def close(self, timeout_s: float = 30.0, *, replaced: bool = False) -> None:
        """Stop taking requests, let the queue drain (up to ``timeout_s``), then stop the workers. Anything
        still queued at the deadline gets 503, or, when a newer version replaced this one, BatcherClosed so
        the data plane retries it there."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            leftover = [item for queue in self._queues for item in queue]
            for queue in self._queues:
                queue.clear()
            self._queued = 0
        error: ServerUnavailable = (
            BatcherClosed(f"model {self.name!r} was replaced", retry_after_s=1)
            if replaced
            else ServerUnavailable(f"model {self.name!r} was unloaded", retry_after_s=1)
        )
        _deliver_errors(leftover, error)

    # ---- worker side (threads) ---------------------------------------------------------------------
    def _work(
        self,
        runner: Runner,
        stager: Stager,
        prepare: Callable[[], None],
        ready: threading.Event,
        instance_lock: threading.Lock,
    ) -> None:
        """Worker loop: prepare, then take a batch, run it, deliver the results."""
        try:
            prepare()
        except BaseException as exc:  # reported by start(); this worker never serves
            self._prepare_errors.append(exc)
            return
        finally:
            ready.set()
        while True:
            batch: list[WorkItem] = []  # filled as requests are claimed, so a failure knows whom to answer
            try:
                with self._cond:
                    while not self._queued and not self._closing:
                        self._cond.wait()
                    if not self._queued:
                        return
                    self._form_batch(batch)
                    self._busy += 1
                try:
                    ran = self._run(runner, batch, stager, instance_lock) if batch else None
                finally:
                    with self._cond:
                        self._busy -= 1
                if ran is not None:  # delivered once idle, so that the next request finds the version idle
                    results, times = ran
                    _deliver(zip(batch, results, strict=True))
                    self._trace_batch(batch, times)
            except BaseException as exc:  # whatever it is, it fails its batch; the worker and the queue live on
                log.exception(
                    "model %r: worker failed on a batch of %d requests; they get an error", self.name, len(batch)
                )
                _deliver_errors(batch, InternalError(f"model {self.name!r}: batch failed: {type(exc).__name__}: {exc}"))

    def _form_batch(self, batch: list[WorkItem]) -> None:
        """Under the lock: take a batch into ``batch`` now, or, under load, wait up to the queue delay to fill it."""
        first = self._pop_first()
        if first is None:
            return
        batch.append(first)
        if self.max_batch_size <= 0:
            return
        samples = first.samples + self._take_compatible(first.key, batch, self._target - first.samples)
        wait_until = time.monotonic_ns() + self.policy.max_queue_delay_ns
        while self._busy > 0 and samples < self._target and not self._closing:
            remaining = wait_until - time.monotonic_ns()
            if remaining <= 0:
                break
            self._cond.wait(min(remaining / 1e9, threading.TIMEOUT_MAX))  # a longer wait raises OverflowError
            samples += self._take_compatible(first.key, batch, self._target - samples)

    def _pop_first(self) -> WorkItem | None:
        """The oldest live request of the highest non-empty priority; timed-out DELAY requests go last."""
        now = time.monotonic_ns()
        delayed: WorkItem | None = None
        for queue in self._queues:
            for item in list(queue):
                if item.future.done() or item.dispatched:
                    queue.remove(item)
                    self._queued -= 1
                    continue
                if item.expired(now) and not item.reject_on_timeout:
                    delayed = delayed or item
                    continue
                return self._claim(queue, item)
        if delayed is not None:
            for queue in self._queues:
                if delayed in queue:
                    return self._claim(queue, delayed)
        return None

    def _claim(self, queue: deque[WorkItem], item: WorkItem) -> WorkItem:
        queue.remove(item)
        self._queued -= 1
        item.dispatched = True
        return item

    def _take_compatible(self, key: Hashable, batch: list[WorkItem], room: int) -> int:
        """Move queued requests with the same key into ``batch`` while they fit in ``room`` samples."""
        taken = 0
        for queue in self._queues:
            if room - taken <= 0:
                break
            kept: deque[WorkItem] = deque()
            for item in queue:
                if item.future.done() or item.dispatched:
                    self._queued -= 1
                elif item.key == key and item.samples <= room - taken:
                    item.dispatched = True
                    batch.append(item)
                    taken += item.samples
                    self._queued -= 1
                else:
                    kept.append(item)
            queue.clear()
            queue.extend(kept)
        return taken

    def _run(
        self, runner: Runner, batch: list[WorkItem], stager: Stager, instance_lock: threading.Lock
    ) -> tuple[list[Tensors], BatchTimes] | None:
        """Execute one batch: each request's slice of the outputs and the batch's times, for the caller to
        deliver; None when it failed (the requests already have the error)."""
        try:
            with instance_lock:
                results, times = self._execute(runner, batch, stager)
        except Exception as exc:  # a runtime failure must reach the clients, not kill the worker
            _deliver_errors(batch, exc)
            return None
        self._account(batch, times)
        return results, times

    def _execute(self, runner: Runner, batch: list[WorkItem], stager: Stager) -> tuple[list[Tensors], BatchTimes]:
        """Run ``batch``: each request's outputs, and the batch's (start, inputs ready, computed, split) times."""
        start = time.monotonic_ns()
        inputs = batch[0].inputs if len(batch) == 1 else _concat(batch, stager)
        ran = time.monotonic_ns()
        outputs = runner(inputs)
        done = time.monotonic_ns()
        results = [outputs] if len(batch) == 1 else _split(outputs, [item.samples for item in batch])
        if len(batch) == 1 and self._inline_below_ns:
            self._note_single_run((batch[0].key, batch[0].samples), done - ran)
        return results, (start, ran, done, time.monotonic_ns())

    def _note_single_run(self, shape: tuple[Hashable, int], ns: int) -> None:
        """Fold one single-request run into its shape's moving average (a bounded table: shapes beyond
        MAX_SHAPES start it afresh)."""
        averages = self._single_run_ns
        previous = averages.get(shape)
        if previous is None and len(averages) >= MAX_SHAPES:
            averages.clear()
        averages[shape] = ns if previous is None else 0.8 * previous + 0.2 * ns

    def _account(self, batch: list[WorkItem], times: BatchTimes) -> None:
        """Statistics and the requests' span phases (before delivery: the loop reads them)."""
        start, ran, done, finished = times
        samples = sum(item.samples for item in batch)
        try:
            self.stats.record_execution(
                samples, [start - item.enqueued_ns for item in batch], ran - start, done - ran, finished - done
            )
            for item in batch:
                if item.trace is not None:
                    item.trace.ran(item.enqueued_ns, times, samples)
        except Exception:  # the answers are computed: bookkeeping must not cost the clients them
            log.exception("model %r: recording the statistics of a batch failed", self.name)

    def _trace_batch(self, batch: list[WorkItem], times: BatchTimes) -> None:
        """The batch's own span, linking the traced requests it served."""
        traced = [item.trace for item in batch if item.trace is not None]
        if not traced:
            return
        try:
            traced[0].tracer.record_batch(traced, times, sum(item.samples for item in batch))
        except Exception:
            log.exception("model %r: tracing a batch failed", self.name)


def _nothing() -> None:
    """The preparer of a runner that needs none."""


def _no_staging(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
    """The stager of a runner without staging buffers: numpy allocates each batch."""
    return None


def _concat(batch: list[WorkItem], stager: Stager) -> Tensors:
    """Stack the requests' inputs along the batch dimension, into the instance's staging buffer when it
    offers one (the copy is made anyway, so landing it in pinned memory is free)."""
    stacked: Tensors = {}
    for name in batch[0].inputs:
        parts = [item.inputs[name] for item in batch]
        staged = _staged(name, parts, stager)
        stacked[name] = staged if staged is not None else np.concatenate(parts)
    return stacked


def _staged(name: str, parts: list[np.ndarray], stager: Stager) -> np.ndarray | None:
    """``parts`` concatenated into the stager's buffer; None when it offers none or staging fails (then numpy
    allocates: a staging problem must never fail the batch)."""
    first = parts[0]
    try:
        target = stager(name, (sum(len(p) for p in parts), *first.shape[1:]), first.dtype)
        return None if target is None else np.concatenate(parts, out=target, casting="no")
    except (TypeError, ValueError, RuntimeError, OSError) as exc:
        log.warning("input %r: staging the batch failed (%s); concatenating in ordinary memory", name, exc)
        return None


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
