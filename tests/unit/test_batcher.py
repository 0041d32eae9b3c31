"""server.models.batching.Batcher with fake runners: batching, splitting, back-pressure, failures, cancellation,
close."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any

import numpy as np
import pytest

from server.errors import InternalError, InvalidInput, ServerUnavailable
from server.models.batching import PROBE_EVERY, QUIET_BEFORE_INLINE, Batcher, BatchPolicy, Tensors
from server.models.stats import ModelStats

WAIT_S = 5.0


class FakeRunner:
    """Records the batches it gets; while ``gate`` is clear it blocks, like a busy instance."""

    def __init__(self, *, blocked: bool = False, fail_on_negative: bool = False) -> None:
        self.calls: list[Tensors] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_on_negative = fail_on_negative
        if not blocked:
            self.gate.set()

    def __call__(self, inputs: Tensors) -> Tensors:
        self.calls.append({name: array.copy() for name, array in inputs.items()})
        self.entered.set()
        assert self.gate.wait(WAIT_S), "test never released the runner"
        x = inputs["x"]
        if self.fail_on_negative and (x < 0).any():
            raise ValueError("negative input")
        return {"y": x * 2, "total": x.reshape(len(x), -1).sum(axis=1)}

    def sizes(self) -> list[int]:
        return [len(call["x"]) for call in self.calls]


def _rows(first: float, samples: int, width: int = 2) -> np.ndarray:
    """``samples`` rows whose values are unique to this request (first, first + 0.01, ...)."""
    return (first + np.arange(samples * width, dtype=np.float32).reshape(samples, width) / 100).astype(np.float32)


def _key(width: int = 2) -> Hashable:
    return (("x", (width,)),)


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def _entered(runner: FakeRunner) -> None:
    assert await asyncio.to_thread(runner.entered.wait, WAIT_S), "runner was never called"


def _batcher(
    runners: list[Any],
    max_batch_size: int = 8,
    max_queue_size: int = 0,
    stagers: list[Any] | None = None,
    inline_below_ns: int = 0,
) -> Batcher:
    batcher = Batcher(
        "m",
        list(runners),
        max_batch_size=max_batch_size,
        max_queue_size=max_queue_size,
        stats=ModelStats(),
        stagers=stagers,
        inline_below_ns=inline_below_ns,
    )
    batcher.start()
    return batcher


def _run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 2 * WAIT_S))


async def _submit(batcher: Batcher, x: np.ndarray, key: Hashable | None = None) -> Tensors:
    return await batcher.submit({"x": x}, len(x), _key(x.shape[1]) if key is None else key)


def _spawn(batcher: Batcher, x: np.ndarray, key: Hashable | None = None) -> asyncio.Task[Tensors]:
    return asyncio.ensure_future(_submit(batcher, x, key))


def _check(result: Tensors, x: np.ndarray) -> None:
    """The caller got exactly its own rows back."""
    np.testing.assert_array_equal(result["y"], x * 2)
    np.testing.assert_array_equal(result["total"], x.sum(axis=1))


async def _block_worker(batcher: Batcher, runner: FakeRunner) -> tuple[asyncio.Task[Tensors], np.ndarray]:
    first_x = _rows(1000, 1)
    first = _spawn(batcher, first_x)
    await _entered(runner)
    return first, first_x


async def _wait_all(tasks: list[Awaitable[Tensors]]) -> list[Tensors]:
    return list(await asyncio.gather(*tasks))


@pytest.mark.parametrize("max_queue_delay_ns", [0, 2_000_000_000])
def test_single_request_is_dispatched_immediately(max_queue_delay_ns: int) -> None:
    """An idle batcher never waits for a batch to fill, even with a long max_queue_delay."""
    runner = FakeRunner()
    policy = BatchPolicy(max_queue_delay_ns=max_queue_delay_ns)
    batcher = Batcher("m", [runner], max_batch_size=8, max_queue_size=0, stats=ModelStats(), policy=policy)
    batcher.start()

    async def scenario() -> None:
        x = _rows(1, 1)
        started = time.monotonic()
        result = await _submit(batcher, x)
        assert time.monotonic() - started < 0.5  # no batching window
        _check(result, x)
        assert runner.sizes() == [1]
        await _until(lambda: batcher.pending == 0, "the worker to go idle")

    try:
        _run(scenario)
    finally:
        batcher.close(1)


def test_queued_compatible_requests_leave_as_one_batch() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), 1) for i in range(5)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 6, "five queued + one running")
        runner.gate.set()
        results = await _wait_all([first, *tasks])
        assert runner.sizes() == [1, 5]
        np.testing.assert_array_equal(runner.calls[1]["x"], np.concatenate(xs))  # arrival order
        for result, x in zip(results, [first_x, *xs], strict=True):
            _check(result, x)

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_a_batch_is_concatenated_into_the_instance_staging_buffer() -> None:
    """A GPU instance offers pinned memory to concatenate into; the runner gets that memory, outputs split back."""
    runner = FakeRunner(blocked=True)
    seen: list[np.ndarray] = []
    original = runner.__call__

    def recording(inputs: Tensors) -> Tensors:
        seen.append(inputs["x"])
        return original(inputs)

    staging = np.full((8, 2), -1.0, np.float32)
    asked: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []

    def stager(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        asked.append((name, shape, dtype))
        return staging[: shape[0]]

    batcher = _batcher([recording], stagers=[stager])

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), n) for i, n in enumerate([1, 2, 3])]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 4, "three queued + one running")
        runner.gate.set()
        results = await _wait_all([first, *tasks])
        assert runner.sizes() == [1, 6]
        assert asked == [("x", (6, 2), np.dtype(np.float32))]  # a lone request is never copied
        assert not np.shares_memory(seen[0], staging) and np.shares_memory(seen[1], staging)
        np.testing.assert_array_equal(staging[:6], np.concatenate(xs))
        for result, x in zip(results, [first_x, *xs], strict=True):
            _check(result, x)

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_a_stager_without_a_buffer_leaves_the_batch_to_numpy() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], stagers=[lambda *_: None])

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), 2) for i in range(2)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 3, "two queued + one running")
        runner.gate.set()
        for result, x in zip(await _wait_all([first, *tasks]), [first_x, *xs], strict=True):
            _check(result, x)
        assert runner.sizes() == [1, 4]

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_a_failing_stager_never_fails_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner(blocked=True)

    def broken(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
        return np.zeros((1, 1), np.float64)  # the wrong shape and dtype: concatenating into it fails

    batcher = _batcher([runner], stagers=[broken])

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), 1) for i in range(2)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 3, "two queued + one running")
        runner.gate.set()
        for result, x in zip(await _wait_all([first, *tasks]), [first_x, *xs], strict=True):
            _check(result, x)

    try:
        with caplog.at_level(logging.WARNING, "optiserve.batching"):
            _run(scenario)
        assert "input 'x': staging the batch failed" in caplog.text
    finally:
        runner.gate.set()
        batcher.close(1)


def test_batches_never_exceed_max_batch_size() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=4)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        samples = [1, 1, 3, 1, 1, 2, 4, 1]
        xs = [_rows(10 * (i + 1), n) for i, n in enumerate(samples)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == len(samples) + 1, "all queued")
        runner.gate.set()
        results = await _wait_all([first, *tasks])
        sizes = runner.sizes()
        assert max(sizes) <= 4
        assert sum(sizes) == 1 + sum(samples)
        # the oldest queued request, then every later compatible one that still fits:
        # [1] running, then [1+1+1+1], [3+1], [2], [4]
        assert sizes == [1, 4, 4, 2, 4]
        for result, x in zip(results, [first_x, *xs], strict=True):
            _check(result, x)

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_incompatible_keys_are_not_mixed() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), 1, width=2 if i % 2 == 0 else 3) for i in range(6)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 7, "all queued")
        runner.gate.set()
        results = await _wait_all([first, *tasks])
        assert runner.sizes() == [1, 3, 3]
        assert [call["x"].shape[1] for call in runner.calls] == [2, 2, 3]
        for result, x in zip(results, [first_x, *xs], strict=True):
            _check(result, x)

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_multi_sample_requests_are_split_back_exactly() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=16)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(100, 3), _rows(200, 2), _rows(300, 1), _rows(400, 3)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 5, "all queued")
        runner.gate.set()
        results = await _wait_all([first, *tasks])
        assert runner.sizes() == [1, 9]
        for result, x in zip(results, [first_x, *xs], strict=True):
            assert result["y"].shape == x.shape
            assert result["total"].shape == (len(x),)
            _check(result, x)

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_max_batch_size_zero_runs_one_by_one() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=0)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), 2) for i in range(4)]
        tasks = [asyncio.ensure_future(batcher.submit({"x": x}, 1, None)) for x in xs]
        await _until(lambda: batcher.pending == 5, "all queued")
        runner.gate.set()
        results = await _wait_all([first, *tasks])
        assert runner.sizes() == [1, 2, 2, 2, 2]
        for call, x in zip(runner.calls[1:], xs, strict=True):
            np.testing.assert_array_equal(call["x"], x)
        for result, x in zip(results, [first_x, *xs], strict=True):
            _check(result, x)

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_each_instance_has_its_own_worker() -> None:
    runners = [FakeRunner(blocked=True), FakeRunner(blocked=True)]
    batcher = _batcher(runners, max_batch_size=8)

    def running() -> int:
        return sum(runner.entered.is_set() for runner in runners)

    async def scenario() -> None:
        first = _spawn(batcher, _rows(1, 1))
        await _until(lambda: running() == 1, "one instance busy")
        second = _spawn(batcher, _rows(2, 1))
        await _until(lambda: running() == 2, "the other instance to take the second request")
        assert batcher.pending == 2
        for runner in runners:
            runner.gate.set()
        _check(await first, _rows(1, 1))
        _check(await second, _rows(2, 1))
        assert runners[0].sizes() == runners[1].sizes() == [1]

    try:
        _run(scenario)
    finally:
        for runner in runners:
            runner.gate.set()
        batcher.close(1)


def test_full_queue_is_refused_at_once() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8, max_queue_size=2)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)  # running: not in the queue
        xs = [_rows(10, 1), _rows(20, 1)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 3, "queue full")
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="queue is full") as info:
            await _submit(batcher, _rows(30, 1))
        assert time.monotonic() - started < 0.5
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        runner.gate.set()
        results = await _wait_all([first, *tasks])
        for result, x in zip(results, [first_x, *xs], strict=True):
            _check(result, x)
        assert runner.sizes() == [1, 2]
        _check(await _submit(batcher, _rows(40, 1)), _rows(40, 1))  # room again

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


@pytest.mark.parametrize("error", [ValueError("negative input"), InvalidInput("bad input 'x'")])
def test_runner_exception_reaches_every_request_of_the_batch(error: Exception) -> None:
    runner = FakeRunner(blocked=True)
    calls = 0

    def failing(inputs: Tensors) -> Tensors:
        nonlocal calls
        calls += 1
        outputs = runner(inputs)
        if calls == 2:
            raise error
        return outputs

    batcher = Batcher("m", [failing], max_batch_size=8, max_queue_size=0, stats=ModelStats())
    batcher.start()

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        tasks = [_spawn(batcher, _rows(10 * (i + 1), 1)) for i in range(3)]
        await _until(lambda: batcher.pending == 4, "all queued")
        runner.gate.set()
        _check(await first, first_x)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(outcome is error for outcome in outcomes), outcomes
        assert runner.sizes() == [1, 3]
        # the worker survived and keeps serving
        x = _rows(50, 2)
        _check(await _submit(batcher, x), x)
        assert runner.sizes() == [1, 3, 2]
        assert batcher.stats.execution_count == 2  # the failed execution is not counted

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_mismatched_batch_is_an_error_not_a_dead_worker() -> None:
    """Requests with the same key but inconsistent shapes make np.concatenate fail inside the worker."""
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8)

    async def scenario() -> None:
        first, _ = await _block_worker(batcher, runner)
        tasks = [_spawn(batcher, _rows(1, 1, width=2), key="k"), _spawn(batcher, _rows(2, 1, width=3), key="k")]
        await _until(lambda: batcher.pending == 3, "queued")
        runner.gate.set()
        await first
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(outcome, ValueError) for outcome in outcomes)
        _check(await _submit(batcher, _rows(3, 1)), _rows(3, 1))

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


@pytest.mark.parametrize("max_batch_size", [0, 8])
def test_cancelled_requests_are_skipped(max_batch_size: int) -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=max_batch_size)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), 1) for i in range(4)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 5, "all queued")
        for index in (0, 2):  # the oldest queued one and one in the middle
            tasks[index].cancel()
        await asyncio.sleep(0)
        runner.gate.set()
        _check(await first, first_x)
        for index in (1, 3):
            _check(await tasks[index], xs[index])
        for index in (0, 2):
            with pytest.raises(asyncio.CancelledError):
                await tasks[index]
        seen = np.concatenate([call["x"] for call in runner.calls])
        np.testing.assert_array_equal(seen, np.concatenate([first_x, xs[1], xs[3]]))

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_only_cancelled_requests_queued_leaves_the_worker_alive() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8)

    async def scenario() -> None:
        first, _ = await _block_worker(batcher, runner)
        tasks = [_spawn(batcher, _rows(10, 1)), _spawn(batcher, _rows(20, 1))]
        await _until(lambda: batcher.pending == 3, "queued")
        for task in tasks:
            task.cancel()
        await asyncio.sleep(0)
        runner.gate.set()
        await first
        x = _rows(30, 1)
        _check(await _submit(batcher, x), x)
        assert runner.sizes() == [1, 1]

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_close_drains_queued_work_then_stops() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=2)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        xs = [_rows(10 * (i + 1), 1) for i in range(3)]
        tasks = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 4, "queued")
        closing = asyncio.ensure_future(asyncio.to_thread(batcher.close, WAIT_S))
        await asyncio.sleep(0.02)
        assert not closing.done()  # waits for the running and queued work
        with pytest.raises(ServerUnavailable, match="shutting down"):
            await _submit(batcher, _rows(99, 1))
        runner.gate.set()
        await closing
        results = await _wait_all([first, *tasks])
        for result, x in zip(results, [first_x, *xs], strict=True):
            _check(result, x)
        assert runner.sizes() == [1, 2, 1]
        assert not any(thread.is_alive() for thread in batcher._threads)
        with pytest.raises(ServerUnavailable) as info:
            await _submit(batcher, _rows(99, 1))
        assert info.value.retry_after_s is not None

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_close_timeout_fails_what_is_still_queued() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8)

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        tasks = [_spawn(batcher, _rows(10, 1)), _spawn(batcher, _rows(20, 1))]
        await _until(lambda: batcher.pending == 3, "queued")
        await asyncio.to_thread(batcher.close, 0.05)
        for task in tasks:
            with pytest.raises(ServerUnavailable, match="unloaded"):
                await task
        runner.gate.set()
        _check(await first, first_x)  # the running batch still completes
        assert runner.sizes() == [1]

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)


def test_stats_record_inferences_executions_and_batch_sizes() -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8)

    async def scenario() -> None:
        first, _ = await _block_worker(batcher, runner)
        tasks = [_spawn(batcher, _rows(10, 2)), _spawn(batcher, _rows(20, 3))]
        await _until(lambda: batcher.pending == 3, "queued")
        await asyncio.sleep(0.01)  # measurable queue time
        runner.gate.set()
        await _wait_all([first, *tasks])
        await _submit(batcher, _rows(30, 1))

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)
    stats = batcher.stats
    assert stats.inference_count == 1 + 5 + 1
    assert stats.execution_count == 3
    assert sorted(stats.batches) == [1, 5]
    assert stats.batches[1].compute_infer.count == 2
    assert stats.batches[5].compute_infer.count == 1
    assert stats.queue.count == 4  # one per request
    assert stats.queue.ns >= 2 * 10_000_000  # the two queued requests waited at least 10 ms each
    assert stats.compute_infer.count == 4
    assert stats.last_inference_ms > 0
    data = stats.to_json("m", "1")
    assert (data["inference_count"], data["execution_count"]) == (7, 3)
    assert [b["batch_size"] for b in data["batch_stats"]] == [1, 5]
    assert data["inference_stats"]["queue"]["count"] == 4


# A worker thread must never be lost silently: whatever fails on it (a bug, an OverflowError from a huge queue
# delay, a SystemExit from a runner) fails the requests of that one batch, and the worker serves the next one.
@pytest.mark.parametrize(
    "error",
    [OverflowError("timeout value is too large"), KeyError("x"), SystemExit(3)],
    ids=["overflow", "key-error", "system-exit"],
)
def test_a_failure_while_forming_a_batch_fails_that_batch_and_the_worker_lives_on(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    runner = FakeRunner(blocked=True)
    batcher = _batcher([runner], max_batch_size=8)
    form_batch = batcher._form_batch
    failures = 0

    def failing_once(batch: list[Any]) -> None:
        nonlocal failures
        form_batch(batch)  # the requests are claimed, then it breaks
        if failures == 0 and batch:
            failures += 1
            raise error

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, runner)
        batcher._form_batch = failing_once  # type: ignore[method-assign]
        tasks = [_spawn(batcher, _rows(10 * (i + 1), 1)) for i in range(3)]
        await _until(lambda: batcher.pending == 4, "all queued")
        runner.gate.set()
        _check(await first, first_x)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, InternalError) and type(error).__name__ in o.message for o in outcomes), outcomes
        x = _rows(50, 2)
        _check(await _submit(batcher, x), x)  # the same worker, alive
        await _until(lambda: batcher.pending == 0, "nothing left queued or running")

    try:
        with caplog.at_level(logging.ERROR, logger="optiserve.batching"):
            _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)
    assert failures == 1
    assert "worker failed on a batch of 3 requests" in caplog.text


def test_a_failing_runner_with_a_base_exception_fails_its_batch_only() -> None:
    calls = 0

    def runner(inputs: Tensors) -> Tensors:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SystemExit("a runner must not end its worker")
        return {"y": inputs["x"] * 2, "total": inputs["x"].sum(axis=1)}

    batcher = _batcher([runner])

    async def scenario() -> None:
        with pytest.raises(InternalError, match="SystemExit"):
            await _submit(batcher, _rows(1, 1))
        _check(await _submit(batcher, _rows(2, 1)), _rows(2, 1))

    try:
        _run(scenario)
    finally:
        batcher.close(1)


def test_failing_statistics_never_cost_the_answers(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenStats(ModelStats):
        def record_execution(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("stats bug")

    runner = FakeRunner()
    batcher = Batcher("m", [runner], max_batch_size=8, max_queue_size=0, stats=BrokenStats())
    batcher.start()

    async def scenario() -> None:
        for first in (1.0, 2.0):
            x = _rows(first, 2)
            _check(await _submit(batcher, x), x)

    try:
        with caplog.at_level(logging.ERROR, logger="optiserve.batching"):
            _run(scenario)
    finally:
        batcher.close(1)
    assert "recording the statistics of a batch failed" in caplog.text


def test_a_queue_delay_beyond_what_threads_can_wait_does_not_kill_the_worker() -> None:
    """max_queue_delay_microseconds near int64's max made Condition.wait raise OverflowError on the worker."""
    busy, waiting = FakeRunner(blocked=True), FakeRunner()
    policy = BatchPolicy(max_queue_delay_ns=(2**63 - 1) * 1000)
    batcher = Batcher("m", [busy, waiting], max_batch_size=2, max_queue_size=0, stats=ModelStats(), policy=policy)
    batcher.start()

    async def scenario() -> None:
        first, first_x = await _block_worker(batcher, busy)  # one instance busy: the other waits to fill a batch
        x, y = _rows(1, 1), _rows(2, 1)
        a = _spawn(batcher, x)
        await asyncio.sleep(0)  # queued: pending 2
        # Claimed under the lock, which the worker gives up only inside its wait for more: pending 1.
        await _until(lambda: batcher.pending == 1, "the second worker waiting with a request")
        b = _spawn(batcher, y)  # fills the batch: the waiting worker runs it at once
        _check(await a, x)
        _check(await b, y)
        assert waiting.sizes() == [2]
        busy.gate.set()
        _check(await first, first_x)

    try:
        _run(scenario)
    finally:
        busy.gate.set()
        batcher.close(1)


