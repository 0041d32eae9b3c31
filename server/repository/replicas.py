"""Which versions each replica of a fleet serves, so an operator (or a rollout check) can see when replicas
sharing one repository have converged.

Each server in poll mode writes a heartbeat, ``<repository>/.optiserve/replicas/<replica-id>.json``, every
poll interval: its id, the time, its interval and the (model, version, variant) it serves. Files are replaced
atomically (temp file + rename in the same folder), so a reader sees a whole heartbeat or the previous one. A
heartbeat older than a few of its writer's intervals is stale (a replica that died or lost the volume); stale
files are reported, and removed once they are a day old. The hidden ``.optiserve`` folder is never read as a
model (model names start with a letter or digit). Ages compare the writer's clock with the reader's, so the
nodes' clocks must agree (NTP) to well under the stale threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from server.repository.layout import FLEET_FOLDER, NAME_PATTERN

log = logging.getLogger("optiserve.fleet")

REPLICAS_FOLDER = "replicas"
STALE_INTERVALS = 3
MIN_STALE_S = 10.0
"""A heartbeat is stale once older than STALE_INTERVALS of its writer's intervals, and never sooner than this
(a loaded machine may write a second late)."""
PRUNE_AFTER_S = 86_400.0
MAX_HEARTBEAT_BYTES = 4 * 1024 * 1024
"""A heartbeat larger than this is not read (it lists served versions: a few hundred bytes per model)."""

Served = tuple[str, int, str]
"""(model, version, variant) of one served version."""


def default_replica_id() -> str:
    """``<hostname>-<pid>``: unique per process on a host, and names the pod in Kubernetes (its hostname)."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname()) or "host"
    return f"{host.lstrip('._-') or 'host'}-{os.getpid()}"[:128]


def check_replica_id(replica_id: str) -> str:
    """A replica id names a file: the model-name pattern keeps it inside the heartbeat folder."""
    if not NAME_PATTERN.fullmatch(replica_id):
        raise ValueError(f"replica id {replica_id!r} must match {NAME_PATTERN.pattern}")
    return replica_id


@dataclass(frozen=True)
class Heartbeat:
    """One replica's last word: who, when, how often it writes, and what it serves."""

    replica: str
    updated: float
    interval_s: float
    ready: bool
    served: tuple[Served, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "updated": self.updated,
            "interval_s": self.interval_s,
            "ready": self.ready,
            "served": [{"name": n, "version": str(v), "variant": variant} for n, v, variant in self.served],
        }

    @classmethod
    def from_json(cls, data: Any) -> Heartbeat:
        """Parse a heartbeat file's JSON; ValueError (or KeyError/TypeError) for anything malformed."""
        served = tuple(sorted((str(s["name"]), int(s["version"]), str(s.get("variant", ""))) for s in data["served"]))
        return cls(
            replica=check_replica_id(str(data["replica"])),
            updated=float(data["updated"]),
            interval_s=float(data["interval_s"]),
            ready=bool(data["ready"]),
            served=served,
        )

    def stale_after_s(self) -> float:
        return max(STALE_INTERVALS * self.interval_s, MIN_STALE_S)


