"""On-disk cache of pass artifacts and whole pipeline results, keyed by content (never by name), written
atomically (temp file in the same folder + fsync + os.replace) and kept under a size cap (least recently
used first). A crash leaves either a complete entry or none.

Several servers may share one cache folder (replicas on one volume): a whole pipeline run is built under a
lock per result key (:meth:`Cache.build_lock`, an ``fcntl.flock`` on ``results/<key>.lock``), so one server
optimizes a model and the others wait and then read its result. The kernel releases a flock when its holder
dies, so a server killed mid-build never blocks the others."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("optiserve.optimizers")

STALE_TMP_S = 3600.0


def cache_key(**parts: Any) -> str:
    """sha256 of the parts as canonical JSON: any change in input, config, device or versions is a new key."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_move(source: Path, path: Path) -> None:
    """Move a finished file (same filesystem) into place after flushing it to disk."""
    with source.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(source, path)


class Cache:
    """``root/artifacts/<key>.onnx`` + ``<key>.json`` (the JSON is written last: it marks the entry
    complete) and ``root/results/<key>.json``. Safe for threads of one process; entries written by other
    processes are read, and at worst one process recomputes what another evicted."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        # Absolute once: the cache paths reach engine options (TensorRT's cache folders) that must not depend
        # on the folder a later step runs in.
        root = Path(os.path.abspath(os.path.expanduser(root)))
        self.root = root
        self.max_bytes = max_bytes
        self.artifacts = root / "artifacts"
        self.results = root / "results"
        self.tmp = root / "tmp"
        for folder in (self.artifacts, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._clean_stale_tmp()

    # ---- artifacts ------------------------------------------------------------------------------
    def artifact_path(self, key: str) -> Path:
        """Where the model of artifact ``key`` lives (whether or not it exists yet)."""
        return self.artifacts / f"{key}.onnx"

    def get_artifact(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """(model path, metadata) of a complete entry, marking it recently used; None on a miss."""
        meta = self._read_json(self.artifacts / f"{key}.json")
        model = self.artifact_path(key)
        if meta is None or not model.is_file():
            return None
        self._touch(model, self.artifacts / f"{key}.json")
        return model, meta

    def put_artifact(self, key: str, model: Path, meta: dict[str, Any]) -> Path:
        """Move a finished model (written under :meth:`work_dir`) into the cache, then its metadata."""
        target = self.artifact_path(key)
        with self._lock:
            atomic_move(model, target)
            atomic_write_bytes(self.artifacts / f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        return target

    # ---- pipeline results -----------------------------------------------------------------------
    def get_result(self, key: str) -> dict[str, Any] | None:
        """A stored pipeline result, marking it recently used."""
        path = self.results / f"{key}.json"
        data = self._read_json(path)
        if data is not None:
            self._touch(path)
        return data

    def put_result(self, key: str, data: dict[str, Any]) -> None:
        """Store a pipeline result."""
        with self._lock:
            atomic_write_bytes(self.results / f"{key}.json", json.dumps(data, sort_keys=True).encode())

    @contextlib.contextmanager
    def build_lock(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
        """Hold the build lock of result ``key`` (blocking: call it from a worker thread); yields whether
        another holder made this one wait, in which case the result is probably stored now. ``on_wait`` is
        called once when the lock is found taken. Works across threads and processes (each open file is its own
        flock), and across hosts on a filesystem with working locks (NFSv4, CephFS, EFS)."""
        path = self.results / f"{key}.lock"
        fd, waited = _acquire(path, on_wait)
        try:
            yield waited
        finally:
            # Unlinked while still held, so the folder keeps no lock files; a waiter that opened the old file
            # notices the unlink (:func:`_acquire` compares inodes) and locks a fresh one.
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)

    # ---- housekeeping ---------------------------------------------------------------------------
    def work_dir(self) -> Path:
        """A fresh scratch folder on the cache's filesystem (so finished files move in atomically)."""
        return Path(tempfile.mkdtemp(dir=self.tmp))

    def size_bytes(self) -> int:
        """Bytes held by artifacts and results (scratch folders and TensorRT engine caches not counted)."""
        return sum(_size(path) for path in self._entries())

    def evict(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Delete least recently used files until the cache fits ``max_bytes``; ``keep`` is never deleted.
        An artifact's metadata goes first, so a half-evicted entry reads as a miss."""
        if self.max_bytes is None:
            return []
        kept = {path.resolve() for path in keep}
        removed: list[Path] = []
        with self._lock:
            files = sorted(self._entries(), key=_mtime)
            total = sum(_size(path) for path in files)
            for path in files:
                if total <= self.max_bytes:
                    break
                if path.resolve() in kept or (path.suffix == ".json" and path.with_suffix(".onnx").resolve() in kept):
                    continue
                group = (
                    [path.with_suffix(".json"), path.with_suffix(".onnx")] if path.parent == self.artifacts else [path]
                )
                for item in group:
                    if item.exists():
                        total -= _size(item)
                        item.unlink(missing_ok=True)
                        removed.append(item)
        if removed:
            log.info("cache: evicted %d file(s) to stay under %d bytes", len(removed), self.max_bytes)
        return removed

    def _entries(self) -> list[Path]:
        return [
            p for folder in (self.artifacts, self.results) for p in folder.iterdir() if p.suffix in (".json", ".onnx")
        ]

    def _clean_stale_tmp(self) -> None:
        """Scratch left by a crashed run (older than an hour, so a live run in another process is spared)."""
        now = time.time()
        for item in self.tmp.iterdir():
            if now - _mtime(item) > STALE_TMP_S:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _touch(*paths: Path) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                os.utime(path)


def _acquire(path: Path, on_wait: Callable[[], None] | None) -> tuple[int, bool]:
    """An open descriptor of ``path`` holding its flock, and whether it had to wait. The lock counts only if
    ``path`` still names the locked file once it is held: its previous holder unlinks it before releasing."""
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd, waited
        except FileNotFoundError:  # unlinked by the holder we waited for: lock a fresh file
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
