"""The cache: second run is a hit (fast, same artifact), keys follow content, writes are atomic, size is capped."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from optimizers import OptimizeOptions, Pipeline
from optimizers.cache import Cache, atomic_write_bytes, cache_key
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, fake_device

FAST_INT8 = {"original": 10.0, "int8_dynamic": 5.0}


def _pipeline(cache: Path, benchmark: FakeBenchmark | None = None, max_bytes: int | None = None) -> Pipeline:
    return Pipeline(cache, max_bytes, device=fake_device(), benchmark=benchmark or FakeBenchmark(FAST_INT8))


def test_second_run_is_a_fast_hit_with_the_same_artifact(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "m")
    options = OptimizeOptions(time_budget_s=0.05)
    first = _pipeline(tmp_path / "cache").run(model, options)
    assert first.report["selected"] == "int8_dynamic" and not first.report["cache_hit"]
    assert first.model_path.is_relative_to(tmp_path / "cache")

    bench = FakeBenchmark(FAST_INT8)
    started = time.monotonic()
    second = _pipeline(tmp_path / "cache", bench).run(model, options)  # a new Pipeline: as after a restart
    assert time.monotonic() - started < 1.0
    assert second.report["cache_hit"] and bench.calls == []
    assert second.model_path == first.model_path and second.session == first.session
    assert second.family == first.family == "int8"
    assert second.report["steps"] == first.report["steps"]


def test_a_result_in_an_older_layout_is_recomputed(tmp_path: Path) -> None:
    """Cached results written before the typed session spec (``session_options``, no family) miss, and the
    pass artifacts still hit."""
    model = models.save(models.trained_digits().model, tmp_path / "m")
    first = _pipeline(tmp_path / "cache").run(model, OptimizeOptions())
    (entry,) = (tmp_path / "cache" / "results").iterdir()
    stored = json.loads(entry.read_text())
    old = {"artifact": stored["artifact"], "session_options": {}, "report": stored["report"]}
    entry.write_text(json.dumps(old))
    again = _pipeline(tmp_path / "cache").run(model, OptimizeOptions())
    assert not again.report["cache_hit"] and again.model_path == first.model_path
    assert {s["name"]: s for s in again.report["steps"]}["int8_dynamic"]["details"]["artifact_cache_hit"]
    assert json.loads(entry.read_text())["family"] == "int8"  # rewritten in the current layout


def test_same_bytes_under_another_name_hit_and_options_miss(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "a")
    copy = tmp_path / "b" / "model.onnx"
    copy.parent.mkdir()
    shutil.copyfile(model, copy)
    pipeline = _pipeline(tmp_path / "cache")
    first = pipeline.run(model, OptimizeOptions(), name="a", version="1")
    again = pipeline.run(copy, OptimizeOptions(), name="b", version="2")
    assert again.report["cache_hit"] and (again.report["model"], again.report["version"]) == ("b", "2")
    assert again.model_path == first.model_path
    other = pipeline.run(model, OptimizeOptions(accuracy={"cosine": 0.999}))
    assert not other.report["cache_hit"]
    steps = {s["name"]: s for s in other.report["steps"]}
    assert steps["int8_dynamic"]["details"]["artifact_cache_hit"]  # the pass artifact itself was reused


def test_evicted_artifact_means_recompute(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "m")
    first = _pipeline(tmp_path / "cache").run(model, OptimizeOptions())
    first.model_path.unlink()
    second = _pipeline(tmp_path / "cache").run(model, OptimizeOptions())
    assert not second.report["cache_hit"] and second.model_path.is_file()


def test_original_selected_serves_the_callers_file(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "m")
    slow = FakeBenchmark({"original": 1.0}, default=5.0)
    _pipeline(tmp_path / "cache", slow).run(model, OptimizeOptions())
    moved = tmp_path / "elsewhere.onnx"
    shutil.copyfile(model, moved)
    hit = _pipeline(tmp_path / "cache", slow).run(moved, OptimizeOptions())
    assert hit.report["cache_hit"] and hit.report["selected"] == "original" and hit.model_path == moved


def test_size_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", max_bytes=2500)
    paths = []
    for index in range(3):
        source = cache.work_dir() / "model.onnx"
        source.write_bytes(bytes(1000))
        paths.append(cache.put_artifact(f"k{index}", source, {"n": index}))
        past = time.time() - 100 + index
        os.utime(paths[-1], (past, past))
        os.utime(paths[-1].with_suffix(".json"), (past, past))
    assert cache.get_artifact("k0") is not None  # touch: k0 is now the most recent
    removed = cache.evict(keep=[paths[1]])
    assert paths[2] in removed and paths[2].with_suffix(".json") in removed
    assert cache.get_artifact("k2") is None and cache.get_artifact("k0") is not None
    assert cache.size_bytes() <= 2500 and paths[1].exists()


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the temp file is gone


def test_keys_depend_on_every_part() -> None:
    base = {"model": "abc", "pass_name": "int8_dynamic", "config": {"a": 1}, "device": "d1", "libraries": {"ort": "1"}}
    key = cache_key(**base)
    assert key == cache_key(**dict(reversed(list(base.items()))))
    for field, value in [("model", "abd"), ("config", {"a": 2}), ("device", "d2"), ("libraries", {"ort": "2"})]:
        assert cache_key(**{**base, field: value}) != key


def test_stale_scratch_is_cleaned(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    old = cache.work_dir()
    os.utime(old, (0, 0))
    fresh = cache.work_dir()
    Cache(tmp_path / "c")
    assert not old.exists() and fresh.exists()


def test_a_relative_root_is_made_absolute_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache paths reach engine options (TensorRT's cache folders): they must not depend on a later cwd."""
    monkeypatch.chdir(tmp_path)
    cache = Cache(Path("relative-cache"))
    monkeypatch.chdir("/")
    assert cache.root == tmp_path / "relative-cache"
    assert cache.artifacts.is_absolute()
