"""The one place both protocols call: HTTP and gRPC handlers only decode, call a DataPlane method, and
encode. Everything here speaks plain Python objects (dicts in Triton's JSON shapes, numpy arrays)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol

from server import __version__
from server.errors import (
    InternalError,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelNotReady,
    ServerError,
    failure_reason,
)
from server.metrics import RequestCounters
from server.models.batching import BatcherClosed
from server.models.entry import ModelState
from server.models.manager import ModelManager
from server.models.version import ModelVersion, scheduling_parameters
from server.protocol.inference import InferenceRequest, InferenceResponse
from server.repository.config import config_to_json
from server.repository.layout import check_model_name
from server.repository.upload import (
    Receiver,
    StagedUpload,
    UploadResult,
    files_receiver,
    is_ensemble_config,
    recover_staging,
)

log = logging.getLogger("optiserve.models")

EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "system_shared_memory",
    "trace",
]


class UploadFile(Protocol):
    """One file of an upload as it is written; :meth:`close` makes it durable."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class UploadSink(Protocol):
    """Where an edge writes a streamed upload: the edge parses its wire format (the curl form) and hands each
    event here; the data plane's sink stages, counts and checks it (server/repository/upload.py's
    ``StagedUpload``). Blocking calls (``write``, ``close``, ``set_config``) belong in a worker thread."""

    def count(self, size: int) -> None:
        """Count bytes against the upload cap before writing them (413 past it)."""

    def open_model_file(self, filename: str) -> UploadFile:
        """The model file; ``filename`` is the client's name for it, only checked, never used as a path."""

    def open_extra_file(self, path: str) -> UploadFile:
        """A model-level file at ``path`` in the model folder (``labels.txt``, ``warmup/<name>``), checked
        like the load API's ``file:`` keys."""

    def open_samples_file(self) -> UploadFile:
        """The new version's ``samples.npz`` (the optimizer's validation samples)."""

    def request_version(self, text: str) -> None:
        """The version asked for, as sent."""

    def set_config(self, text: str) -> None:
        """The config (JSON text) sent with the upload."""


UploadReceiver = Callable[[UploadSink], Awaitable[None]]
"""An edge's reader of one upload body: writes what arrives into the sink it is given."""


