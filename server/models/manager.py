"""Loaded models: one :class:`ModelVersion` per served version (backends + batcher + stats), and the
:class:`ModelManager` that loads, swaps and unloads them and reports their states."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Literal, Protocol

from server.errors import InvalidInput, LoadFailed, ModelNotFound, ModelNotReady, ServerError, ServerUnavailable
from server.metrics import Metric, ServerMetrics, memory_families, state_families
from server.models.background import BackgroundOptimizer
from server.models.budget import NoRoomYet
from server.models.ensemble import EnsembleVersion, MemberTensors, build_ensemble, is_ensemble, parse_steps
from server.models.entry import ModelEntry, ModelState, VersionStatus
from server.models.loader import VersionLoader
from server.models.memory import prime_onnxruntime, release_freed_memory
from server.models.residency import Residency, close_all, is_pinned
from server.models.response_cache import ResponseCache
from server.models.stats import ModelStats
from server.models.threads import in_daemon_thread
from server.models.version import ModelVersion
from server.protocol.numbers import parse_uint
from server.repository.config import LoadedConfig, read_config
from server.repository.layout import Repository, select_versions
from server.settings import Settings

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
        self.residency = Residency(
            self._entries,
            repository,
            settings,
            metrics,
            self.background,
            retire=self._retire,
            config_of=self._read_config,
            load_on_demand=lambda name: self.load(name, trigger="on_demand"),
        )

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
            *memory_families(memory, self.residency.budget.limit, self.residency.memory_used()),
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
            names = [name for name in names if await asyncio.to_thread(self.residency.pinned_on_disk, name)]
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
                ticket = await self.residency.make_room(name, config_text, trigger)
                built = await in_daemon_thread(
                    lambda: self._build_all(name, config_text, entry, members), name=f"load-{name}", orphan=close_all
                )
                await self.residency.fit_measured(name, built, ticket, trigger)
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
                    self.residency.budget.release(ticket)
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

    def _count_load(self, name: str, trigger: LoadTrigger) -> None:
        if self.metrics is not None and self.metrics.enabled:
            self.metrics.loads.labels(name, trigger).inc()

    # ---- on-demand loading ----------------------------------------------------------------------
    async def acquire(self, name: str, version: str = "", timeout_s: float | None = None) -> ModelVersion:
        """:meth:`get`, and with --load-on-demand, a model of the repository that is not loaded is loaded
        first: the request waits up to ``timeout_s`` (else --load-wait-s), sharing one load with every other
        request that came for it meanwhile. A model whose last load failed is not retried until its folder
        changes."""
        try:
            return self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            if self._draining or not self.residency.loads_on_demand(name):
                raise
        await self.residency.load_for_request(self._entry(name), timeout_s)
        return self.get(name, version)

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
