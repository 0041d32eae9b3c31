"""Loaded models: one :class:`ModelVersion` per served version (backends + batcher + stats), and the
:class:`ModelManager` that loads, swaps and unloads them and reports their states."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TypeVar

from optimizers.runtime import SessionSpec
from server.errors import InvalidInput, LoadFailed, ModelNotFound, ModelNotReady, ServerError, ServerUnavailable
from server.metrics import Metric, ServerMetrics, state_families
from server.models.ensemble import EnsembleVersion, MemberTensors, build_ensemble, is_ensemble, parse_steps
from server.models.loader import PendingOptimization, VersionLoader, phase_fields, phase_of
from server.models.response_cache import ResponseCache
from server.models.stats import ModelStats
from server.models.threads import in_daemon_thread, lower_thread_priority
from server.models.version import ModelVersion
from server.protocol.numbers import parse_uint
from server.repository.config import LoadedConfig, read_config
from server.repository.layout import Repository, select_versions
from server.settings import Settings

log = logging.getLogger("optiserve.models")
T = TypeVar("T")
_LOADING_ENSEMBLES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("ensembles", default=())
_ORIGINAL_SESSION = SessionSpec()


class RepositoryChange(Protocol):
    """Files to publish under a model's lock right before it loads, and to withdraw if that load fails."""

    async def publish(self) -> None: ...

    async def withdraw(self) -> None: ...


