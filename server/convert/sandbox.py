"""Defence in depth for the converter worker, a separate process that loads untrusted framework files
after they passed the static checks. It gets a scrubbed environment (no tokens, no GPUs) and a private
folder as cwd, HOME and TMPDIR; and, once the frameworks are imported, a Python audit hook that aborts
unpickling of anything that names a global, process spawning, sockets, ``ctypes`` library loading, and
file writes outside its folder. The hook cannot see native code: the static checks are the first line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

BLOCKED_EVENTS = frozenset(
    [
        "pickle.find_class",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "subprocess.Popen",
        "pty.spawn",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "ctypes.dlopen",
        "webbrowser.open",
        "urllib.Request",
        "os.kill",
        "os.killpg",
    ]
)
PATH_EVENTS = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.replace": (0, 1),
    "os.symlink": (0, 1),
    "os.link": (0, 1),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.copytree": (1,),
    "shutil.move": (0, 1),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_KEEP_ENV = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "VIRTUAL_ENV")


class SandboxViolation(PermissionError):
    """Raised from the audit hook: the worker tried something a conversion never needs."""


def worker_env(work_dir: Path, threads: int) -> dict[str, str]:
    """The worker's environment: a few harmless variables of ours, nothing else (no tokens, no GPUs)."""
    env = {key: os.environ[key] for key in _KEEP_ENV if key in os.environ}
    work_dir = Path(os.path.abspath(work_dir))  # HOME and TMPDIR are read from the worker's own cwd
    root = str(Path(__file__).resolve().parents[2])
    env.update(
        HOME=str(work_dir),
        TMPDIR=str(work_dir),
        PYTHONPATH=root,
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONNOUSERSITE="1",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        TF_ENABLE_ONEDNN_OPTS="0",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
    )
    return env


def install(work_dir: Path) -> None:
    """Install the audit hook (for the rest of this process: hooks cannot be removed)."""
    allowed = (str(work_dir.resolve()), os.devnull)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in BLOCKED_EVENTS:
            raise SandboxViolation(f"the converter sandbox refuses {event}{_describe(args)}")
        if event == "open" and len(args) >= 3 and _is_write(args[1], args[2]):
            _check_path(event, args[0], allowed)
        elif event in PATH_EVENTS:
            for index in PATH_EVENTS[event]:
                if index < len(args):
                    _check_path(event, args[index], allowed)

    sys.addaudithook(hook)


def _is_write(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str):
        return any(char in mode for char in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _check_path(event: str, path: Any, allowed: tuple[str, ...]) -> None:
    if isinstance(path, int):
        return  # an open file descriptor (opening it was checked)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return
    resolved = os.path.realpath(os.fspath(path))
    if not any(resolved == root or resolved.startswith(root + os.sep) for root in allowed):
        raise SandboxViolation(f"the converter sandbox refuses {event} on {resolved!r} (outside its folder)")


def _describe(args: tuple[Any, ...]) -> str:
    text = ", ".join(repr(a)[:80] for a in args[:2])
    return f" ({text})" if text else ""
