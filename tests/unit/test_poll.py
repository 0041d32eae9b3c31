"""ModelManager.poll() on a real repository folder: new models load, changed ones reload, removed ones unload, an
unchanged folder is left alone, hidden folders (staging, replica heartbeats) are never models, and a reload that
fails keeps the serving version serving until the folder changes again."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from server.metrics import ServerMetrics
from server.models.manager import ModelManager
from server.protocol.datatypes import BY_NAME
from server.protocol.inference import InferenceRequest, InputTensor
from server.repository.layout import Repository
from server.settings import Settings
from tests.models import fixtures


def _manager(repo: Path, tmp_path: Path) -> ModelManager:
    settings = Settings(
        model_repository=repo,
        cache_dir=tmp_path / "cache",
        model_control_mode="poll",
        default_precision="none",
    )
    return ModelManager(Repository(repo), settings, ServerMetrics())


def _with_manager(repo: Path, tmp_path: Path, body: Callable[[ModelManager], Awaitable[None]]) -> None:
    async def run() -> None:
        manager = _manager(repo, tmp_path)
        await manager.load_all()
        try:
            await body(manager)
        finally:
            await manager.close(timeout_s=1)

    asyncio.run(asyncio.wait_for(run(), 120))


async def _output(manager: ModelManager, name: str) -> np.ndarray:
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    response = await manager.get(name).infer(InferenceRequest(name, "", [InputTensor("x", BY_NAME["FP32"], x)]))
    return np.asarray(response.outputs[0].array)


def _reloads(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Models a poll decided to (re)load, from its log."""
    return [str(r.args[0]) for r in caplog.records if r.getMessage().startswith("poll: model") and "loading" in r.msg]


def _publish(repo: Path, name: str, version: int, model: onnx.ModelProto) -> None:
    """Write a version beside the repository and rename it in, as an upload publishes one."""
    staged = fixtures.write_model(repo.parent / "staged", name, model, version)
    (repo / name).mkdir(exist_ok=True)
    os.replace(staged, repo / name / str(version))


def test_poll_follows_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "a", fixtures.float_mlp(seed=1))

    async def body(manager: ModelManager) -> None:
        first = manager.get("a")
        await manager.poll()
        assert manager.get("a") is first  # nothing changed: nothing reloaded

        _publish(repo, "b", 1, fixtures.float_mlp(seed=3))
        (repo / ".optiserve" / "replicas").mkdir(parents=True)
        (repo / ".optiserve" / "replicas" / "x.json").write_text("{}")
        (repo / ".staging" / "1" / "1").mkdir(parents=True)
        await manager.poll()
        assert manager.is_ready("b") and manager.get("a") is first
        assert sorted({row["name"] for row in manager.index()}) == ["a", "b"]

        before = await _output(manager, "a")
        _publish(repo, "a", 2, fixtures.float_mlp(seed=2))
        await manager.poll()
        assert manager.get("a").version == 2 and not manager.is_ready("a", "1")  # latest 1
        assert not np.array_equal(before, await _output(manager, "a"))

        shutil.rmtree(repo / "b")
        await manager.poll()
        assert not manager.is_ready("b") and manager.is_ready("a")
        assert [row["state"] for row in manager.index() if row["name"] == "b"] == ["UNAVAILABLE"]
        assert manager.server_ready()  # a model removed from the repository is no longer waited for

    _with_manager(repo, tmp_path, body)


def test_failed_reload_keeps_serving_until_the_folder_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    repo = tmp_path / "repo"
    fixtures.write_model(repo, "a", fixtures.float_mlp(seed=1))

    async def body(manager: ModelManager) -> None:
        served = manager.get("a")
        broken = repo / "a" / "2"
        broken.mkdir()
        (broken / "model.onnx").write_bytes(b"not onnx")
        await manager.poll()
        assert manager.get("a") is served  # version 1 still answers
        reasons = [row["reason"] for row in manager.index() if row["name"] == "a"]
        assert any("2" in reason and "ONNX" in reason for reason in reasons), reasons

        caplog.clear()
        await manager.poll()
        assert not _reloads(caplog)  # the failed folder is not retried on every poll

        shutil.rmtree(broken)
        await manager.poll()
        assert _reloads(caplog) == ["a"] and manager.get("a").version == 1 and manager.is_ready("a")

    _with_manager(repo, tmp_path, body)
