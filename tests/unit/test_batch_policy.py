"""Priorities, queue timeouts (REJECT and DELAY), the under-load queue delay, preferred sizes, the Triton
config reader, and the CPU thread split."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from server.errors import DeadlineExceeded, InvalidInput
from server.models.batching import Batcher, BatchPolicy, QueuePolicy
from server.models.placement import instance_plan
from server.models.stats import ModelStats
from server.settings import Settings

KEY = (("x", (1,)),)


class GatedRunner:
    """Blocks on ``gate`` (a busy instance) and records the first value of every batch it runs."""

    def __init__(self, blocked: bool = True) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[float]] = []
        if not blocked:
            self.gate.set()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append([float(v) for v in inputs["x"][:, 0]])
        self.entered.set()
        assert self.gate.wait(5)
        return {"y": inputs["x"]}


def _x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.array([[value]], dtype=np.float32)}


async def _wait_for(event: threading.Event) -> None:
    deadline = time.monotonic() + 5
    while not event.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)


def test_higher_priority_runs_first() -> None:
    async def scenario() -> list[list[float]]:
        runner = GatedRunner()
        policy = BatchPolicy(priority_levels=3, default_priority=2)
        batcher = Batcher("m", [runner], max_batch_size=1, max_queue_size=0, stats=ModelStats(), policy=policy)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_x(0), 1, KEY))
        await _wait_for(runner.entered)
        low = asyncio.ensure_future(batcher.submit(_x(3), 1, KEY, priority=3))
        default = asyncio.ensure_future(batcher.submit(_x(2), 1, KEY))
        high = asyncio.ensure_future(batcher.submit(_x(1), 1, KEY, priority=1))
        await asyncio.sleep(0.01)
        runner.gate.set()
        await asyncio.gather(first, low, default, high)
        with pytest.raises(InvalidInput, match="priority"):
            await batcher.submit(_x(9), 1, KEY, priority=4)
        batcher.close(1)
        return runner.batches

    assert asyncio.run(scenario()) == [[0.0], [1.0], [2.0], [3.0]]


def test_reject_timeout_expires_while_queued_and_never_runs() -> None:
    async def scenario() -> tuple[list[list[float]], BaseException | None]:
        runner = GatedRunner()
        policy = BatchPolicy(default_queue=QueuePolicy(timeout_ns=20_000_000))  # 20 ms
        batcher = Batcher("m", [runner], max_batch_size=4, max_queue_size=0, stats=ModelStats(), policy=policy)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_x(0), 1, KEY))
        await _wait_for(runner.entered)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            await batcher.submit(_x(1), 1, KEY)
        except DeadlineExceeded as exc:
            error = exc
        assert time.monotonic() - started < 1.0
        runner.gate.set()
        await first
        batcher.close(1)
        return runner.batches, error

    batches, error = asyncio.run(scenario())
    assert isinstance(error, DeadlineExceeded)
    assert batches == [[0.0]]


def test_request_timeout_override_only_when_allowed() -> None:
    allowed = QueuePolicy(timeout_ns=50_000_000, allow_timeout_override=True)
    assert allowed.deadline_ns(10_000) == 10_000_000  # shorter: taken
    assert allowed.deadline_ns(100_000) == 50_000_000  # longer: capped at the default
    assert QueuePolicy(timeout_ns=0, allow_timeout_override=True).deadline_ns(7) == 7_000
    assert QueuePolicy(timeout_ns=5_000).deadline_ns(1) == 5_000  # not allowed: default


def test_delayed_requests_go_after_fresh_ones() -> None:
    async def scenario() -> list[list[float]]:
        runner = GatedRunner()
        policy = BatchPolicy(
            priority_levels=2,
            default_priority=2,
            level_queues={1: QueuePolicy(timeout_ns=1_000_000, reject_on_timeout=False)},
        )
        batcher = Batcher("m", [runner], max_batch_size=1, max_queue_size=0, stats=ModelStats(), policy=policy)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_x(0), 1, KEY))
        await _wait_for(runner.entered)
        delayed = asyncio.ensure_future(batcher.submit(_x(1), 1, KEY, priority=1))
        await asyncio.sleep(0.02)  # priority-1 request is now past its 1 ms timeout: demoted
        fresh = asyncio.ensure_future(batcher.submit(_x(2), 1, KEY, priority=2))
        await asyncio.sleep(0.01)
        runner.gate.set()
        await asyncio.gather(first, delayed, fresh)
        batcher.close(1)
        return runner.batches

    assert asyncio.run(scenario()) == [[0.0], [2.0], [1.0]]


def test_queue_delay_applies_only_under_load() -> None:
    """Idle: a lone request runs at once despite a 2 s delay. Under load (the other instance busy) the
    free worker waits for a fuller batch, up to the delay or until the preferred size is reached."""

    async def scenario() -> tuple[float, list[list[float]]]:
        runners = [GatedRunner(blocked=False), GatedRunner(blocked=False)]
        policy = BatchPolicy(max_queue_delay_ns=2_000_000_000, preferred_batch_sizes=(3,))
        batcher = Batcher("m", list(runners), max_batch_size=8, max_queue_size=0, stats=ModelStats(), policy=policy)
        batcher.start()
        started = time.monotonic()
        await asyncio.wait_for(batcher.submit(_x(0), 1, KEY), 1.0)
        idle_latency = time.monotonic() - started
        for runner in runners:  # from now on, an instance that takes work blocks until released
            runner.gate.clear()
            runner.entered.clear()
        blocker = asyncio.ensure_future(batcher.submit(_x(9), 1, KEY))
        while not any(r.entered.is_set() for r in runners):
            await asyncio.sleep(0.001)
        occupied = next(r for r in runners if r.entered.is_set())
        other = next(r for r in runners if r is not occupied)
        other.gate.set()
        results = []
        for value in (1, 2, 3):  # spaced out: without the under-load delay each would run alone
            results.append(asyncio.ensure_future(batcher.submit(_x(value), 1, KEY)))
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*results), 1.5)  # preferred size 3 closes the batch early
        occupied.gate.set()
        await blocker
        batcher.close(1)
        return idle_latency, other.batches

    idle_latency, batches = asyncio.run(scenario())
    assert idle_latency < 0.5
    assert [1.0, 2.0, 3.0] in batches


def _config(count: int, kind: Any = mc.ModelInstanceGroup.KIND_CPU) -> Any:
    config = mc.ModelConfig()
    config.instance_group.add(count=count, kind=kind)
    return config


def test_cpu_threads_are_split_between_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 8)
    monkeypatch.setattr("server.backends.onnxruntime.available_providers", lambda: ["CPUExecutionProvider"])
    assert [p.intra_op_threads for p in instance_plan(_config(1), Settings())] == [8]
    assert [p.intra_op_threads for p in instance_plan(_config(4), Settings())] == [2, 2, 2, 2]
    assert [p.intra_op_threads for p in instance_plan(_config(16), Settings())] == [1] * 16
    assert [p.intra_op_threads for p in instance_plan(_config(4), Settings(intra_op_threads=3))] == [3] * 4
    auto = instance_plan(_config(2, mc.ModelInstanceGroup.KIND_AUTO), Settings())
    assert all(p.providers == ("CPUExecutionProvider",) for p in auto)


def test_triton_thread_parameters_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.models.placement.available_cpus", lambda: 8)
    config = _config(2)
    config.parameters["intra_op_thread_count"].string_value = "1"
    config.parameters["inter_op_thread_count"].string_value = "2"
    plan = instance_plan(config, Settings(intra_op_threads=3))
    assert [(p.intra_op_threads, p.inter_op_threads) for p in plan] == [(1, 2), (1, 2)]
    config.parameters["intra_op_thread_count"].string_value = "many"
    from server.errors import LoadFailed

    with pytest.raises(LoadFailed, match="intra_op_thread_count"):
        instance_plan(config, Settings())


def test_kind_gpu_without_a_gpu_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.errors import LoadFailed

    monkeypatch.setattr("server.backends.onnxruntime.available_providers", lambda: ["CPUExecutionProvider"])

    with pytest.raises(LoadFailed, match="KIND_GPU"):
        instance_plan(_config(1, mc.ModelInstanceGroup.KIND_GPU), Settings())


def test_policy_from_triton_config() -> None:
    config = mc.ModelConfig()
    dynamic = config.dynamic_batching
    dynamic.max_queue_delay_microseconds = 250
    dynamic.preferred_batch_size.extend([4, 8])
    dynamic.priority_levels = 3
    dynamic.default_priority_level = 2
    dynamic.default_queue_policy.max_queue_size = 5
    dynamic.default_queue_policy.default_timeout_microseconds = 1000
    dynamic.priority_queue_policy[1].timeout_action = mc.ModelQueuePolicy.DELAY
    policy = BatchPolicy.from_config(config, default_max_queue_size=99)
    assert policy.max_queue_delay_ns == 250_000
    assert policy.preferred_batch_sizes == (4, 8)
    assert policy.default_priority == 2
    assert policy.default_queue == QueuePolicy(max_queue_size=5, timeout_ns=1_000_000)
    assert policy.queue_for(1).reject_on_timeout is False and policy.queue_for(1).max_queue_size == 99
