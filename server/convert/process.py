"""Runs one conversion job in the worker process (:mod:`server.convert.worker`) and reads what it left:
a fresh interpreter per job, in its own process group, killed whole on timeout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from server.convert import sandbox
from server.convert.job import JOB_FILE, RESULT_FILE, ConvertError, Job, Produced

LOG_FILE = "worker.log"
DEFAULT_TIMEOUT_S = 900.0


def worker_threads() -> int:
    """Half the cores (at least one, at most four): the server keeps serving while a model converts."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def run_job(job: Job, timeout_s: float = DEFAULT_TIMEOUT_S) -> Produced:
    """Run ``job`` in a worker process; raise :class:`ConvertError` with the worker's reason on failure.
    The worker runs in the job's folder, so every path it is handed is made absolute first."""
    job = job.absolute()
    work_dir = Path(job.work_dir)
    (work_dir / JOB_FILE).write_text(job.to_json())
    command = [sys.executable, "-m", "server.convert.worker", str(work_dir)]
    with open(work_dir / LOG_FILE, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=work_dir,
            env=sandbox.worker_env(work_dir, worker_threads()),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise ConvertError(f"the conversion took longer than {timeout_s:.0f}s and was stopped") from None
        except BaseException:
            _kill_group(process)
            raise
    return _read_result(work_dir, code)


def _read_result(work_dir: Path, code: int) -> Produced:
    try:
        meta = json.loads((work_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        raise ConvertError(f"the converter process exited with {code} and no result: {log_tail(work_dir)}") from None
    if not meta.get("ok"):
        raise ConvertError(str(meta.get("error", "conversion failed")), str(meta.get("kind", "failed")))
    return Produced.load(work_dir, meta)


def log_tail(work_dir: Path, size: int = 1500) -> str:
    """The end of the worker's output, for error messages."""
    try:
        data = (work_dir / LOG_FILE).read_bytes()[-size:]
    except OSError:
        return "(no output)"
    return data.decode("utf-8", "replace").strip() or "(no output)"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
