"""Run the optiserve server as a subprocess and talk to its KServe V2 HTTP endpoints.

The server is started exactly as a user would start it (`python -m server serve ...`), so the benchmark
measures the shipped code path, including its process start-up and model loading.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (racy in theory, fine for one local benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET returning (status, body); HTTP errors are returned, not raised, connection errors raise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str) -> dict[str, Any]:
    """GET a JSON object; any non-200 answer becomes a RuntimeError carrying the body."""
    status, body = http_get(url)
    if status != 200:
        raise RuntimeError(f"GET {url} -> {status}: {body[:300]!r}")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise RuntimeError(f"GET {url}: expected a JSON object, got {type(data).__name__}")
    return data


class ServerProcess:
    """The server under test; use as a context manager so it is stopped even when the benchmark fails."""

    def __init__(self, python: str, repo: Path, log_path: Path, cwd: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.cmd = [
            python, "-m", "server", "serve",
            "--model-repository", str(repo),
            "--host", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port),
            *extra_args,
        ]  # fmt: skip
        self.log_path = log_path
        self.cwd: Path | None = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.term_group = False
        """SIGTERM the whole process group (a launcher script and what it starts), not only the process."""
        self.stop_grace_s = STOP_GRACE_S

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # Own session: a Ctrl-C in the terminal reaches only the harness, which then stops the server.
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def wait_ready(self, models: list[str], timeout: float = READY_TIMEOUT_S) -> float:
        """Block until the server and every model report ready; returns the seconds it took."""
        start = time.monotonic()
        paths = ["/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in models]
        for path in paths:
            while True:
                self._check_alive()
                with contextlib.suppress(OSError):
                    if http_get(f"http://{self.http_url}{path}", timeout=2.0)[0] == 200:
                        break
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"GET {path} not 200 after {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.25)
        return time.monotonic() - start

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL (to the whole process group) after stop_grace_s; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        if self.term_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def model_config(self, model: str) -> dict[str, Any]:
        return get_json(f"http://{self.http_url}/v2/models/{model}/config")

    def model_stats(self, model: str) -> dict[str, Any]:
        return get_json(f"http://{self.http_url}/v2/models/{model}/stats")


def batch_counts(stats: dict[str, Any]) -> Counter[int]:
    """Executions per batch size from a Triton statistics answer, summed over model versions."""
    counts: Counter[int] = Counter()
    for version in stats.get("model_stats") or []:
        for entry in version.get("batch_stats") or []:
            # Protobuf-to-JSON renders 64-bit integers as strings; accept both.
            counts[int(entry["batch_size"])] += int(entry["compute_infer"]["count"])
    return counts


def inference_totals(stats: dict[str, Any]) -> Counter[str]:
    """inference_count and execution_count summed over versions (missing fields count as 0)."""
    totals: Counter[str] = Counter()
    for version in stats.get("model_stats") or []:
        for key in ("inference_count", "execution_count"):
            totals[key] += int(version.get(key) or 0)
    return totals


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two statistics snapshots: executions per batch size and the totals."""
    batches = batch_counts(after)
    batches.subtract(batch_counts(before))
    totals = inference_totals(after)
    totals.subtract(inference_totals(before))
    return {
        "batch_sizes": {b: n for b, n in sorted(batches.items()) if n > 0},
        "inference_count": totals["inference_count"],
        "execution_count": totals["execution_count"],
    }


def shape_args(config: dict[str, Any]) -> list[str]:
    """--shape flags for inputs whose configured dims are still variable (-1); none when all are fixed."""
    args = []
    for inp in config.get("input") or []:
        dims = [int(d) for d in inp.get("dims") or []]
        if -1 in dims:
            fixed = ",".join("1" if d == -1 else str(d) for d in dims)
            args.append(f"--shape={inp['name']}:{fixed}")
    return args
