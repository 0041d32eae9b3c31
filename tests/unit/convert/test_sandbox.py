"""server.convert.sandbox: the worker's audit hook stops unpickling of globals, process spawning, sockets
and writes outside its folder, and its environment carries no tokens or GPUs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.convert.sandbox import worker_env

ROOT = Path(__file__).resolve().parents[3]


def _in_sandbox(tmp_path: Path, body: str) -> str:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    lines = [
        "from pathlib import Path",
        "from server.convert import sandbox",
        f"sandbox.install(Path({str(work)!r}))",
        "try:",
        *("    " + line for line in textwrap.dedent(body).strip().splitlines()),
        '    print("ALLOWED")',
        "except sandbox.SandboxViolation as exc:",
        '    print("REFUSED", exc)',
    ]
    script = "\n".join(lines)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


@pytest.mark.parametrize(
    "body",
    [
        "import pickle, os; pickle.loads(pickle.dumps(os.getcwd))",
        "import os; os.system('true')",
        "import subprocess; subprocess.run(['true'])",
        "import socket; socket.create_connection(('127.0.0.1', 9))",
        "open('/tmp/optiserve-sandbox-escape', 'w')",
        "import os; os.open('/tmp/optiserve-sandbox-escape', os.O_WRONLY | os.O_CREAT)",
        "import shutil; shutil.rmtree('/tmp/does-not-matter')",
        "import ctypes; ctypes.CDLL('libc.so.6')",
    ],
)
def test_dangerous_actions_are_refused(tmp_path: Path, body: str) -> None:
    assert "REFUSED" in _in_sandbox(tmp_path, body)
    assert not Path("/tmp/optiserve-sandbox-escape").exists()


def test_work_folder_writes_and_plain_pickles_are_allowed(tmp_path: Path) -> None:
    body = f"""
    import pickle
    open({str(tmp_path / "work" / "out.bin")!r}, "wb").write(b"x")
    assert pickle.loads(pickle.dumps({{"a": [1, 2.0, "s"]}})) == {{"a": [1, 2.0, "s"]}}
    """
    assert "ALLOWED" in _in_sandbox(tmp_path, body)


def test_the_worker_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTISERVE_ADMIN_TOKEN", "secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    env = worker_env(tmp_path, 2)
    assert "secret" not in env.values()
    assert env["HOME"] == env["TMPDIR"] == str(tmp_path)
    assert env["CUDA_VISIBLE_DEVICES"] == ""
