"""Which models are in memory: the memory budget (room made for a load by unloading idle models, least recently
used first) and on-demand loading (a model loads on its first request). Kept apart from the manager, which keeps
the lifecycle (load, swap, unload) and calls in here around a build and when a request finds no model loaded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from server.errors import ModelNotFound, ServerError, ServerUnavailable
from server.metrics import ServerMetrics
from server.models.background import BackgroundOptimizer, Retire
from server.models.budget import MIB, MemoryBudget, NeverFits, NoRoomYet, Resident
from server.models.ensemble import EnsembleVersion
from server.models.entry import ModelEntry, ModelState, VersionStatus
from server.models.memory import estimate, files_bytes, release_freed_memory
from server.models.version import ModelVersion
from server.repository.config import LoadedConfig, ModelConfig, read_config
from server.repository.layout import Repository, select_versions
from server.settings import Settings, parse_budget

if TYPE_CHECKING:
    from server.models.manager import LoadTrigger

log = logging.getLogger("optiserve.models")
ConfigOf = Callable[[str, str | None], LoadedConfig]
"""The manager's reading of a model's config (an upload's text, else the repository's file)."""
LoadOnDemand = Callable[[str], Awaitable[object]]
"""The manager's load of a model for a request (trigger on_demand)."""


class Residency:
    """The memory budget and on-demand loading of one server's models. Reads the manager's entries, and unloads
    (evicts) and loads them through the manager's collaborators it is given."""

    def __init__(
        self,
        entries: dict[str, ModelEntry],
        repository: Repository,
        settings: Settings,
        metrics: ServerMetrics | None,
        background: BackgroundOptimizer,
        *,
        retire: Retire,
        config_of: ConfigOf,
        load_on_demand: LoadOnDemand,
    ) -> None:
        self._entries = entries
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.background = background
        self._retire = retire
        self._config_of = config_of
        self._load = load_on_demand
        self.budget = MemoryBudget(parse_budget(settings.model_memory_budget), settings.model_min_residency_s)

    def memory_used(self) -> int:
        """Bytes every loaded version holds, as the budget counts them."""
        return sum(v.memory_bytes for entry in list(self._entries.values()) for v in list(entry.served.values()))

    # ---- on-demand loading ----------------------------------------------------------------------
    def loads_on_demand(self, name: str) -> bool:
        """Whether a request may load this model now (the manager also checks it is not draining): on-demand
        loading is on, and the model is in the repository but serves nothing."""
        if not self.settings.load_on_demand:
            return False
        entry = self._entries.get(name)
        if entry is not None and entry.served:
            return False  # loaded: a missing version is the request's error, not a reason to load
        try:
            return name in self.repository.model_names()
        except ServerError:
            return False

    async def load_for_request(self, entry: ModelEntry, timeout_s: float | None) -> None:
        """Load a model a request needs, waiting up to ``timeout_s`` (else --load-wait-s) and sharing one load
        with every other request that came for it meanwhile. A model whose last load failed is not retried
        until its folder changes."""
        name = entry.name
        if entry.failed is not None:
            current = await asyncio.to_thread(self.repository.fingerprint, name)
            if current == entry.failed:
                raise ModelNotFound(f"model {name!r} is not loaded ({entry.model_status.reason})")
        if entry.on_demand is None or entry.on_demand.done():
            entry.on_demand = asyncio.get_running_loop().create_task(self._load_on_demand(entry))
        wait = timeout_s if timeout_s is not None else self.settings.load_wait_s
        try:
            await asyncio.wait_for(asyncio.shield(entry.on_demand), wait)
        except TimeoutError:
            raise ServerUnavailable(
                f"model {name!r} is loading on demand and was not ready within {wait:g}s", retry_after_s=1
            ) from None
        except (NoRoomYet, NeverFits):
            raise
        except ServerError as exc:
            raise ModelNotFound(f"model {name!r} could not be loaded on demand: {exc.message}") from None

    async def _load_on_demand(self, entry: ModelEntry) -> None:
        async with entry.lock:  # a load already under way (an upload, a poll) finishes first
            loaded = bool(entry.served)
        if not loaded:
            await self._load(entry.name)

    def pinned_on_disk(self, name: str) -> bool:
        """Whether the model's config on disk pins it (with on-demand loading, it loads at start)."""
        try:
            return is_pinned(read_config(self.repository.model_dir(name)).config)
        except ServerError:
            return True  # a config that cannot be read: load it now, so the index shows why

    # ---- memory budget -------------------------------------------------------------------------
    async def make_room(self, name: str, config_text: str | None, trigger: LoadTrigger) -> int | None:
        """With a budget: unload idle models until this load's estimated cost fits, and hold that room for it
        (a ticket for MemoryBudget.release)."""
        if not self.budget.enabled:
            return None
        need = await asyncio.to_thread(self._estimate, name, config_text)
        snapshot, deadline = self._room_rules(trigger)
        return await self.budget.reserve(name, need, snapshot, self._evict, deadline)

    async def fit_measured(
        self, name: str, built: dict[int, ModelVersion], ticket: int | None, trigger: LoadTrigger
    ) -> None:
        """Replace the estimate by what the new versions measured; if they need more room than was held and
        it cannot be made, they are released and the load fails (what served before keeps serving)."""
        for version in built.values():
            self.budget.remember(name, version.version, _files(version), version.memory_bytes)
        if ticket is None:
            return
        measured = sum(v.memory_bytes for v in built.values())
        snapshot, deadline = self._room_rules(trigger)
        try:
            await self.budget.adjust(ticket, name, measured, snapshot, self._evict, deadline)
        except BaseException:
            await asyncio.to_thread(close_all, built)
            raise

    def _room_rules(self, trigger: LoadTrigger) -> tuple[Callable[[], list[Resident]], float]:
        """Who may be unloaded for a load, and until when it waits for room: start-up fills the budget without
        waiting and models loaded at start never evict each other; other loads wait up to --load-wait-s."""
        if trigger == "startup":
            return (lambda: [dataclasses.replace(r, busy=True) for r in self._residents()]), time.monotonic()
        return self._residents, time.monotonic() + self.settings.load_wait_s

    def _estimate(self, name: str, config_text: str | None) -> int:
        """Bytes the versions this load will serve are expected to hold: what they measured when last loaded
        here, else a multiple of their files (server/models/memory.py). 0 when the config cannot be read (the
        build reports why)."""
        try:
            loaded = self._config_of(name, config_text)
            versions = select_versions(loaded.config.version_policy, self.repository.versions(name))
        except ServerError:
            return 0
        instances = max(1, sum(group.count or 1 for group in loaded.config.instance_group))
        total = 0
        for version in versions:
            file_bytes = files_bytes(self.repository.version_dir(name, version))
            known = self.budget.known_cost(name, version, file_bytes)
            total += known if known is not None else estimate(file_bytes, instances)
        return total

    def _residents(self) -> list[Resident]:
        """The budget's view of every loaded model. Members of a loaded ensemble count as busy: the ensemble
        looks them up per request."""
        members = {
            step.model_name
            for entry in self._entries.values()
            for version in entry.served.values()
            if isinstance(version, EnsembleVersion)
            for step in version.steps
        }
        rows = []
        for entry in list(self._entries.values()):
            versions = list(entry.served.values())
            if not versions:
                continue
            busy = entry.lock.locked() or entry.name in members or _in_use(versions)
            rows.append(
                Resident(
                    entry.name,
                    sum(v.memory_bytes for v in versions),
                    entry.last_used,
                    entry.loaded_at,
                    pinned=entry.pinned,
                    busy=busy,
                )
            )
        return rows

    async def _evict(self, name: str) -> bool:
        """Unload an idle model for the budget; False (and nothing changes) if it became busy meanwhile."""
        entry = self._entries.get(name)
        if entry is None or not entry.served or entry.lock.locked():
            return False
        async with entry.lock:  # free: taken at once, no request can look it up in between
            old = entry.served
            if _in_use(old.values()):
                return False
            freed, idle_s = sum(v.memory_bytes for v in old.values()), time.monotonic() - entry.last_used
            entry.served, entry.wanted = {}, False
            self.background.cancel(name)
            reason = "evicted for the memory budget"
            if self.settings.load_on_demand:
                reason += "; loads on its next request"
            for version in old:
                entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, reason)
            entry.model_status = VersionStatus(ModelState.UNAVAILABLE, reason)
        await self._retire(old)
        await asyncio.to_thread(release_freed_memory)
        if self.metrics is not None and self.metrics.enabled:
            self.metrics.evictions.labels(name).inc()
        log.info("model %s evicted for the memory budget: %.1f MiB freed, idle for %.1fs", name, freed / MIB, idle_s)
        return True


def is_pinned(config: ModelConfig) -> bool:
    """A config's ``parameters { key: "pinned" value { string_value: "true" } }``: never unloaded for the memory
    budget (a Triton-valid way to say it: Triton's config has no field for this)."""
    parameter = config.parameters.get("pinned")
    return parameter is not None and parameter.string_value.strip().lower() in ("true", "1", "yes")


def close_all(versions: dict[int, ModelVersion]) -> None:
    """Release versions built for a load nobody waits for any more."""
    for version in versions.values():
        version.close(0)


def _in_use(versions: Iterable[ModelVersion]) -> bool:
    """Requests queued, running, or looked up and on their way to the queue."""
    return any(v.in_flight or v.batcher.pending for v in versions)


def _files(version: ModelVersion) -> int:
    return int(version.report.get("memory", {}).get("files_bytes", 0))
