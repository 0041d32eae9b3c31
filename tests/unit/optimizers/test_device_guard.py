"""The optimizer's GPU work runs inside the guard the server installs (its CUDA-graph capture lock, shared):
session creation, every run, and dropping the session. CPU-only work never takes it."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from optimizers import runtime
from optimizers.providers import CPU, CUDA
from optimizers.runtime import SessionSpec, outputs_of
from optimizers.timing import OrtBenchmark
from tests.models import fixtures


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
def guard(monkeypatch: pytest.MonkeyPatch) -> RecordingGuard:
    recording = RecordingGuard()
    monkeypatch.setattr(runtime, "_device_guard", recording)
    return recording


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

    def tracked(path: Path, spec: SessionSpec) -> object:
        session = opened(path, spec)
        weakref.finalize(session, lambda: dropped_while.append(guard.held))
        return session

    monkeypatch.setattr(runtime, "open_session", tracked)
    # CUDA is not installed here: the session opens on the CPU, but the spec asks for a GPU, so it is guarded.
    outputs = outputs_of(model, SessionSpec(providers=(CUDA, CPU)), _batches(3))
    assert len(outputs) == 3 and guard.entered == 1 + 3 + 1  # create, three runs, drop
    assert dropped_while == [True]  # the session was freed inside the guard


def test_cpu_specs_never_take_the_guard(guard: RecordingGuard, model: Path) -> None:
    outputs_of(model, SessionSpec(), _batches(2))
    OrtBenchmark(budget_s=0.01, min_runs=2)("original", model, SessionSpec(), {2: _batches(1)[0]})
    assert guard.entered == 0


def test_timing_takes_the_guard_around_every_run(guard: RecordingGuard, model: Path) -> None:
    benchmark = OrtBenchmark(budget_s=0.01, min_runs=3, max_runs=5)
    latencies = benchmark("original", model, SessionSpec(providers=(CUDA, CPU)), {2: _batches(1)[0]})
    assert latencies[2] > 0
    assert guard.entered >= 1 + 1 + 3 + 1  # create, warm-up, at least three timed runs, drop