class ModelState(str, Enum):
    """Triton's model states, as the repository index reports them."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class VersionStatus:
    """The state the index reports for one version."""

    state: ModelState
    reason: str = ""


@dataclass
class ModelEntry:
    """Everything the manager knows about one model name."""

    name: str
    served: dict[int, ModelVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)
    model_status: VersionStatus = field(default_factory=lambda: VersionStatus(ModelState.UNAVAILABLE))
    wanted: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fingerprint: tuple[Any, ...] | None = None
    """The model folder as the last load attempt found it (poll mode compares against it)."""


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
        self._optimizer_gate = threading.Lock()  # one background optimization at a time per server
        self._background: dict[tuple[str, int], tuple[asyncio.Task[None], threading.Event]] = {}

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
        return state_families(states, pending, variants)

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
                rows.append(
                    {
                        "name": name,
                        "version": str(version),
                        "state": vstatus.state.value,
                        "reason": vstatus.reason,
                    }
                )
        return rows

    # ---- changes -------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every model of the repository (concurrently); failures are recorded, not raised."""
        names = self.repository.model_names()
        for name in names:
            entry = self._entry(name)
            entry.wanted = True
            # LOADING from now on, before load() first awaits (an ensemble's members, the model's lock): the
            # index must never show a model that has yet to start loading as UNAVAILABLE without a reason.
            entry.model_status = VersionStatus(ModelState.LOADING, "waiting to load")
        results = await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("model %s failed to load: %s", name, result)
        self._startup_done = True

    async def load(
        self, name: str, config_text: str | None = None, change: RepositoryChange | None = None
    ) -> list[int]:
        """(Re)load a model from the repository and return the versions now served. The old versions serve
        until the new ones are ready; on failure they keep serving and the index shows the reason.
        ``change`` (an upload) is published under the model's lock first, and withdrawn if the load fails."""
        entry = self._entry(name)
        started = time.monotonic()
        try:
            members = await self._ensemble_members(name, config_text)
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
            entry.wanted = True
            entry.model_status = VersionStatus(ModelState.LOADING, "loading")
            try:
                built = await in_daemon_thread(
                    lambda: self._build_all(name, config_text, entry, members), name=f"load-{name}", orphan=_close_all
                )
            except asyncio.CancelledError:
                # The caller went away (a client timeout, shutdown): the build finishes on its own and its
                # result is closed; the model must not stay LOADING, nor an upload stay half-published.
                self._mark_failed(entry, "load cancelled before it finished")
                await asyncio.shield(self._withdraw(entry, change, wanted_before))
                raise
            except ServerError as exc:
                self._mark_failed(entry, exc.message)
                await self._withdraw(entry, change, wanted_before)
                raise
            except Exception as exc:
                self._mark_failed(entry, f"load failed: {exc}")
                await self._withdraw(entry, change, wanted_before)
                raise LoadFailed(f"model {name!r}: {exc}") from exc
            old = entry.served
            entry.served = built
            entry.status = {v: _ready_status(built[v]) for v in built}
            entry.model_status = VersionStatus(ModelState.READY)
            log.info("model %s ready, versions %s", name, sorted(built))
            self._after_ready(entry, built, started)
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
            current = await asyncio.to_thread(self.repository.fingerprint, name)
            if current is not None and (entry is None or entry.fingerprint != current):
                changed.append(name)
        for name in gone:
            log.info("poll: model %s was removed from the repository; unloading it", name)
        for name in changed:
            log.info("poll: model %s is new or changed in the repository; loading it", name)
        results = await asyncio.gather(
            *(self.unload(name) for name in gone), *(self.load(name) for name in changed), return_exceptions=True
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
            self._cancel_background(name)
            entry.wanted = False
            for version in old:
                entry.status[version] = VersionStatus(ModelState.UNAVAILABLE, "unloaded")
            entry.model_status = VersionStatus(ModelState.UNAVAILABLE, "unloaded")
        await self._retire(old)
        log.info("model %s unloaded", name)

    async def close(self, timeout_s: float) -> None:
        """Drain and release every model (shutdown)."""
        self._draining = True
        versions = self.served_versions()
        for entry in self._entries.values():
            entry.served = {}
            self._cancel_background(entry.name)
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

    # ---- background optimization ----------------------------------------------------------------
    def _after_ready(self, entry: ModelEntry, built: dict[int, ModelVersion], started: float) -> None:
        """Record time to ready; versions serving their original model get a background optimization (one
        server-wide at a time); the rest are already served as the optimizer chose."""
        self._cancel_background(entry.name)  # a reload replaces what an older load was still optimizing
        elapsed = time.monotonic() - started
        for number, served in built.items():
            self._gauge("time_to_ready", served, elapsed)
            if served.pending is None:
                self._gauge("time_to_optimized", served, elapsed)
                continue
            cancelled = threading.Event()
            task = asyncio.get_running_loop().create_task(
                self._optimize_later(entry, served, served.pending, started, cancelled),
                name=f"optimize-{entry.name}-{number}",
            )
            self._background[(entry.name, number)] = (task, cancelled)
            task.add_done_callback(functools.partial(self._forget, (entry.name, number)))

    def _forget(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        current = self._background.get(key)
        if current is not None and current[0] is task:
            del self._background[key]

    def _cancel_background(self, name: str) -> None:
        """Stop the background optimizations of a model (unload, reload, shutdown): a waiting one never runs,
        a running one finishes on its thread and its result is discarded."""
        for key in [k for k in self._background if k[0] == name]:
            task, cancelled = self._background.pop(key)
            cancelled.set()
            task.cancel()

    async def _optimize_later(
        self,
        entry: ModelEntry,
        served: ModelVersion,
        source: PendingOptimization,
        started: float,
        cancelled: threading.Event,
    ) -> None:
        """Optimize a READY version serving its original model, then swap the chosen variant in."""
        if self.settings.optimize_delay_s > 0:
            await asyncio.sleep(self.settings.optimize_delay_s)
        progress = self._optimizing(entry, served)
        try:
            result = await in_daemon_thread(
                lambda: self._gated(cancelled, lambda: self.loader.optimize(source, progress), lowered=True),
                name=f"optimize-{entry.name}",
            )
            if result is None or not self._still_served(entry, served):
                return
            rebuilt = None
            if result.model_path != source.model_path or result.session != _ORIGINAL_SESSION:
                # A fresh thread started from the loop's: the serving sessions (and their onnxruntime pools)
                # get normal priority, not the optimizer thread's lowered one.
                rebuilt = await in_daemon_thread(
                    lambda: self.loader.rebuild(source, result, served.stats),
                    name=f"rebuild-{entry.name}",
                    orphan=_close_version,
                )
        except asyncio.CancelledError:
            log.info("model %s version %s: background optimization cancelled", entry.name, served.version)
            raise
        except Exception as exc:  # the original keeps serving; the report says why
            log.warning("model %s version %s: background optimization failed: %s", entry.name, served.version, exc)
            served.report = {**served.report, **phase_fields("original"), "error": str(exc)}
            served.pending = None
            if self._still_served(entry, served):
                entry.status[served.version] = VersionStatus(ModelState.READY)
            return
        await self._swap_in(entry, served, rebuilt, result.report, started)

    def _gated(self, cancelled: threading.Event, fn: Callable[[], T], *, lowered: bool = False) -> T | None:
        """Run ``fn`` under the server's optimizer gate unless cancelled while waiting for it (on a thread: the
        gate stays held until a running optimization really ends, even when nobody waits for it any more).
        ``lowered``: at --optimize-nice lower priority (this thread ends with the run), so serving keeps the CPU."""
        if lowered:
            lower_thread_priority(self.settings.optimize_nice)
        with self._optimizer_gate:
            return None if cancelled.is_set() else fn()

    async def _swap_in(
        self,
        entry: ModelEntry,
        served: ModelVersion,
        rebuilt: ModelVersion | None,
        report: dict[str, Any],
        started: float,
    ) -> None:
        """Serve the optimizer's choice on the same (name, version), atomically; the replaced version drains
        (queued requests finish or are retried on the new one). A version no longer served is not resurrected."""
        number = served.version
        async with entry.lock:
            if not self._still_served(entry, served):
                log.info("model %s version %s: no longer served; optimized variant discarded", entry.name, number)
                if rebuilt is not None:
                    await asyncio.to_thread(rebuilt.close, 0)
                return
            phase = phase_of(str(report.get("selected", "original")))
            serving = rebuilt if rebuilt is not None else served
            full = {**report, **_served_facts(serving.report), **phase_fields(phase)}
            conversion = [s for s in served.report.get("steps", [])[:1] if s.get("name") == "convert"]
            if conversion:
                full["steps"] = conversion + list(full.get("steps", []))
            serving.report, serving.pending = full, None
            if rebuilt is not None:
                entry.served = {**entry.served, number: rebuilt}
            entry.status[number] = VersionStatus(ModelState.READY)
        elapsed = time.monotonic() - started
        self._gauge("time_to_optimized", served, elapsed)
        log.info(
            "model %s version %s %s %.2fs after its load began: serving %s",
            entry.name,
            number,
            phase,
            elapsed,
            report.get("selected", "original"),
        )
        if rebuilt is not None:
            await self._retire({number: served})

    @staticmethod
    def _still_served(entry: ModelEntry, served: ModelVersion) -> bool:
        return entry.served.get(served.version) is served

    def _optimizing(self, entry: ModelEntry, served: ModelVersion) -> Callable[[str], None]:
        """Progress of a background run: the report's ``step`` and the index reason, while the version serves."""

        def report(step: str) -> None:
            if self._still_served(entry, served):
                served.report = {**served.report, **phase_fields("optimizing", step)}
                entry.status[served.version] = VersionStatus(ModelState.READY, f"optimizing: {step}")

        return report

    def _gauge(self, which: str, served: ModelVersion, seconds: float) -> None:
        if self.metrics is not None and self.metrics.enabled:
            getattr(self.metrics, which).labels(served.name, str(served.version)).set(round(seconds, 3))

    # ---- building (runs in a worker thread) ------------------------------------------------------
    async def _ensemble_members(self, name: str, config_text: str | None) -> dict[str, MemberTensors] | None:
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
        try:
            for step in steps:
                if step.model_name in members:
                    continue
                if step.model_name in chain:
                    raise LoadFailed(f"ensemble {name!r}: {step.label}: ensembles include each other (a cycle)")
                if step.model_name not in self.repository.model_names():
                    raise LoadFailed(f"ensemble {name!r}: {step.label}: the model is not in the repository")
                entry = self._entry(step.model_name)
                async with entry.lock:  # a load under way (start-up loads every model at once) finishes first
                    served = bool(entry.served)
                if not served:
                    try:
                        await self.load(step.model_name)
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


def _served_facts(report: dict[str, Any]) -> dict[str, Any]:
    """What the loader adds to the optimizer's report about the instances that really serve."""
    return {key: report[key] for key in ("instances", "warmup") if key in report}


def _ready_status(served: ModelVersion) -> VersionStatus:
    """READY; the reason says when the optimizer still has to run for it."""
    return VersionStatus(ModelState.READY, "optimizing: waiting" if served.pending is not None else "")


def _close_version(version: ModelVersion) -> None:
    version.close(0)


def _close_all(versions: dict[int, ModelVersion]) -> None:
    """Release versions built for a load nobody waits for any more."""
    for version in versions.values():
        version.close(0)
