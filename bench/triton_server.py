"""A real NVIDIA Triton 2.51 beside optiserve, from the scripts in ../shared/peers/triton (called, not copied).

setup.sh installs tritonserver (from the nvidia-pytriton wheel) into a venv once; serve.sh serves a folder of
ONNX files in the foreground through Triton's C++ HTTP/gRPC front ends and dynamic batcher, the model running
in the python backend with onnxruntime. This module runs it in its own process group and stops it again.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.serving import ServerProcess, free_port

READY_TIMEOUT_S = 180.0


def peer_dir(root: Path) -> Path:
    """../shared/peers/triton relative to the repository root."""
    return (root.parent / "shared" / "peers" / "triton").resolve()


def ensure_installed(peer: Path, venv: Path) -> None:
    """Run setup.sh into ``venv`` unless it already holds Triton's python backend stub."""
    if (venv / "triton" / "backends" / "python" / "triton_python_backend_stub").exists():
        return
    print(f"[triton] installing into {venv} (once)", flush=True)
    subprocess.run([str(peer / "setup.sh"), str(venv)], check=True)


class TritonServer(ServerProcess):
    """serve.sh in its own session (ServerProcess's start, log and stop, SIGTERM to the whole group: serve.sh execs
    tritonserver, which stops its python stubs); use as a context manager."""

    def __init__(self, peer: Path, venv: Path, models_dir: Path, names: list[str], log_path: Path) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.cmd = [
            str(peer / "serve.sh"), str(venv), str(models_dir), ",".join(names),
            str(self.http_port), str(self.grpc_port),
        ]  # fmt: skip
        self.names = names
        self.log_path = log_path
        self.cwd = None
        self.proc = None
        self.term_group = True
        self.stop_grace_s = 15.0

    def wait_ready(self, models: list[str] | None = None, timeout: float = READY_TIMEOUT_S) -> float:
        """Block until Triton and every model it serves answer ready; returns the seconds it took."""
        return super().wait_ready(self.names if models is None else models, timeout)
