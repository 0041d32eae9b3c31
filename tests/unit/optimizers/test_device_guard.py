"""The optimizer's GPU work runs inside the guard the host gives the pipeline (the server's CUDA-graph capture
lock, shared): session creation, every run, and dropping the session. CPU-only work never takes it."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from optimizers import OptimizeOptions, Pipeline, runtime
from optimizers.providers import CPU, CUDA
from optimizers.runtime import DeviceGuard, SessionSpec, outputs_of
from optimizers.timing import OrtBenchmark
from tests.models import fixtures
from tests.unit.optimizers.conftest import fake_device


class RecordingGuard:
    """Counts how often it is entered and whether it is held right now."""

    def __init__(self) -> None:
        self.entered = 0
        self.held = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.entered += 1
        self.held = True
        try:
            yield
        finally:
            self.held = False


@pytest.fixture
def guard() -> RecordingGuard:
    return RecordingGuard()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(fixtures.float_mlp().SerializeToString())
    return path


def _batches(count: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.ones((2, 8), np.float32) * i} for i in range(count)]


def test_gpu_specs_create_run_and_drop_inside_the_guard(
    guard: RecordingGuard, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped_while: list[bool] = []
    opened = runtime.open_session

    def tracked(path: Path, spec: SessionSpec, guard_: DeviceGuard = runtime.NO_GUARD) -> object:
        session = opened(path, spec, guard_)
        weakref.finalize(session, lambda: dropped_while.append(guard.held))
        return session

    monkeypatch.setattr(runtime, "open_session", tracked)
    # CUDA is not installed here: the session opens on the CPU, but the spec asks for a GPU, so it is guarded.
    outputs = outputs_of(model, SessionSpec(providers=(CUDA, CPU)), _batches(3), guard)
    assert len(outputs) == 3 and guard.entered == 1 + 3 + 1  # create, three runs, drop
    assert dropped_while == [True]  # the session was freed inside the guard


def test_cpu_specs_never_take_the_guard(guard: RecordingGuard, model: Path) -> None:
    outputs_of(model, SessionSpec(), _batches(2), guard)
    OrtBenchmark(budget_s=0.01, min_runs=2, guard=guard)("original", model, SessionSpec(), {2: _batches(1)[0]})
    assert guard.entered == 0


def test_timing_takes_the_guard_around_every_run(guard: RecordingGuard, model: Path) -> None:
    benchmark = OrtBenchmark(budget_s=0.01, min_runs=3, max_runs=5, guard=guard)
    latencies = benchmark("original", model, SessionSpec(providers=(CUDA, CPU)), {2: _batches(1)[0]})
    assert latencies[2] > 0
    assert guard.entered >= 1 + 1 + 3 + 1  # create, warm-up, at least three timed runs, drop


def test_the_pipeline_creates_every_gpu_session_inside_its_guard(
    guard: RecordingGuard, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference, the candidates, their timing and graph_opt's offline session on a CUDA machine (CUDA is
    faked as installed and dropped before onnxruntime sees it): each session is created while the guard the
    pipeline was given is held."""
    created_while: list[bool] = []
    real = onnxruntime.InferenceSession

    def tracked(path: str, options: object, providers: list[Any]) -> object:
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if names == [CPU]:  # the reference inputs' probe: a CPU session, no GPU work to guard
            return real(path, options, providers=providers)
        assert CUDA in names  # every other session of a CUDA target asks for the GPU
        created_while.append(guard.held)
        return real(path, options, providers=[p for p, n in zip(providers, names, strict=True) if n != CUDA])

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnxruntime, "InferenceSession", tracked)
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(providers=(CUDA, CPU)), device_guard=guard)
    result = pipeline.run(model, OptimizeOptions(target="cuda", time_budget_s=0.05, precision="fp32"))
    steps = {step["name"]: step["status"] for step in result.report["steps"]}
    assert steps["graph_opt"] != "skipped" and len(created_while) >= 4, (steps, created_while)
    assert all(created_while)
