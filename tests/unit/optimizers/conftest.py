"""Helpers for the optimizer tests: a probed device, a fake GPU device, injected timings, pass contexts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from optimizers import DeviceInfo, OptimizeOptions, probe_device
from optimizers.modelinfo import analyze
from optimizers.passes.base import PassContext
from optimizers.providers import CPU, CUDA, TENSORRT
from optimizers.reference import build_reference
from optimizers.runtime import Feed, SessionSpec
from optimizers.timing import Latencies

GPU_PROVIDERS = (TENSORRT, CUDA, CPU)


@pytest.fixture(scope="session")
def device() -> DeviceInfo:
    return probe_device()


def fake_device(**changes: object) -> DeviceInfo:
    """A described machine, for decisions that depend on hardware this one lacks."""
    base = {
        "arch": "x86_64",
        "cpu_model": "test cpu",
        "cores": 2,
        "cpu_flags": ("avx2", "fma", "avx512f", "avx512_vnni"),
        "providers": (CPU,),
    }
    return DeviceInfo.model_validate({**base, **changes})


class FakeBenchmark:
    """Timings by candidate label (ms at every batch size); unknown labels get ``default``. Records calls."""

    def __init__(self, latencies: Mapping[str, float] | None = None, default: float = 10.0) -> None:
        self.latencies = dict(latencies or {})
        self.default = default
        self.calls: list[tuple[str, Path, SessionSpec]] = []

    def __call__(self, label: str, model_path: Path, spec: SessionSpec, feeds: Mapping[int, Feed]) -> Latencies:
        self.calls.append((label, model_path, spec))
        value = self.latencies.get(label, self.default)
        return {batch: value * batch for batch in feeds}

    @property
    def labels(self) -> list[str]:
        return [call[0] for call in self.calls]


class FakeThroughput:
    """Samples/s by split (``(instances, threads)``), in order for repeated timings of one split (the last one
    repeats); unknown splits get ``default``. Records every call as (instances, threads, batch)."""

    def __init__(self, rates: Mapping[tuple[int, int], float | list[float]] | None = None, default: float = 100.0):
        given = (rates or {}).items()
        self.rates = {split: list(value) if isinstance(value, list) else [value] for split, value in given}
        self.default = default
        self.calls: list[tuple[int, int, int]] = []

    def __call__(
        self, label: str, model_path: Path, spec: SessionSpec, feed: Feed, batch: int, instances: int
    ) -> float:
        threads = spec.intra_op_threads or 0
        assert spec.instances is None  # each timed session is one instance; the count is the driver's
        assert len(next(iter(feed.values()))) == batch
        self.calls.append((instances, threads, batch))
        seen = sum(1 for call in self.calls if call[:2] == (instances, threads)) - 1
        rates = self.rates.get((instances, threads), [self.default])
        return rates[min(seen, len(rates) - 1)]


def context(model_path: Path, options: OptimizeOptions | None = None, device: DeviceInfo | None = None) -> PassContext:
    """What the pipeline would hand a pass for this model."""
    options = options or OptimizeOptions()
    info = analyze(model_path)
    batch_dim = options.max_batch_size > 0 and info.batch_dynamic
    reference = build_reference(info, None, options.reference_samples, batch_dim)
    return PassContext(device or fake_device(), options, info, reference.batches)