# ---- inline runs at low load ---------------------------------------------------------------------------------
class ThreadRecordingRunner(FakeRunner):
    """A FakeRunner that also notes which thread ran each call; its gate holds worker threads only (an inline
    run on the test's own thread must never block)."""

    def __init__(self, *, fail_on_negative: bool = False, delay_s: float = 0.0) -> None:
        super().__init__(fail_on_negative=fail_on_negative)
        self.threads: list[str] = []
        self.delay_s = delay_s
        self.caller = threading.current_thread()

    def __call__(self, inputs: Tensors) -> Tensors:
        self.threads.append(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if threading.current_thread() is self.caller:
            self.gate, held = threading.Event(), self.gate
            self.gate.set()
            try:
                return super().__call__(inputs)
            finally:
                self.gate = held
        return super().__call__(inputs)


INLINE_BOUND_NS = 1_000_000_000
"""An inline bound every fake runner is under."""


def test_an_idle_version_runs_requests_inline_after_a_quiet_streak_and_still_probes_its_workers() -> None:
    """One request at a time: the first QUIET_BEFORE_INLINE go through the worker, then the caller's thread runs
    them, except every PROBE_EVERY-th quiet one, which still takes a worker; answers and statistics are the same."""
    runner = ThreadRecordingRunner()
    batcher = _batcher([runner], inline_below_ns=INLINE_BOUND_NS)
    loop_thread = runner.caller.name
    count = 24

    async def scenario() -> None:
        for i in range(count):
            x = _rows(i, 1)
            _check(await _submit(batcher, x), x)

    try:
        _run(scenario)
    finally:
        batcher.close(1)
    expected = [
        "worker" if quiet < QUIET_BEFORE_INLINE or quiet % PROBE_EVERY == 0 else "inline"
        for quiet in range(1, count + 1)
    ]
    assert ["inline" if name == loop_thread else "worker" for name in runner.threads] == expected
    assert "inline" in expected and expected.count("worker") > QUIET_BEFORE_INLINE - 1
    assert batcher.stats.inference_count == count
    assert batcher.stats.execution_count == count
    assert batcher.pending == 0


def test_concurrent_requests_still_batch_when_inline_runs_are_allowed() -> None:
    """Once the version is quiet enough to run inline, a burst still leaves as batches: the probe request holds the
    worker while the burst arrives, which ends the quiet streak."""
    runner = ThreadRecordingRunner()
    batcher = _batcher([runner], inline_below_ns=INLINE_BOUND_NS)

    async def scenario() -> None:
        for i in range(QUIET_BEFORE_INLINE + 1):  # quiet: the last one ran inline
            await _submit(batcher, _rows(i, 1))
        assert runner.threads[-1] == runner.caller.name
        runner.gate.clear()  # from now on a request that reaches the worker stays there until released
        probe: asyncio.Task[Tensors] | None = None
        for i in range(PROBE_EVERY):  # inline ones finish at once; the probe takes the worker
            runner.entered.clear()
            task = _spawn(batcher, _rows(100 + i, 1))
            await _until(lambda: task.done() or runner.entered.is_set(), "the request to run")  # noqa: B023
            if not task.done():
                probe = task
                break
        assert probe is not None, "no request went to the worker while the version was quiet"
        xs = [_rows(200 + i, 1) for i in range(6)]
        burst = [_spawn(batcher, x) for x in xs]
        await _until(lambda: batcher.pending == 7, "the burst to queue behind the probe")
        runner.gate.set()
        for result, x in zip(await _wait_all(burst), xs, strict=True):
            _check(result, x)
        await probe

    try:
        _run(scenario)
    finally:
        runner.gate.set()
        batcher.close(1)
    assert runner.sizes()[-1] == 6  # the burst left as one batch, not inline one by one


@pytest.mark.parametrize(
    ("delay_s", "inline_below_ns"),
    [(0.002, 1_000_000), (0.0, 0)],
    ids=["slower-than-the-bound", "bound-0-turns-it-off"],
)
def test_requests_never_run_inline(delay_s: float, inline_below_ns: int) -> None:
    """A model slower than the bound (2 ms runs, 1 ms bound), or a bound of 0 (--inline-compute-us 0), keeps every
    request on its workers however quiet it is."""
    runner = ThreadRecordingRunner(delay_s=delay_s)
    batcher = _batcher([runner], inline_below_ns=inline_below_ns)

    async def scenario() -> None:
        for i in range(3 * QUIET_BEFORE_INLINE):
            await _submit(batcher, _rows(i, 1))

    try:
        _run(scenario)
    finally:
        batcher.close(1)
    assert len(runner.threads) == 3 * QUIET_BEFORE_INLINE
    assert runner.caller.name not in runner.threads


def test_an_inline_failure_reaches_its_caller_and_the_version_serves_on() -> None:
    runner = ThreadRecordingRunner(fail_on_negative=True)
    batcher = _batcher([runner], inline_below_ns=INLINE_BOUND_NS)
    loop_thread = threading.current_thread().name

    async def scenario() -> None:
        for i in range(QUIET_BEFORE_INLINE):
            await _submit(batcher, _rows(i, 1))
        with pytest.raises(ValueError, match="negative input"):
            await _submit(batcher, _rows(-5, 1))
        assert runner.threads[-1] == loop_thread  # it did run inline
        assert batcher.pending == 0
        x = _rows(7, 1)
        _check(await _submit(batcher, x), x)

    try:
        _run(scenario)
    finally:
        batcher.close(1)


def test_a_request_of_a_shape_never_timed_takes_a_worker_even_when_quiet() -> None:
    """The run-time estimate is per shape: a large input of a dynamic-shape model must not run on the loop because
    small ones were fast. Once its own shape has run fast through a worker, it may run inline too."""
    runner = ThreadRecordingRunner()
    batcher = _batcher([runner], inline_below_ns=INLINE_BOUND_NS)

    async def scenario() -> None:
        for i in range(QUIET_BEFORE_INLINE + 1):
            await _submit(batcher, _rows(i, 1))
        assert runner.threads[-1] == runner.caller.name  # narrow requests run inline by now
        wide = _rows(50, 1, width=6)
        _check(await _submit(batcher, wide), wide)
        assert runner.threads[-1] != runner.caller.name  # its first request of this shape: a worker
        _check(await _submit(batcher, wide), wide)
        assert runner.threads[-1] == runner.caller.name

    try:
        _run(scenario)
    finally:
        batcher.close(1)
