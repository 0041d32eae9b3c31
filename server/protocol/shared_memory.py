"""Triton's system shared-memory extension: regions a client registers (a POSIX shm segment, an offset and a
size) and then names in an inference request instead of sending tensor bytes.

One registry per server, built by the composition root and handed to both edges. It is off unless the server
runs with --allow-client-shm: a registered segment is memory another process of this user can read and write.
Keys are checked to be plain POSIX shm names and opened under /dev/shm only (no symlinks); the registry maps
them, never creates or unlinks them, and closes every mapping on unregister and at shutdown.

Inputs are copied out of the region once when the request is decoded, so a client that rewrites or unregisters
the region while the request is queued cannot change or tear what the model reads; outputs are written into it
when the response is encoded.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import InvalidInput

EXTENSION = "system_shared_memory"
REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
SHM_ROOT = Path("/dev/shm")
ENABLE_HINT = "start the server with --allow-client-shm (OPTISERVE_ALLOW_CLIENT_SHM=true) to allow it"

# A POSIX shm name: one leading '/', then plain characters only (no further '/', never '.' or '..').
_KEY = re.compile(r"/[A-Za-z0-9_.\-]{1,200}")
_NAME = re.compile(r"[^\x00-\x1f/]{1,200}")


@dataclass(frozen=True)
class SharedMemoryRef:
    """Where a request's tensor lives: ``byte_size`` bytes at ``offset`` into a registered region."""

    region: str
    offset: int
    byte_size: int

    def parameters(self) -> dict[str, Any]:
        """The parameters a response carries for an output written to shared memory (Triton's shape)."""
        params: dict[str, Any] = {REGION: self.region, BYTE_SIZE: self.byte_size}
        if self.offset:
            params[OFFSET] = self.offset
        return params


def reference(params: Mapping[str, Any], field: str) -> SharedMemoryRef | None:
    """The shared-memory reference in a tensor's parameters, or None if it has none; 400 naming the field."""
    region = params.get(REGION)
    if region is None:
        if BYTE_SIZE in params or OFFSET in params:
            raise InvalidInput(f"{field}: {BYTE_SIZE}/{OFFSET} given without {REGION}")
        return None
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{field}: {REGION} must be a non-empty string")
    return SharedMemoryRef(region, _uint(params.get(OFFSET, 0), f"{field}: {OFFSET}"), _size(params, field))


def _size(params: Mapping[str, Any], field: str) -> int:
    if BYTE_SIZE not in params:
        raise InvalidInput(f"{field}: {BYTE_SIZE} is required with {REGION}")
    return _uint(params[BYTE_SIZE], f"{field}: {BYTE_SIZE}")


def _uint(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{field} must be a non-negative integer, got {value!r}")
    return value


class _Region:
    """One registered region: the mapped segment and the window of it the client registered."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self.mapping = mapping

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def window(self, ref: SharedMemoryRef, field: str) -> tuple[int, int]:
        """Absolute [start, end) in the segment of ``ref``, which must lie inside the registered window."""
        if ref.offset + ref.byte_size > self.byte_size:
            raise InvalidInput(
                f"{field}: {OFFSET} {ref.offset} + {BYTE_SIZE} {ref.byte_size} runs past the "
                f"{self.byte_size} bytes of shared memory region {self.name!r}"
            )
        start = self.offset + ref.offset
        return start, start + ref.byte_size


class SharedMemoryRegistry:
    """The registered system shared-memory regions of one server (thread-safe)."""

    def __init__(self, enabled: bool, max_regions: int = 64, root: Path = SHM_ROOT) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.root = root
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the POSIX shm segment ``key`` as region ``name``."""
        if not self.enabled:
            raise InvalidInput(f"system shared memory is disabled on this server; {ENABLE_HINT}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInput(f"name: {name!r} is not a valid region name (1-200 printable characters, no '/')")
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key in ("/.", "/.."):
            raise InvalidInput(f"key: {key!r} is not a POSIX shared memory name ('/' then letters, digits, '._-')")
        offset = _uint(offset, "offset")
        byte_size = _uint(byte_size, "byte_size")
        if byte_size == 0:
            raise InvalidInput("byte_size: must be greater than 0")
        with self._lock:
            if name in self._regions:
                raise InvalidInput(f"name: shared memory region {name!r} is already registered")
            if len(self._regions) >= self.max_regions:
                raise InvalidInput(
                    f"name: {len(self._regions)} shared memory regions are registered, the limit "
                    f"(--max-shm-regions) is {self.max_regions}; unregister one first"
                )
            mapping = self._map(key, offset, byte_size)
            self._regions[name] = _Region(name, key, offset, byte_size, mapping)

    def _map(self, key: str, offset: int, byte_size: int) -> mmap.mmap:
        path = self.root / key[1:]
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidInput(f"key: cannot open shared memory {key!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"key: {key!r} is not a shared memory segment")
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"byte_size: offset {offset} + byte_size {byte_size} runs past the {info.st_size} bytes "
                    f"of shared memory {key!r}"
                )
            return mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def unregister(self, name: str = "") -> None:
        """Unregister one region (a name that is not registered is a no-op, as in Triton) or, with no name,
        all of them. The client's segment stays: it is unmapped here, never unlinked."""
        with self._lock:
            names = [name] if name else list(self._regions)
            regions = [self._regions.pop(n) for n in names if n in self._regions]
        for region in regions:
            region.mapping.close()

    def close(self) -> None:
        """Shutdown: unmap every region."""
        self.unregister()

    def status(self, name: str = "") -> list[dict[str, Any]]:
        """Triton's status: one entry per region (only ``name``'s if given; 400 if it is not registered)."""
        with self._lock:
            if not name:
                return [region.status() for region in self._regions.values()]
            return [self._get(name, "name").status()]

    def _get(self, name: str, field: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{field}: shared memory region {name!r} is not registered")
        return region

    def read(self, ref: SharedMemoryRef, field: str) -> bytes:
        """A copy of the bytes ``ref`` names (one copy, taken now)."""
        with self._lock:
            region = self._get(ref.region, f"{field}: {REGION}")
            start, end = region.window(ref, field)
            return region.mapping[start:end]

    def write(self, ref: SharedMemoryRef, data: bytes, field: str) -> None:
        """Write an output's bytes at ``ref``; they must fit its byte_size (a larger window is fine)."""
        if len(data) > ref.byte_size:
            raise InvalidInput(f"{field}: the output is {len(data)} bytes, more than its {BYTE_SIZE} {ref.byte_size}")
        with self._lock:
            region = self._get(ref.region, f"{field}: {REGION}")
            start, _ = region.window(ref, field)
            region.mapping[start : start + len(data)] = data

    def check(self, ref: SharedMemoryRef, field: str) -> None:
        """Fail early (at decode) if an output's region is unknown or its window does not fit."""
        with self._lock:
            self._get(ref.region, f"{field}: {REGION}").window(ref, field)