class DataPlane:
    """Protocol-neutral server operations."""

    def __init__(self, models: ModelManager) -> None:
        self.models = models
        self.unrouted = models.metrics.for_unrouted() if models.metrics is not None else None
        self._uploads: set[asyncio.Future[list[int]]] = set()  # loads of uploads still running

    # ---- health and metadata ---------------------------------------------------------------------
    def live(self) -> bool:
        """The process is up and its event loop answers."""
        return True

    def ready(self) -> bool:
        """Ready to take traffic: models loaded and not draining."""
        return self.models.server_ready()

    def server_metadata(self) -> dict[str, Any]:
        """Name, version and the protocol extensions implemented."""
        return {"name": "optiserve", "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether this model (version) serves requests now (never while draining); a malformed version is a
        400 in every state."""
        return self.models.is_ready(name, version)

    async def resident(self, name: str, version: str = "") -> None:
        """With --load-on-demand, load the model if a request needs it and it is not loaded (no-op otherwise)."""
        if self.models.settings.load_on_demand:
            await self.models.acquire(name, version)

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """V2 model metadata: versions, platform, and input/output tensors with -1 for any size."""
        served = self.models.get(name, version)
        batch = [-1] if served.max_batch_size > 0 else []
        versions = [str(v.version) for v in self.models.served_versions() if v.name == name]
        return {
            "name": name,
            "versions": sorted(versions, key=int),
            "platform": served.config.platform,
            "inputs": [
                {"name": t.name, "datatype": t.datatype.name, "shape": batch + list(t.dims)} for t in served.inputs
            ],
            "outputs": [
                {"name": t.name, "datatype": t.datatype.name, "shape": batch + list(t.dims)} for t in served.outputs
            ],
        }

    def model_config(self, name: str, version: str = "") -> Any:
        """The completed config as a ModelConfig message (gRPC) ..."""
        return self.models.get(name, version).config

    def model_config_json(self, name: str, version: str = "") -> dict[str, Any]:
        """... and as Triton's JSON (HTTP)."""
        return config_to_json(self.model_config(name, version))

    def optimization_report(self, name: str, version: str = "") -> dict[str, Any]:
        """What the load-time optimizer did for this version: every step, its figures, what is served."""
        return self.models.get(name, version).report

    # ---- inference -------------------------------------------------------------------------------
    def inference(self, name: str, version: str = "") -> InferenceCall:
        """Begin one inference request: look up the version that serves it (404/503 at once, before the
        body is read or decoded) and return the call, a context manager that the edges wrap around reading,
        decoding, inferring and encoding, so that every outcome is counted exactly once. A request that fails
        here counts under ``model=""`` (see server/metrics.py)."""
        try:
            served = self.models.get(name, version)
        except (ModelNotFound, ModelNotReady) as exc:
            if self.models.settings.load_on_demand:  # InferenceCall.infer loads it, or raises exc again
                return InferenceCall(self.models, None, self.unrouted)
            self._count_unrouted(exc)
            raise
        except ServerError as exc:
            self._count_unrouted(exc)
            raise
        return InferenceCall(self.models, served, self.unrouted)

    def _count_unrouted(self, exc: ServerError) -> None:
        if self.unrouted is not None:
            self.unrouted.count(failure_reason(exc))

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Run one already-decoded request through the model's batcher, counted as one request."""
        with self.inference(request.model_name, request.model_version) as call:
            return await call.infer(request)

    # ---- statistics ------------------------------------------------------------------------------
    def statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics for every served version, one model, or one version."""
        versions = self.models.served_versions()
        if name:
            if version:
                versions = [self.models.get(name, version)]
            else:
                versions = [v for v in versions if v.name == name]
                if not versions:
                    self.models.get(name)  # raises the right 404/503
        stats = [v.stats.to_json(v.name, str(v.version)) for v in sorted(versions, key=lambda v: (v.name, v.version))]
        return {"model_stats": stats}

    # ---- repository ------------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model in the repository with its state and the reason of any failure."""
        rows = self.models.index()
        return [row for row in rows if row["state"] == "READY"] if ready_only else rows

    def require_model(self, name: str) -> None:
        """Raise ModelNotFound unless ``name`` is in the repository (loaded or not): for per-model settings."""
        self.models.repository.model_dir(name)

    async def load_model(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load (or reload) a model from the repository, optionally with a config given inline. With
        ``files`` (Triton's ``file:<version>/<name>``, ``file:<name>`` and ``file:warmup/<name>`` parameters)
        they are uploaded first, as a new version, and the config sent along becomes the model's config;
        returns once loaded (400 if it failed)."""
        check_model_name(name)
        self._check_control(uploading=bool(files))
        new_ensemble = config_json is not None and is_ensemble_config(config_json)
        if files or (new_ensemble and name not in self.models.repository.model_names()):
            result = await self._stage_and_load(name, files_receiver(files or {}, config_json), wait=True)
            if result.failed:
                raise LoadFailed(result.reason)
            return
        self.require_model(name)
        await self.models.load(name, config_json)

    async def unload_model(self, name: str) -> None:
        """Stop serving a model (its files stay on disk)."""
        check_model_name(name)
        self._check_control(uploading=False)
        await self.models.unload(name)

    # ---- uploads ---------------------------------------------------------------------------------
    def recover_uploads(self) -> None:
        """At start, before loading: finish committed uploads and delete unfinished ones."""
        recover_staging(self.models.repository.root)

    async def upload_model(self, name: str, receive: UploadReceiver, *, wait: bool) -> UploadResult:
        """Stage what ``receive`` writes, validate it, then publish and load it under the model's lock.
        Without ``wait`` this returns once the files are published (state LOADING)."""
        return await self._stage_and_load(name, receive, wait=wait)

    def _check_control(self, *, uploading: bool) -> None:
        """Triton's model control modes: none refuses every change, poll refuses load and unload (what is
        served follows the repository) but takes uploads, which change the repository for every replica."""
        mode = self.models.settings.model_control_mode
        if mode == "none" or (mode == "poll" and not uploading):
            what = "uploads, loads and unloads are" if mode == "none" else "explicit model load / unload is"
            raise InvalidInput(f"{what} not allowed with --model-control-mode {mode}")

    async def _stage_and_load(self, name: str, receive: Receiver, *, wait: bool) -> UploadResult:
        check_model_name(name)
        self._check_control(uploading=True)
        settings = self.models.settings
        staged = StagedUpload(self.models.repository.root, name, settings.max_upload_bytes)
        try:
            await receive(staged)
            await asyncio.to_thread(staged.validate, settings.default_max_batch_size)
        except OSError as exc:  # a full disk, most likely; nothing of the upload stays behind
            staged.discard()
            raise InternalError(f"could not store the upload of model {name!r}: {exc.strerror or exc}") from exc
        except BaseException:
            staged.discard()
            raise
        loading = asyncio.ensure_future(self._load_upload(staged))
        self._uploads.add(loading)
        loading.add_done_callback(_forget_upload(self._uploads))
        await _published_or_failed(staged, loading)
        if not wait:
            return UploadResult(name, staged.versions, ModelState.LOADING.value)
        try:
            served = await asyncio.shield(loading)
        except ServerError as exc:
            return UploadResult(name, staged.versions, ModelState.UNAVAILABLE.value, exc.message, failed=True)
        if staged.versions[-1] in served:
            return UploadResult(name, staged.versions, ModelState.READY.value)
        reason = f"loaded, but the model's version_policy serves versions {served}, not this one"
        return UploadResult(name, staged.versions, ModelState.UNAVAILABLE.value, reason)

    async def _load_upload(self, staged: StagedUpload) -> list[int]:
        try:
            # An ensemble's members load before the upload is published, from the config it carries.
            config = await asyncio.to_thread(staged.ensemble_config)
            return await self.models.load(staged.model_name, config, change=staged)
        finally:
            staged.discard()


class InferenceCall:
    """One inference request, from the lookup of its model version until its reply is encoded. Used as
    ``with dataplane.inference(model, version) as call:`` around decode, ``call.infer`` and encode: on exit it
    records the outcome (success, or the reason of whatever was raised) once, in the version's statistics and
    metrics, with the time since the lookup."""

    def __init__(self, models: ModelManager, served: ModelVersion | None, unrouted: RequestCounters | None) -> None:
        self.served = served
        self._models = models
        self._unrouted = unrouted
        self._started = time.monotonic_ns()
        self._request_id = ""
        if served is not None:
            served.in_flight += 1  # the memory budget does not unload a version a request holds

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Validate, queue and run the decoded request on the version looked up (with --load-on-demand, on
        the version loaded for it, waiting up to the request's timeout parameter)."""
        self._request_id = request.id
        if self.served is None:
            self._hold(await self._models.acquire(request.model_name, request.model_version, _timeout_s(request)))
        assert self.served is not None
        try:
            return await self.served.infer(request)
        except BatcherClosed:
            # The version was swapped out (or evicted) between lookup and queueing: serve it on the current one.
            timeout = _timeout_s(request)
            self._hold(await self._models.acquire(request.model_name, request.model_version, timeout))
            return await self.served.infer(request)

    def _hold(self, served: ModelVersion) -> None:
        if self.served is not None:
            self.served.in_flight -= 1
        served.in_flight += 1
        self.served = served

    def __enter__(self) -> InferenceCall:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        reason = None if exc is None else failure_reason(exc)
        served = self.served
        if served is None:  # an on-demand load that did not happen: counted as a request of no model
            if self._unrouted is not None:
                self._unrouted.count(reason or "other")
            return
        served.in_flight -= 1
        if reason in ("backend", "other"):
            request_id = self._request_id or uuid.uuid4().hex
            log.error("request %s to %s:%s failed: %s", request_id, served.name, served.version, exc)
        served.stats.record_request(reason is None, time.monotonic_ns() - self._started, reason or "")


def _timeout_s(request: InferenceRequest) -> float | None:
    """The request's own ``timeout`` parameter (Triton's, in microseconds, read as the batcher reads it), bounding
    how long it waits for an on-demand load; None: the server's --load-wait-s."""
    timeout_us = scheduling_parameters(request.parameters)[1]
    return timeout_us / 1e6 if timeout_us else None


# The failure reason of each error follows its wire status, so a new error class lands in the right bucket.
async def _published_or_failed(staged: StagedUpload, loading: asyncio.Future[list[int]]) -> None:
    """Wait until the upload is published, or raise why its load task failed before that."""
    published = asyncio.ensure_future(staged.published.wait())
    try:
        await asyncio.wait((published, loading), return_when=asyncio.FIRST_COMPLETED)
    finally:
        published.cancel()
    if not staged.published.is_set():
        loading.result()  # raises the reason (e.g. a version that already exists)
        raise InternalError("the upload ended without being published")


def _forget_upload(uploads: set[asyncio.Future[list[int]]]) -> Callable[[asyncio.Future[list[int]]], None]:
    """Done callback: drop the task and mark its exception as seen (the index keeps the reason)."""

    def forget(task: asyncio.Future[list[int]]) -> None:
        uploads.discard(task)
        if not task.cancelled():
            task.exception()

    return forget
