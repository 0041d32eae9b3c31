"""A real NVIDIA Triton 2.51 beside optiserve, from the scripts in ../shared/peers/triton (called, not copied).

setup.sh installs tritonserver (from the nvidia-pytriton wheel) into a venv once; serve.sh serves a folder of
ONNX files in the foreground through Triton's C++ HTTP/gRPC front ends and dynamic batcher, the model running
in the python backend with onnxruntime. This module runs it in its own process group and stops it again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.serving import free_port, http_get

READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0


def peer_dir(root: Path) -> Path:
    """../shared/peers/triton relative to the repository root."""
    return (root.parent / "shared" / "peers" / "triton").resolve()


def ensure_installed(peer: Path, venv: Path) -> None:
    """Run setup.sh into ``venv`` unless it already holds Triton's python backend stub."""
    if (venv / "triton" / "backends" / "python" / "triton_python_backend_stub").exists():
        return
    print(f"[triton] installing into {venv} (once)", flush=True)
    subprocess.run([str(peer / "setup.sh"), str(venv)], check=True)


class TritonServer:
    """serve.sh in its own session; use as a context manager so it is stopped even when the benchmark fails."""

    def __init__(self, peer: Path, venv: Path, models_dir: Path, names: list[str], log_path: Path) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.cmd = [
            str(peer / "serve.sh"), str(venv), str(models_dir), ",".join(names),
            str(self.http_port), str(self.grpc_port),
        ]  # fmt: skip
        self.names = names
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> TritonServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until Triton and every model answer ready; returns the seconds it took."""
        start = time.monotonic()
        for path in ["/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in self.names]:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with code {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(OSError):
                    if http_get(f"http://{self.http_url}{path}", timeout=2.0)[0] == 200:
                        break
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"Triton: GET {path} not 200 after {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.25)
        return time.monotonic() - start

    def stop(self) -> int | None:
        """SIGTERM to the process group (serve.sh execs tritonserver, which stops its python stubs), then
        SIGKILL after STOP_GRACE_S."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()