class Fleet:
    """This replica's heartbeat (written in poll mode) and the fleet's view read from every heartbeat."""

    def __init__(
        self,
        repository_root: Path,
        replica_id: str,
        interval_s: float,
        served: Callable[[], list[Served]],
        ready: Callable[[], bool],
        *,
        heartbeats: bool,
    ) -> None:
        self.folder = repository_root / FLEET_FOLDER / REPLICAS_FOLDER
        self.replica_id = check_replica_id(replica_id)
        self.interval_s = interval_s
        self.heartbeats = heartbeats
        self._served = served
        self._ready = ready
        self._warned = False

    @property
    def path(self) -> Path:
        """This replica's heartbeat file."""
        return self.folder / f"{self.replica_id}.json"

    def current(self) -> Heartbeat:
        """This replica's state now."""
        served = tuple(sorted(self._served()))
        return Heartbeat(self.replica_id, time.time(), self.interval_s, self._ready(), served)

    # ---- writing ----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Write the heartbeat every interval until ``stop``; then remove it (a clean exit is not stale)."""
        try:
            while not stop.is_set():
                await asyncio.to_thread(self.beat)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
        finally:
            await asyncio.to_thread(self.leave)

    def beat(self) -> None:
        """Write this replica's heartbeat atomically and prune day-old ones. A repository this server cannot
        write (read-only volume) is logged once; serving goes on."""
        heartbeat = self.current()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path, json.dumps(heartbeat.to_json(), sort_keys=True).encode())
            self._prune(heartbeat.updated)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the replica heartbeat %s: %s", self.path, exc)
                self._warned = True

    def leave(self) -> None:
        """Remove this replica's heartbeat (graceful shutdown)."""
        if self.heartbeats:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

    def _prune(self, now: float) -> None:
        """Heartbeats (and temp files of a crashed write) untouched for a day: replicas long gone."""
        for path in self.folder.iterdir():
            with contextlib.suppress(OSError):
                if path.is_file() and now - path.stat().st_mtime > PRUNE_AFTER_S:
                    path.unlink()

    # ---- reading ----------------------------------------------------------------------------------
    def heartbeats_on_disk(self) -> list[Heartbeat]:
        """Every readable heartbeat of other replicas (a torn or foreign file is skipped)."""
        found: list[Heartbeat] = []
        try:
            paths = sorted(self.folder.glob("*.json"))
        except OSError:
            return found
        for path in paths:
            heartbeat = _read(path)
            if heartbeat is not None and heartbeat.replica != self.replica_id and path.stem == heartbeat.replica:
                found.append(heartbeat)
        return found

    def status(self) -> dict[str, Any]:
        """The fleet as this replica sees it: every replica (itself first) with what it serves, live or stale,
        and whether every live replica serves the same (model, version) set."""
        now = time.time()
        rows = [(self.current(), True)] + [(h, False) for h in self.heartbeats_on_disk()]
        replicas = [_row(h, now, own) for h, own in rows]
        live = [h for (h, _), row in zip(rows, replicas, strict=True) if row["state"] == "live"]
        return {
            "replica": self.replica_id,
            "heartbeats": self.heartbeats,
            "converged": _converged(live),
            "live": len(live),
            "stale": len(replicas) - len(live),
            "replicas": replicas,
        }

    def metric_families(self) -> list[Metric]:
        """Scrape-time gauges: replicas by state, whether the live ones converged, and this replica's id."""
        status = self.status()
        replicas = GaugeMetricFamily(
            "optiserve_fleet_replicas",
            "Replicas with a heartbeat in the shared repository, by state (live, stale), as this replica sees them.",
            labels=["state"],
        )
        replicas.add_metric(["live"], float(status["live"]))
        replicas.add_metric(["stale"], float(status["stale"]))
        converged = GaugeMetricFamily(
            "optiserve_fleet_converged", "1 when every live replica serves the same model versions, else 0."
        )
        converged.add_metric([], 1.0 if status["converged"] else 0.0)
        info = InfoMetricFamily("optiserve_replica", "This server's replica id (its heartbeat file's name).")
        info.add_metric([], {"replica": self.replica_id})
        return [replicas, converged, info]


def _row(heartbeat: Heartbeat, now: float, own: bool) -> dict[str, Any]:
    age = max(0.0, now - heartbeat.updated)
    stale = not own and age > heartbeat.stale_after_s()
    data = heartbeat.to_json()
    return {
        "replica": heartbeat.replica,
        "self": own,
        "state": "stale" if stale else "live",
        "ready": heartbeat.ready,
        "age_s": round(age, 3),
        "updated": datetime.fromtimestamp(heartbeat.updated, UTC).isoformat(timespec="milliseconds"),
        "served": data["served"],
    }


def _converged(live: list[Heartbeat]) -> bool:
    """Every live replica serves the same (model, version) set (variants may differ while one optimizes)."""
    sets = {frozenset((name, version) for name, version, _ in h.served) for h in live}
    return len(sets) <= 1


def _read(path: Path) -> Heartbeat | None:
    try:
        if path.stat().st_size > MAX_HEARTBEAT_BYTES:
            return None
        return Heartbeat.from_json(json.loads(path.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), 0o644)  # readable by operators and by replicas running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
