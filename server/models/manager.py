"""Loaded models: one :class:`ModelVersion` per served version (backends + batcher + stats), and the
:class:`ModelManager` that loads, swaps and unloads them and reports their states."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Literal, Protocol

from server.errors import InvalidInput, LoadFailed, ModelNotFound, ModelNotReady, ServerError, ServerUnavailable
from server.metrics import Metric, ServerMetrics, memory_families, state_families
from server.models.background import BackgroundOptimizer
from server.models.budget import MIB, MemoryBudget, NeverFits, NoRoomYet, Resident
from server.models.ensemble import EnsembleVersion, MemberTensors, build_ensemble, is_ensemble, parse_steps
from server.models.entry import ModelEntry, ModelState, VersionStatus
from server.models.loader import VersionLoader
from server.models.memory import estimate, files_bytes, prime_onnxruntime, release_freed_memory
from server.models.response_cache import ResponseCache
from server.models.stats import ModelStats
from server.models.threads import in_daemon_thread
from server.models.version import ModelVersion
from server.protocol.numbers import parse_uint
from server.repository.config import LoadedConfig, ModelConfig, read_config
from server.repository.layout import Repository, select_versions
from server.settings import Settings, parse_budget

log = logging.getLogger("optiserve.models")
NOT_LOADED_YET = "not loaded; loads on its first request (--load-on-demand)"
LoadTrigger = Literal["startup", "explicit", "poll", "on_demand"]
"""What started a load (optiserve_model_loads_total{trigger}); uploads are explicit loads."""
_LOADING_ENSEMBLES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("ensembles", default=())


class RepositoryChange(Protocol):
    """Files to publish under a model's lock right before it loads, and to withdraw if that load fails."""

    async def publish(self) -> None: ...

    async def withdraw(self) -> None: ...


