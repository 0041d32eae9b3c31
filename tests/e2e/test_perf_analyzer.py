"""Triton's own load generator runs against us over HTTP and gRPC without errors (a few seconds each)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_smoke(server: ServerProcess, protocol: str) -> None:
    binary = str(PERF_ANALYZER) if PERF_ANALYZER.exists() else shutil.which("perf_analyzer")
    if binary is None:
        pytest.skip("perf_analyzer is not installed (make test installs it with bench/install-perf-analyzer.sh)")
    url = server.http_address if protocol == "http" else server.grpc_address
    cmd = [binary, "-m", "mlp", "-u", url, "-i", protocol, "--concurrency-range", "2"]
    cmd += ["--measurement-interval", "1000", "--max-trials", "3", "--stability-percentage", "999"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Throughput" in result.stdout or "throughput" in result.stdout
    assert "error" not in result.stdout.lower(), result.stdout
