"""Serve first, optimize after: READY with the original model, the variant swapped in on the same version;
cached results and ``mode: before_ready`` apply before READY; unload/reload during a background run."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimizers import PipelineResult, Report
from optimizers.runtime import SessionSpec
from server.metrics import ServerMetrics
from server.models import loader as loader_module
from server.models.loader import PendingOptimization
from server.models.manager import ModelManager
from server.protocol.datatypes import BY_NAME
from server.protocol.inference import InferenceRequest, InputTensor
from server.repository.layout import Repository
from server.settings import Settings
from tests.models import fixtures

WAIT_S = 20.0
FAST = "optimize { time_budget_s: 0.1 }"


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 3 * WAIT_S))


def _manager(tmp_path: Path, config: str | None = None, **settings: Any) -> ModelManager:
    repo = tmp_path / "repo"
    if not (repo / "mlp").exists():
        fixtures.write_model(repo, "mlp", fixtures.float_mlp(), config=config)
    # These drive the optimizer with no traffic: it must not wait for request samples first.
    values = {"model_repository": repo, "cache_dir": tmp_path / "cache", "optimize_from_traffic": False, **settings}
    return ModelManager(Repository(repo), Settings(**values), ServerMetrics())


def _request() -> InferenceRequest:
    x = np.full((1, 8), 0.25, dtype=np.float32)
    return InferenceRequest("mlp", "", [InputTensor("x", BY_NAME["FP32"], x)])


async def _until(check: Any) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


class SlowOptimizer:
    """Stands in for the pipeline: blocks until released, then selects a copy of the model as a 'variant'."""

    def __init__(self, tmp_path: Path) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.folder = tmp_path / "variants"
        self.folder.mkdir()

    def __call__(self, source: PendingOptimization, progress: Any) -> PipelineResult:
        self.started.set()
        progress("optimize: timing candidates")
        assert self.release.wait(WAIT_S)
        variant = self.folder / "variant.onnx"
        shutil.copy(source.model_path, variant)
        report = Report(model=source.name, version=str(source.version), selected="fake_variant")
        self.finished.set()
        return PipelineResult(variant, SessionSpec(), "fp32", report)


def test_background_serves_the_original_then_swaps_the_variant_in(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    slow = SlowOptimizer(tmp_path)
    manager.loader.optimize = slow  # type: ignore[method-assign]

    async def scenario() -> None:
        await manager.load_all()
        first = manager.get("mlp")
        assert first.variant == "original" and first.report["phase"] == "optimizing"
        assert manager.server_ready()
        await _until(slow.started.is_set)
        await _until(lambda: manager.get("mlp").report["step"] == "optimize: timing candidates")
        assert manager.index()[0]["state"] == "READY"
        assert manager.index()[0]["reason"].startswith("optimizing")
        before = (await first.infer(_request())).outputs[0].array
        slow.release.set()
        await _until(lambda: manager.get("mlp") is not first)
        second = manager.get("mlp")
        assert (second.name, second.version, second.variant) == ("mlp", 1, "fake_variant")
        assert second.report["phase"] == "optimized" and second.report["step"] == ""
        assert second.stats is first.stats  # statistics continue across the swap
        assert {"instances", "warmup"} <= set(second.report)
        after = (await second.infer(_request())).outputs[0].array
        np.testing.assert_allclose(before, after, rtol=1e-6)
        row = manager.index()[0]
        assert row == {
            "name": "mlp",
            "version": "1",
            "state": "READY",
            "reason": "",
            "memory_bytes": row["memory_bytes"],
        }
        assert int(row["memory_bytes"]) == second.memory_bytes > 0  # the swapped-in variant was measured
        assert manager.metrics is not None
        registry = manager.metrics.registry
        labels = {"model": "mlp", "version": "1"}
        ready = registry.get_sample_value("optiserve_model_time_to_ready_seconds", labels)
        optimized = registry.get_sample_value("optiserve_model_time_to_optimized_seconds", labels)
        assert ready is not None and optimized is not None and optimized >= ready
        await manager.close(1)

    _run(scenario())


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux's")
def test_background_optimizer_runs_at_lower_priority_and_the_variant_serves_at_normal_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = _manager(tmp_path, optimize_nice=7)
    slow = SlowOptimizer(tmp_path)
    seen: dict[str, int] = {}

    def optimize(source: PendingOptimization, progress: Any) -> PipelineResult:
        seen["optimizer"] = _nice()
        child = threading.Thread(target=lambda: seen.setdefault("optimizer_child", _nice()))  # e.g. ORT's pool
        child.start()
        child.join()
        return slow(source, progress)

    manager.loader.optimize = optimize  # type: ignore[method-assign]
    make_backends = loader_module._make_backends

    def recording(label: str, model_path: Path, plan: Any) -> Any:
        seen.setdefault("serving", _nice())  # first call: the original's load; then the variant's (same value)
        seen["variant"] = _nice()
        return make_backends(label, model_path, plan)

    monkeypatch.setattr(loader_module, "_make_backends", recording)
    normal = _nice()

    async def scenario() -> None:
        await manager.load_all()
        first = manager.get("mlp")
        slow.release.set()
        await _until(lambda: manager.get("mlp") is not first)
        assert manager.get("mlp").variant == "fake_variant"
        await manager.close(1)

    _run(scenario())
    assert seen["optimizer"] == seen["optimizer_child"] == min(19, normal + 7)
    assert seen["serving"] == seen["variant"] == normal


def test_before_ready_opt_out_then_a_restart_applies_the_cached_result_before_ready(tmp_path: Path) -> None:
    manager = _manager(tmp_path, config="optimize { mode: before_ready time_budget_s: 0.1 }")
    calls: list[str] = []

    def background(*_args: Any) -> Any:
        calls.append("background")
        raise AssertionError("no background run expected")

    manager.loader.optimize = background  # type: ignore[method-assign]

    async def optimize_before_ready() -> dict[str, Any]:
        await manager.load_all()
        served = manager.get("mlp")
        assert served.pending is None and served.report["phase"] in ("optimized", "original")
        assert manager.index()[0]["reason"] == ""
        report = dict(served.report)
        await manager.close(1)
        return report

    first = _run(optimize_before_ready())
    assert first["cache_hit"] is False
    # The same model restarted in the default (background) mode: mode is not part of the cache key.
    (tmp_path / "repo" / "mlp" / "config.pbtxt").write_text(FAST)
    restarted = _manager(tmp_path)
    restarted.loader.optimize = manager.loader.optimize  # type: ignore[method-assign]

    async def restart() -> None:
        await restarted.load_all()
        served = restarted.get("mlp")
        assert served.pending is None and served.report["cache_hit"] is True
        assert served.report["selected"] == first["selected"] and served.variant == first["selected"]
        assert served.report["phase"] == first["phase"]
        await asyncio.sleep(0.1)
        await restarted.close(1)

    _run(restart())
    assert calls == []  # no background run: both loads were final before READY


def test_server_flag_before_ready_keeps_the_version_loading_until_optimized(tmp_path: Path) -> None:
    manager = _manager(tmp_path, config=FAST, optimize_mode="before_ready")

    async def scenario() -> None:
        await manager.load_all()
        served = manager.get("mlp")
        assert served.pending is None and served.report["phase"] in ("optimized", "original")
        assert served.report["steps"]  # the whole run happened before READY
        await manager.close(1)

    _run(scenario())


def test_unload_during_background_optimization_discards_the_result(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    slow = SlowOptimizer(tmp_path)
    manager.loader.optimize = slow  # type: ignore[method-assign]
    rebuilt: list[Any] = []
    real_rebuild = manager.loader.rebuild

    def rebuild(*args: Any) -> Any:
        rebuilt.append(real_rebuild(*args))
        return rebuilt[-1]

    manager.loader.rebuild = rebuild  # type: ignore[method-assign]

    async def scenario() -> None:
        await manager.load_all()
        await _until(slow.started.is_set)
        await manager.unload("mlp")
        slow.release.set()
        await _until(slow.finished.is_set)
        await asyncio.sleep(0.3)
        assert not manager.is_ready("mlp")
        assert manager.index()[0]["state"] == "UNAVAILABLE"
        assert rebuilt == []  # the result was dropped before any session was made
        assert not manager.background.pending
        await manager.close(1)

    _run(scenario())


def test_reload_during_background_optimization_does_not_resurrect_the_old_version(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    slow = SlowOptimizer(tmp_path)
    manager.loader.optimize = slow  # type: ignore[method-assign]

    async def scenario() -> None:
        await manager.load_all()
        await _until(slow.started.is_set)
        old = manager.get("mlp")
        await manager.load("mlp")  # the reload serves the original again and queues its own optimization
        reloaded = manager.get("mlp")
        assert reloaded is not old and reloaded.report["phase"] == "optimizing"
        slow.release.set()
        await _until(lambda: manager.get("mlp").variant == "fake_variant")
        assert manager.get("mlp") is not old
        await manager.close(1)

    _run(scenario())