class ModelManager:
    """Loads models from the repository, serves them, and swaps versions atomically."""

    def __init__(
        self,
        repository: Repository,
        settings: Settings,
        metrics: ServerMetrics | None = None,
        response_cache: ResponseCache | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        # One response cache for every version of every model (the composition root passes it in).
        self.response_cache = (
            response_cache if response_cache is not None else ResponseCache(settings.response_cache_bytes)
        )
        self.loader = VersionLoader(repository, settings, metrics, self.response_cache)
        self._entries: dict[str, ModelEntry] = {}
        self._draining = False
        self._startup_done = False
        self.background = BackgroundOptimizer(self.loader, settings, metrics, self._retire)
        self.budget = MemoryBudget(parse_budget(settings.model_memory_budget), settings.model_min_residency_s)

    # ---- queries -------------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve a request: a given one, or the highest ready one. The one lookup of an inference
        request. While draining: 503 + Retry-After (another replica can serve), never 404."""
        number = parse_uint(version, "model version") if version else None  # malformed: 400 in every state
        if self._draining:
            raise ServerUnavailable("the server is shutting down; retry on another replica", retry_after_s=1)
        entry = self._entries.get(name)
        if entry is None or (not entry.served and entry.model_status.state is not ModelState.LOADING):
            raise ModelNotFound(f"model {name!r} is not loaded" + self._reason_suffix(entry))
        if not entry.served:
            raise ModelNotReady(f"model {name!r} is still loading", retry_after_s=1)
        entry.last_used = time.monotonic()
        if number is None:
            return entry.served[max(entry.served)]
        served = entry.served.get(number)
        if served is None:
            status = entry.status.get(number)
            if status is not None and status.state is ModelState.LOADING:
                raise ModelNotReady(f"model {name!r} version {version} is still loading", retry_after_s=1)
            raise ModelNotFound(f"model {name!r} has no ready version {version}; ready: {sorted(entry.served)}")
        return served

    @staticmethod
    def _reason_suffix(entry: ModelEntry | None) -> str:
        if entry is not None and entry.model_status.reason:
            return f" ({entry.model_status.reason})"
        return ""

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether a request for this model (version) would be served now; a malformed version is the
        client's error (InvalidInput), not a model that is not ready."""
        try:
            served = self.get(name, version)
        except InvalidInput:
            raise
        except ServerError:
            return False
        return not isinstance(served, EnsembleVersion) or served.members_ready()

    def server_ready(self) -> bool:
        """Ready once start-up loading is done and every model meant to be loaded serves a version
        (Triton's strict readiness), until the drain begins. An explicit unload takes a model out of the count."""
        if self._draining or not self._startup_done:
            return False
        return all(entry.served for entry in list(self._entries.values()) if entry.wanted)

    def metric_families(self) -> list[Metric]:
        """Scrape-time gauges: each version's state, pending requests, and selected variant."""
        states = [(row["name"], row["version"], row["state"]) for row in self.index()]
        pending = [(v.name, str(v.version), v.batcher.pending) for v in self.served_versions()]
        variants = [(v.name, str(v.version), v.variant) for v in self.served_versions()]
        memory = [(v.name, str(v.version), "cpu", v.memory_bytes) for v in self.served_versions()]
        return [
            *state_families(states, pending, variants),
            *memory_families(memory, self.budget.limit, self.memory_used()),
        ]

    def pending(self) -> int:
        """Requests queued or running on every served version."""
        return sum(v.batcher.pending for v in self.served_versions())

    def served_versions(self) -> list[ModelVersion]:
        """Every version currently served, for statistics."""
        # Snapshots: a scrape on the --metrics-port thread may run while the event loop adds a model.
        return [v for entry in list(self._entries.values()) for v in list(entry.served.values())]

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model on disk or known, with its state and reason."""
        names = sorted(set(self.repository.model_names()) | set(list(self._entries)))
        rows: list[dict[str, str]] = []
        for name in names:
            entry = self._entries.get(name)
            if entry is None or not entry.status:
                status = entry.model_status if entry else VersionStatus(ModelState.UNAVAILABLE, "not loaded")
                rows.append({"name": name, "version": "", "state": status.state.value, "reason": status.reason})
                continue
            for version, vstatus in sorted(entry.status.items()):
                row = {"name": name, "version": str(version), "state": vstatus.state.value, "reason": vstatus.reason}
                served = entry.served.get(version)
                if served is not None:  # an optiserve addition to Triton's row (HTTP only; gRPC's message is fixed)
                    row["memory_bytes"] = str(served.memory_bytes)
                rows.append(row)
        return rows

    # ---- changes -------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every model of the repository (concurrently); failures are recorded, not raised."""
        names = self.repository.model_names()
        await asyncio.to_thread(prime_onnxruntime)  # its one-time set-up is nobody's model memory
        if self.settings.load_on_demand:  # the rest load when a request first needs them
            for name in names:
                self._entry(name).model_status = VersionStatus(ModelState.UNAVAILABLE, NOT_LOADED_YET)
            names = [name for name in names if await asyncio.to_thread(self._pinned_on_disk, name)]
        for name in names:
            entry = self._entry(name)
            entry.wanted = True
            # LOADING from now on, before load() first awaits (an ensemble's members, the model's lock): the
            # index must never show a model that has yet to start loading as UNAVAILABLE without a reason.
            entry.model_status = VersionStatus(ModelState.LOADING, "waiting to load")
        results = await asyncio.gather(*(self.load(name, trigger="startup") for name in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("model %s failed to load: %s", name, result)
        self._startup_done = True

    async def load(
        self,
        name: str,
        config_text: str | None = None,
        change: RepositoryChange | None = None,
        *,
        trigger: LoadTrigger = "explicit",
    ) -> list[int]:
        """(Re)load a model from the repository and return the versions now served. The old versions serve
        until the new ones are ready; on failure they keep serving and the index shows the reason.
        ``change`` (an upload) is published under the model's lock first, and withdrawn if the load fails.
        With a memory budget, idle models are unloaded first to make room (server/models/budget.py)."""
        entry = self._entry(name)
        entry.loads_in_flight += 1
        entry.settled.clear()
        try:
            return await self._load(entry, config_text, change, trigger)
        finally:
            entry.loads_in_flight -= 1
            if not entry.loads_in_flight:
                entry.settled.set()

    async def _load(
        self, entry: ModelEntry, config_text: str | None, change: RepositoryChange | None, trigger: LoadTrigger
    ) -> list[int]:
        name = entry.name
        started = time.monotonic()
        try:
            members = await self._ensemble_members(name, config_text, trigger)
        except ServerError as exc:  # a member that cannot load, a bad wiring: the index shows why
            entry.wanted = True
            self._mark_failed(entry, exc.message)
            raise
        async with entry.lock:
            wanted_before = entry.wanted
            if change is not None:
                await change.publish()
            # Taken before reading: whatever changes from here on is seen by the next poll.
            entry.fingerprint = await asyncio.to_thread(self.repository.fingerprint, name)
            entry.wanted = entry.wanted or trigger != "on_demand"  # on-demand models never hold readiness back
            entry.model_status = VersionStatus(ModelState.LOADING, "loading")
            ticket = None
            try:
                ticket = await self._make_room(name, config_text, trigger)
                built = await in_daemon_thread(
                    lambda: self._build_all(name, config_text, entry, members), name=f"load-{name}", orphan=_close_all
                )
                await self._fit_measured(name, built, ticket, trigger)
            except asyncio.CancelledError:
                # The caller went away (a client timeout, shutdown): the build finishes on its own and its
                # result is closed; the model must not stay LOADING, nor an upload stay half-published.
                self._mark_failed(entry, "load cancelled before it finished")
                await asyncio.shield(self._withdraw(entry, change, wanted_before))
                raise
            except ServerError as exc:
                self._mark_failed(entry, exc.message)
                if not isinstance(exc, NoRoomYet):
                    entry.failed = entry.fingerprint
                elif trigger == "startup":  # the budget is full: the model is fine, it waits for a request
                    entry.wanted = False
                await self._withdraw(entry, change, wanted_before)
                raise
            except Exception as exc:
                self._mark_failed(entry, f"load failed: {exc}")
                entry.failed = entry.fingerprint
                await self._withdraw(entry, change, wanted_before)
                raise LoadFailed(f"model {name!r}: {exc}") from exc
            finally:
                if ticket is not None:
                    self.budget.release(ticket)
            old = entry.served
            entry.served = built
            entry.status = {v: _ready_status(built[v]) for v in built}
            entry.model_status = VersionStatus(ModelState.READY)
            entry.failed, entry.pinned = None, any(is_pinned(v.config) for v in built.values())
            entry.loaded_at = entry.last_used = time.monotonic()
            log.info("model %s ready, versions %s", name, sorted(built))
            self.background.start(entry, built, started)
            self._count_load(name, trigger)
        await self._retire(old)
        return sorted(built)

    async def poll(self) -> None:
        """One rescan of the repository (--model-control-mode poll): load models that appeared, reload those
        whose folder changed (a new or removed version, a new config), unload those whose folder is gone. Only
        published folders are seen (uploads are renamed into place whole). A failed reload leaves the serving
        versions serving, as any reload does; it is retried when the folder changes again."""
        names = await asyncio.to_thread(self.repository.model_names)
        on_disk = set(names)
        gone = [
            name
            for name, entry in list(self._entries.items())
            if name not in on_disk and (entry.served or entry.wanted) and not entry.lock.locked()
        ]
        changed: list[str] = []
        for name in names:
            entry = self._entries.get(name)
            if entry is not None and entry.lock.locked():
                continue  # a load or upload is under way; the next poll compares against what it read
            if self.settings.load_on_demand and (entry is None or not entry.served):
                continue  # not loaded: its next request loads what the folder holds then
            current = await asyncio.to_thread(self.repository.fingerprint, name)
            if current is not None and (entry is None or entry.fingerprint != current):
                changed.append(name)
        for name in gone:
            log.info("poll: model %s was removed from the repository; unloading it", name)
        for name in changed:
            log.info("poll: model %s is new or changed in the repository; loading it", name)
        results = await asyncio.gather(
            *(self.unload(name) for name in gone),
            *(self.load(name, trigger="poll") for name in changed),
            return_exceptions=True,
        )
        for name, result in zip([*gone, *changed], results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.warning("poll: model %s: %s", name, result)

    async def unload(self, name: str) -> None:
        """Stop serving a model; its files stay in the repository."""
        entry = self._entries.get(name)
        if entry is None:
            self.repository.model_dir(name)  # 404 for a name that is nowhere
            entry = self._entry(name)
        async with entry.lock:
            old, entry.served = entry.served, {}
            self.background.cancel(name)
            entry.wanted = False
            for version in old:
                entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, "unloaded")
            entry.model_status = VersionStatus(ModelState.UNAVAILABLE, "unloaded")
        await self._retire(old)
        await asyncio.to_thread(release_freed_memory)
        log.info("model %s unloaded", name)

    async def close(self, timeout_s: float) -> None:
        """Drain and release every model (shutdown)."""
        self._draining = True
        versions = self.served_versions()
        for entry in self._entries.values():
            entry.served = {}
            self.background.cancel(entry.name)
        await asyncio.gather(*(asyncio.to_thread(v.close, timeout_s) for v in versions))

    def drain(self) -> None:
        """Shutdown has begun: readiness is off, and requests that reach a model from now on get 503 (retry on
        another replica) rather than 404. The server's one drain flag."""
        self._draining = True

    @staticmethod
    async def _withdraw(entry: ModelEntry, change: RepositoryChange | None, wanted_before: bool) -> None:
        """A failed upload leaves the disk as it was and does not make the model count for readiness."""
        if change is not None:
            entry.wanted = wanted_before
            await change.withdraw()

    async def _retire(self, versions: dict[int, ModelVersion]) -> None:
        """Let in-flight requests of replaced versions finish, then release them. Anything still queued at the
        deadline is told to retry on the current version (BatcherClosed), not failed."""
        timeout = self.settings.exit_timeout_s
        if versions:
            await asyncio.gather(*(asyncio.to_thread(v.close, timeout, replaced=True) for v in versions.values()))

    @staticmethod
    def _mark_failed(entry: ModelEntry, reason: str) -> None:
        """Record a failed load: versions still serving are READY again (progress may have shown them as
        LOADING during the attempt), the rest become UNAVAILABLE with the reason."""
        entry.model_status = VersionStatus(ModelState.READY if entry.served else ModelState.UNAVAILABLE, reason)
        for version in list(entry.status):
            if version in entry.served:
                entry.status[version] = VersionStatus(ModelState.READY)
            else:
                entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, reason)
        log.warning("model %s failed to load: %s", entry.name, reason)

    @staticmethod
    def _progress(entry: ModelEntry, version: int) -> Callable[[str], None]:
        """Show the loading step in progress (e.g. the optimizer's) as the version's reason in the index."""

        def report(step: str) -> None:
            entry.status[version] = VersionStatus(ModelState.LOADING, step)

        return report

    def _entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = ModelEntry(name)
        return entry

    # ---- memory budget and on-demand loading ------------------------------------------------------
    async def acquire(self, name: str, version: str = "", timeout_s: float | None = None) -> ModelVersion:
        """:meth:`get`, and with --load-on-demand, a model of the repository that is not loaded is loaded
        first: the request waits up to ``timeout_s`` (else --load-wait-s), sharing one load with every other
        request that came for it meanwhile. A model whose last load failed is not retried until its folder
        changes."""
        try:
            return self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            if not self._loads_on_demand(name):
                raise
        entry = self._entry(name)
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
        return self.get(name, version)

    def _loads_on_demand(self, name: str) -> bool:
        """Whether a request may load this model now: on-demand loading is on, the server is not draining, and
        the model is in the repository but serves nothing."""
        if not self.settings.load_on_demand or self._draining:
            return False
        entry = self._entries.get(name)
        if entry is not None and entry.served:
            return False  # loaded: a missing version is the request's error, not a reason to load
        try:
            return name in self.repository.model_names()
        except ServerError:
            return False

    async def _load_on_demand(self, entry: ModelEntry) -> None:
        async with entry.lock:  # a load already under way (an upload, a poll) finishes first
            loaded = bool(entry.served)
        if not loaded:
            await self.load(entry.name, trigger="on_demand")

    async def _make_room(self, name: str, config_text: str | None, trigger: LoadTrigger) -> int | None:
        """With a budget: unload idle models until this load's estimated cost fits, and hold that room for it
        (a ticket for MemoryBudget.release)."""
        if not self.budget.enabled:
            return None
        need = await asyncio.to_thread(self._estimate, name, config_text)
        snapshot, deadline = self._room_rules(trigger)
        return await self.budget.reserve(name, need, snapshot, self._evict, deadline)

    async def _fit_measured(
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
            await asyncio.to_thread(_close_all, built)
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
            loaded = self._read_config(name, config_text)
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

    def _count_load(self, name: str, trigger: LoadTrigger) -> None:
        if self.metrics is not None and self.metrics.enabled:
            self.metrics.loads.labels(name, trigger).inc()

    def memory_used(self) -> int:
        """Bytes every loaded version holds, as the budget counts them."""
        return sum(v.memory_bytes for v in self.served_versions())

    # ---- building (runs in a worker thread) ------------------------------------------------------
    async def _ensemble_members(
        self, name: str, config_text: str | None, trigger: LoadTrigger = "explicit"
    ) -> dict[str, MemberTensors] | None:
        """For an ensemble (None otherwise): load the members that are not served yet (a member's failure
        fails the ensemble's load, naming the step), and return each member's tensor names."""
        try:
            loaded = await asyncio.to_thread(self._read_config, name, config_text)
        except ServerError:
            return None  # the build reports it, under the model's lock
        if not is_ensemble(loaded.config):
            return None
        steps = parse_steps(name, loaded.config)
        chain = _LOADING_ENSEMBLES.get()
        token = _LOADING_ENSEMBLES.set((*chain, name))
        members: dict[str, MemberTensors] = {}
        self._entry(name).awaiting_members = True
        try:
            for step in steps:
                if step.model_name in members:
                    continue
                if step.model_name in chain:
                    raise LoadFailed(f"ensemble {name!r}: {step.label}: ensembles include each other (a cycle)")
                if step.model_name not in self.repository.model_names():
                    raise LoadFailed(f"ensemble {name!r}: {step.label}: the model is not in the repository")
                entry = self._entry(step.model_name)
                if entry.loads_in_flight and not entry.awaiting_members:  # start-up loads every model at once:
                    await entry.settled.wait()  # wait for its own load (not for an ensemble: a cycle would hang)
                async with entry.lock:  # a load under way finishes first
                    served = bool(entry.served)
                if not served:
                    try:
                        await self.load(step.model_name, trigger=trigger)  # on demand: its members too
                    except ServerError as exc:
                        raise LoadFailed(f"ensemble {name!r}: {step.label}: {exc.message}") from exc
                try:
                    member = self.get(step.model_name, step.model_version)
                except ServerError as exc:
                    raise LoadFailed(f"ensemble {name!r}: {step.label}: {exc.message}") from exc
                members[step.model_name] = MemberTensors(
                    frozenset(t.name for t in member.inputs), frozenset(t.name for t in member.outputs)
                )
        finally:
            self._entry(name).awaiting_members = False
            _LOADING_ENSEMBLES.reset(token)
        return members

    def _ensemble_stats(self, name: str, version: int) -> ModelStats:
        return ModelStats(self.metrics.for_version(name, str(version)) if self.metrics else None)

    def _pinned_on_disk(self, name: str) -> bool:
        try:
            return is_pinned(read_config(self.repository.model_dir(name)).config)
        except ServerError:
            return True  # a config that cannot be read: load it now, so the index shows why

    def _read_config(self, name: str, config_text: str | None) -> LoadedConfig:
        from server.repository.config import parse_config

        return parse_config(config_text, "json") if config_text else read_config(self.repository.model_dir(name))

    def _build_all(
        self, name: str, config_text: str | None, entry: ModelEntry, members: dict[str, MemberTensors] | None = None
    ) -> dict[int, ModelVersion]:
        loaded = self._read_config(name, config_text)
        versions = select_versions(loaded.config.version_policy, self.repository.versions(name))
        if is_ensemble(loaded.config):
            if members is None:
                raise LoadFailed(f"ensemble {name!r}: its config changed while its members loaded; load it again")
            if not versions:
                raise LoadFailed(f"ensemble {name!r} has no numeric version folder (Triton's layout: an empty 1/)")
            return {
                version: build_ensemble(name, version, loaded, members, self.get, self._ensemble_stats(name, version))
                for version in versions
            }
        if not versions:
            raise LoadFailed(f"model {name!r} has no numeric version folder with a model file")
        built: dict[int, ModelVersion] = {}
        try:
            for version in versions:
                entry.status.setdefault(version, VersionStatus(ModelState.LOADING, "loading"))
                built[version] = self.loader.build(name, version, loaded, self._progress(entry, version))
        except BaseException:
            for done in built.values():
                done.close(0)
            raise
        return built


def _ready_status(served: ModelVersion) -> VersionStatus:
    """READY; the reason says when the optimizer still has to run for it."""
    return VersionStatus(ModelState.READY, "optimizing: waiting" if served.pending is not None else "")


def _close_all(versions: dict[int, ModelVersion]) -> None:
    """Release versions built for a load nobody waits for any more."""
    for version in versions.values():
        version.close(0)


def is_pinned(config: ModelConfig) -> bool:
    """A config's ``parameters { key: "pinned" value { string_value: "true" } }``: never unloaded for the memory
    budget (a Triton-valid way to say it: Triton's config has no field for this)."""
    parameter = config.parameters.get("pinned")
    return parameter is not None and parameter.string_value.strip().lower() in ("true", "1", "yes")


def _in_use(versions: Iterable[ModelVersion]) -> bool:
    """Requests queued, running, or looked up and on their way to the queue."""
    return any(v.in_flight or v.batcher.pending for v in versions)


def _files(version: ModelVersion) -> int:
    return int(version.report.get("memory", {}).get("files_bytes", 0))
