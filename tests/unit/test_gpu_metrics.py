"""GPU gauges on /metrics without a GPU: a fake nvidia-ml-py (pynvml) module stands in for the driver."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from prometheus_client import generate_latest

from server.metrics import ServerMetrics, gpu_families, state_families

GIB = 2**30


class FakeNvml(types.ModuleType):
    """Two GPUs, 25 % and 50 % busy, with 10 and 30 GiB of 80 GiB used."""

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.open = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("Driver Not Loaded")
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=25 * (handle + 1), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(used=(10 + 20 * handle) * GIB, total=80 * GIB, free=0)


def _samples(families: list[Any]) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["gpu"]): s.value for family in families for s in family.samples}


def test_three_gpu_gauges_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    families = gpu_families()
    assert [f.name for f in families] == [
        "optiserve_gpu_utilization_ratio",
        "optiserve_gpu_memory_used_bytes",
        "optiserve_gpu_memory_total_bytes",
    ]
    assert _samples(families) == {
        ("optiserve_gpu_utilization_ratio", "0"): 0.25,
        ("optiserve_gpu_utilization_ratio", "1"): 0.5,
        ("optiserve_gpu_memory_used_bytes", "0"): 10 * GIB,
        ("optiserve_gpu_memory_used_bytes", "1"): 30 * GIB,
        ("optiserve_gpu_memory_total_bytes", "0"): 80 * GIB,
        ("optiserve_gpu_memory_total_bytes", "1"): 80 * GIB,
    }
    assert nvml.open == 0  # every scrape shuts NVML down again


def test_gpu_gauges_in_the_exposition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    metrics = ServerMetrics()
    metrics.add_state_collector(lambda: state_families([], [], []))
    text = generate_latest(metrics.registry).decode()
    assert 'optiserve_gpu_utilization_ratio{gpu="1"} 0.5' in text
    assert 'optiserve_gpu_memory_used_bytes{gpu="0"} 1.073741824e+10' in text
    assert "# TYPE optiserve_gpu_memory_total_bytes gauge" in text


@pytest.mark.parametrize("nvml", [None, FakeNvml(fail_init=True)], ids=["not-installed", "no-driver"])
def test_no_gpu_gauges_without_nvml(monkeypatch: pytest.MonkeyPatch, nvml: Any) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu_families() == []
