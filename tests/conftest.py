"""Shared fixtures. Tests are marked by folder (unit / integration / e2e / gpu); e2e tests run the real
``python -m server serve`` subprocess on ports the OS picks, so the suite runs in parallel (-n auto)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening: http=(\S+):(\d+) grpc=(\S+):(\d+)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in ("unit", "integration", "e2e", "gpu"):
            item.add_marker(getattr(pytest.mark, parts[0]))


class ServerProcess:
    """The real server as a subprocess, on free ports chosen by the OS (port 0), logs kept for asserts."""

    def __init__(self, repo: Path, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.repo = repo
        self.args = args
        self.cwd = cwd
        # Tests compare served outputs with onnxruntime's exactly, so the optimizer is off unless a test turns
        # it on; its cache goes to a fresh folder so no test sees another's artifacts.
        defaults = {"OPTISERVE_DEFAULT_PRECISION": "none", "OPTISERVE_CACHE_DIR": tempfile.mkdtemp(prefix="cache-")}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **defaults, **(env or {})}
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.http_port = 0
        self.grpc_port = 0
        self._listening = threading.Event()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "server", "serve", "--model-repository", str(self.repo)]
        cmd += ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", *self.args]
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._listening.wait(timeout):
            self.stop()
            raise RuntimeError(f"server did not start listening:\n{self.log}")
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match:
                self.http_port, self.grpc_port = int(match.group(2)), int(match.group(4))
                self._listening.set()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log}")
            try:
                if httpx.get(f"{self.http_url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log}")

    def is_live(self) -> bool:
        try:
            return httpx.get(f"{self.http_url}/v2/health/live", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def start_server() -> Iterator[object]:
    """Factory: ``start_server(repo, *flags, env=..., wait_ready=True)``; every server is stopped after."""
    servers: list[ServerProcess] = []

    def start(repo: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True) -> ServerProcess:
        server = ServerProcess(repo, *args, env=env)
        servers.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in servers:
        server.stop()
