"""Real requests as the background optimizer's reference: which versions sample their inputs, the bounded wait
for enough samples, and the samples file the pipeline then reads (written atomically in the cache folder, read
once, deleted after the run). Generated inputs remain the fallback, and the report's ``traffic`` says why."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizers.reference import TRAFFIC_SUFFIX, find_samples
from server.models.loader import PendingOptimization
from server.models.reservoir import Reservoir, ReservoirLimits, unsupported, write_samples
from server.models.version import ModelVersion
from server.settings import Settings

log = logging.getLogger("optiserve.models")
POLL_S = 0.1
FOLDER = "traffic"
STALE_S = 24 * 3600.0
"""A samples file this old was left by a server that stopped during a run (a running one deletes its own)."""


@dataclass
class TrafficSamples:
    """What the wait produced: the samples file (None: the optimizer generates its inputs) and the report's
    ``traffic`` entry."""

    path: Path | None
    facts: dict[str, Any] = field(default_factory=dict)

    def source_for(self, source: PendingOptimization) -> PendingOptimization:
        """``source`` with these samples as the optimizer's validation and calibration set."""
        options = source.options.model_copy(update={"samples_path": self.path})
        return dataclasses.replace(source, options=options)

    def refused(self, reason: str) -> None:
        """The optimizer could not use the samples (it ran on generated inputs instead)."""
        self.facts = {**self.facts, "used": False, "reason": reason}

    def discard(self) -> None:
        """Delete the samples file: requests' data is kept no longer than the run that needs it."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class TrafficSampling:
    """The server's policy for traffic references (``--optimize-from-traffic`` and its limits)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = ReservoirLimits(settings.optimize_traffic_max_samples, settings.optimize_traffic_max_bytes)
        self._sweep(settings.cache_dir / FOLDER)

    @staticmethod
    def _sweep(folder: Path) -> None:
        """Delete samples files left by a crash (servers sharing the cache folder keep their fresh ones)."""
        now = time.time()
        for path in folder.glob(f"*{TRAFFIC_SUFFIX}") if folder.is_dir() else ():
            try:
                if now - path.stat().st_mtime > STALE_S:
                    path.unlink()
            except OSError:  # another server swept it first
                continue

    def attach(self, served: ModelVersion, source: PendingOptimization) -> None:
        """Start sampling a version that serves its original model, unless traffic is not to be its reference."""
        if self.why_not(served, source) is None:
            served.reservoir = Reservoir([spec.name for spec in served.inputs], served.max_batch_size > 0, self.limits)

    def why_not(self, served: ModelVersion, source: PendingOptimization) -> str | None:
        """Why a version's requests are not sampled, or None when they are."""
        if not self.settings.optimize_from_traffic:
            return "off for every model (--no-optimize-from-traffic)"
        if not source.options.from_traffic:
            return "off for this model (optimize.from_traffic: false)"
        if find_samples(source.model_path, source.options.samples_path) is not None:
            return "the user's samples file beside the model is the reference"
        return unsupported(served.inputs)

    async def collect(
        self, served: ModelVersion, source: PendingOptimization, deadline: float, progress: Callable[[str], None]
    ) -> TrafficSamples:
        """Wait until the version's reservoir holds enough samples or ``deadline`` (monotonic) passes, then stop
        sampling and write what it holds for the optimizer."""
        reservoir = served.reservoir
        if reservoir is None:
            return TrafficSamples(None, {"used": False, "reason": self.why_not(served, source) or "not sampled"})
        began, shown = time.monotonic(), -1
        while not self._enough(reservoir) and not reservoir.reason and time.monotonic() < deadline:
            if reservoir.count != shown:
                shown = reservoir.count
                progress(f"waiting for request samples ({shown}/{self._needed(reservoir)})")
            await asyncio.sleep(POLL_S)
        served.reservoir = None
        facts: dict[str, Any] = {
            "samples": reservoir.count,
            "seen": reservoir.seen,
            "skipped": reservoir.skipped,
            "waited_s": round(time.monotonic() - began, 2),
        }
        enough, needed = self._enough(reservoir), self._needed(reservoir)
        arrays = reservoir.take()
        if reservoir.reason or not enough:
            why = reservoir.reason or (
                f"{facts['samples']} of {needed} request samples within "
                f"{self.settings.optimize_traffic_wait_s:g} s (--optimize-traffic-wait-s)"
            )
            return TrafficSamples(None, {**facts, "used": False, "reason": why + ": generated inputs instead"})
        folder = self.settings.cache_dir / FOLDER
        stem = f"{served.name}-{served.version}-{uuid.uuid4().hex[:12]}"
        try:
            path = await asyncio.to_thread(write_samples, arrays, folder, stem)
        except OSError as exc:  # a full or read-only cache folder: optimize anyway, on generated inputs
            log.warning("model %s version %s: request samples not written: %s", served.name, served.version, exc)
            return TrafficSamples(None, {**facts, "used": False, "reason": f"not written to {folder}: {exc}"})
        return TrafficSamples(path, {**facts, "used": True})

    def _needed(self, reservoir: Reservoir) -> int:
        """The minimum sample count, or all the reservoir can hold when its byte cap keeps fewer."""
        return max(1, min(self.settings.optimize_traffic_min_samples, reservoir.capacity))

    def _enough(self, reservoir: Reservoir) -> bool:
        return reservoir.count >= self._needed(reservoir)
