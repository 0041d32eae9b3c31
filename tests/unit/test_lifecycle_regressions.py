"""Regression tests for lifecycle bugs a review found: cancelled loads, failed reloads, shutdown, queue slots."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.dataplane import DataPlane
from server.errors import DeadlineExceeded, LoadFailed, ServerError, wire_status
from server.models.batching import Batcher, BatchPolicy, QueuePolicy
from server.models.entry import ModelState
from server.models.manager import ModelManager
from server.models.stats import ModelStats
from server.protocol.datatypes import BY_NAME
from server.protocol.inference import InferenceRequest, InputTensor
from server.repository.layout import Repository
from server.settings import Settings
from tests.models import fixtures

WAIT_S = 5.0


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 3 * WAIT_S))


def _manager(tmp_path: Path) -> ModelManager:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())
    settings = Settings(model_repository=repo, default_precision="none", cache_dir=tmp_path / "cache")
    return ModelManager(Repository(repo), settings)


def _request() -> InferenceRequest:
    x = np.full((1, 8), 0.25, dtype=np.float32)
    return InferenceRequest("mlp", "", [InputTensor("x", BY_NAME["FP32"], x)])


def test_failed_reload_leaves_served_version_loading(tmp_path: Path) -> None:
    manager = _manager(tmp_path)

    async def scenario() -> None:
        await manager.load_all()
        assert manager.index()[0]["state"] == "READY"

        def failing_build(name: str, version: int, loaded: Any, progress: Any) -> Any:
            progress("optimize: timing the original")  # what optimizers/stages.py reports
            raise LoadFailed("optimizer failed")

        manager.loader.build = failing_build  # type: ignore[method-assign]
        with pytest.raises(LoadFailed):
            await manager.load("mlp")
        try:
            assert manager.is_ready("mlp", "1")  # version 1 still serves ...
            row = manager.index()[0]
            assert row["state"] == "READY", row  # ... but the index says LOADING, forever
        finally:
            await manager.close(1)

    _run(scenario())


def test_cancelled_load_leaves_model_loading_and_leaks_built_version(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    release = threading.Event()
    built: list[Any] = []
    real_build = manager.loader.build

    def slow_build(name: str, version: int, loaded: Any, progress: Any) -> Any:
        release.wait(WAIT_S)
        version_obj = real_build(name, version, loaded, progress)
        built.append(version_obj)
        return version_obj

    manager.loader.build = slow_build  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.ensure_future(manager.load("mlp"))
        await asyncio.sleep(0.05)
        task.cancel()  # what grpc.aio does to the handler when the client's deadline passes
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        deadline = time.monotonic() + WAIT_S
        while not built and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        leaked = [t for v in built for t in v.batcher._threads if t.is_alive()]
        state = manager._entries["mlp"].model_status.state
        for v in built:
            v.close(0)
        assert state is not ModelState.LOADING, "model stays LOADING: every infer answers 503 'still loading'"
        assert not leaked, "the version built after the cancel is never served and never closed"

    _run(scenario())


def test_infer_during_shutdown_is_503_not_404(tmp_path: Path) -> None:
    manager = _manager(tmp_path)

    async def scenario() -> None:
        await manager.load_all()
        dataplane = DataPlane(manager)
        # OptiServe._shutdown drains first; once pending() == 0 the models are closed while requests still in
        # decode (or retried after BatcherClosed) have yet to reach the data plane.
        manager.drain()
        await manager.close(1)
        with pytest.raises(ServerError) as caught:
            await dataplane.infer(_request())
        assert wire_status(caught.value).http_status == 503, caught.value

    _run(scenario())


class _Blocked:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(WAIT_S)
        return {"y": inputs["x"] * 2}


def test_expired_requests_still_count_against_max_queue_size() -> None:
    runner = _Blocked()
    policy = BatchPolicy(default_queue=QueuePolicy(max_queue_size=1, timeout_ns=0, allow_timeout_override=True))
    batcher = Batcher("m", [runner], max_batch_size=8, max_queue_size=1, stats=ModelStats(), policy=policy)
    batcher.start()
    x = np.ones((1, 2), dtype=np.float32)
    key = (("x", (2,)),)

    async def scenario() -> None:
        busy = asyncio.ensure_future(batcher.submit({"x": x}, 1, key))
        assert await asyncio.to_thread(runner.entered.wait, WAIT_S)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit({"x": x}, 1, key, timeout_us=1000)  # waits 1 ms, then 503
        late = asyncio.ensure_future(batcher.submit({"x": x}, 1, key))
        await asyncio.sleep(0.01)
        try:
            assert not late.done() or late.exception() is None, late.exception()
        finally:
            runner.gate.set()
            await busy
            if not late.done() or late.exception() is None:
                await late
            await asyncio.to_thread(batcher.close, 1)

    _run(scenario())


def test_shutdown_during_startup_load_waits_for_the_build(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    build_s = 1.5

    def slow_build(name: str, version: int, loaded: Any, progress: Any) -> Any:
        time.sleep(build_s)  # the optimizer benchmarking candidates
        raise LoadFailed("stand-in for a long optimization")

    manager.loader.build = slow_build  # type: ignore[method-assign]

    async def serve_then_sigterm() -> None:  # the order of OptiServe.run / _shutdown
        loading = asyncio.create_task(manager.load_all())
        await asyncio.sleep(0.05)
        loading.cancel()
        await manager.close(timeout_s=0.1)

    started = time.monotonic()
    asyncio.run(serve_then_sigterm())
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 * build_s, f"process exit waited {elapsed:.2f}s for a cancelled load"


def test_reshape_configs_fail_to_load_clearly() -> None:
    """A Triton config with ``reshape`` would load and then fail every request in onnxruntime: refuse it."""
    from server.errors import LoadFailed
    from server.repository.config import complete_config, parse_config
    from tests.models import fixtures

    loaded = parse_config('input [{ name: "x" data_type: TYPE_FP32 dims: [8] reshape { shape: [2, 4] } }]', "pbtxt")
    with pytest.raises(LoadFailed, match="reshape"):
        complete_config(loaded, "m", fixtures.float_mlp(), 8)


def test_leftovers_of_a_replaced_version_are_retried_not_failed() -> None:
    """At the drain deadline of a swapped-out version, queued requests get BatcherClosed (the data plane
    retries them on the new version); after an unload they get a plain 503."""
    from server.errors import ServerUnavailable
    from server.models.batching import Batcher, BatcherClosed
    from server.models.stats import ModelStats

    async def scenario(replaced: bool) -> BaseException:
        runner = _Blocked()
        batcher = Batcher("m", [runner], max_batch_size=1, max_queue_size=0, stats=ModelStats())
        batcher.start()
        key = (("x", (1,)),)
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 1), np.float32)}, 1, key))
        while not runner.entered.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 1), np.float32)}, 1, key))
        await asyncio.sleep(0.01)
        await asyncio.to_thread(batcher.close, 0.05, replaced=replaced)
        runner.gate.set()
        await first
        try:
            await queued
        except ServerUnavailable as exc:
            return exc
        raise AssertionError("the queued request was not failed")

    assert isinstance(asyncio.run(scenario(True)), BatcherClosed)
    assert not isinstance(asyncio.run(scenario(False)), BatcherClosed)


def test_models_waiting_to_load_at_start_show_loading_not_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load() awaits before it takes the model's lock (an ensemble's members): until then the index showed the
    model UNAVAILABLE with no reason, and a client polling the index for "nothing LOADING" stopped too early."""
    manager = _manager(tmp_path)
    gate = asyncio.Event()
    original = manager._ensemble_members

    async def slow_members(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(manager, "_ensemble_members", slow_members)

    async def scenario() -> None:
        loading = asyncio.ensure_future(manager.load_all())
        await asyncio.sleep(0.05)
        assert [row["state"] for row in manager.index()] == ["LOADING"]
        gate.set()
        await loading
        assert [row["state"] for row in manager.index()] == ["READY"]
        await manager.close(1)

    _run(scenario())
