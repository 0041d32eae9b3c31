"""FastAPI routes for KServe V2 / Triton HTTP. Handlers decode, call the DataPlane, encode: nothing else."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.auth import AccessPolicy, Scope
from server.dataplane import DataPlane
from server.errors import ClientGone, InternalError, InvalidInput, PayloadTooLarge, ServerError
from server.http.body import read_body
from server.http.codec import HEADER_LENGTH, parse_json_object
from server.http.multipart import form_receiver
from server.http.responses import JSON, error_response, json_response
from server.protocol.numbers import is_ascii_uint
from server.protocol.shared_memory import SharedMemoryRegistry
from server.repository.replicas import Fleet
from server.settings import Settings
from server.tracing import Tracer

UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "model": {"type": "string", "format": "binary", "description": "the ONNX model file"},
                        "config": {"type": "string", "description": "model config as JSON (Triton's field names)"},
                        "version": {"type": "integer", "minimum": 1, "description": "default: the next free one"},
                    },
                }
            }
        },
    }
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "example": "FP32"},
        "parameters": {"type": "object", "description": "binary_data_size: this tensor's bytes after the JSON"},
        "data": {"type": "array", "items": {}, "description": "row-major values (absent with binary_data_size)"},
    },
}
INFER_DOCS = {
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "length of the JSON header when binary tensor data follows it (binary extension)",
        }
    ],
    "requestBody": {
        "required": True,
        "description": f"JSON; with {HEADER_LENGTH}, that many bytes of JSON followed by the binary tensor data",
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object", "description": "e.g. binary_data_output, priority"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


async def read_request_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) anything over ``limit`` before or after decompression."""
    return await read_body(request.receive, {k.lower(): v for k, v in request.headers.items()}, limit)


def create_http_app(
    dataplane: DataPlane,
    settings: Settings,
    access: AccessPolicy,
    registry: CollectorRegistry | None = None,
    regions: SharedMemoryRegistry | None = None,
    fleet: Fleet | None = None,
    tracer: Tracer | None = None,
) -> FastAPI:
    """Build the FastAPI application around one DataPlane (and its metrics registry, if metrics are on): every
    route but inference, which server/http/fast.py serves in front of it (here it is only documented)."""
    app = FastAPI(title="optiserve", version=dataplane.server_metadata()["version"], docs_url="/docs")
    _install_error_handlers(app)
    _add_health_routes(app, dataplane)
    _add_model_routes(app, dataplane, _guard(access, Scope.INFERENCE))
    _document_infer_routes(app)
    _add_repository_routes(app, dataplane, settings, access)
    _add_shared_memory_routes(app, regions or SharedMemoryRegistry(enabled=False), settings, access)
    if fleet is not None:
        _add_fleet_route(app, fleet, _guard(access, Scope.INFERENCE))
    _add_trace_routes(app, dataplane, tracer or Tracer(), access)
    if registry is not None:
        _add_metrics_route(app, registry)
    return app


def _add_shared_memory_routes(
    app: FastAPI, regions: SharedMemoryRegistry, settings: Settings, access: AccessPolicy
) -> None:
    """Triton's system shared-memory extension. Status is an inference-scope read; registering maps a segment
    of this host into the server, so it (and unregistering) takes the admin scope (loopback-only by default)."""
    guard = _guard(access, Scope.INFERENCE)
    admin = _guard(access, Scope.ADMIN)

    @app.get("/v2/systemsharedmemory/status", tags=["shared memory"], dependencies=guard)
    async def shm_status_all() -> Response:
        return json_response(regions.status())

    @app.get("/v2/systemsharedmemory/region/{name}/status", tags=["shared memory"], dependencies=guard)
    async def shm_status(name: str) -> Response:
        return json_response(regions.status(name))

    @app.post("/v2/systemsharedmemory/region/{name}/register", tags=["shared memory"], dependencies=admin)
    async def shm_register(request: Request, name: str) -> Response:
        body = parse_json_object(await read_request_body(request, 64 * 1024))
        regions.register(name, body.get("key"), body.get("offset", 0), body.get("byte_size"))
        return json_response({})

    @app.post("/v2/systemsharedmemory/unregister", tags=["shared memory"], dependencies=admin)
    async def shm_unregister_all() -> Response:
        regions.unregister()
        return json_response({})

    @app.post("/v2/systemsharedmemory/region/{name}/unregister", tags=["shared memory"], dependencies=admin)
    async def shm_unregister(name: str) -> Response:
        regions.unregister(name)
        return json_response({})


def _add_trace_routes(app: FastAPI, dataplane: DataPlane, tracer: Tracer, access: AccessPolicy) -> None:
    """Triton's trace extension (server/tracing/control.py): reading the settings is an inference-scope read,
    changing them takes the admin scope."""
    guard = _guard(access, Scope.INFERENCE)
    admin = _guard(access, Scope.ADMIN)

    @app.get("/v2/trace/setting", tags=["tracing"], dependencies=guard)
    async def trace_settings() -> Response:
        return json_response(tracer.control.settings())

    @app.post("/v2/trace/setting", tags=["tracing"], dependencies=admin)
    async def update_trace_settings(request: Request) -> Response:
        return json_response(tracer.control.update(None, await _settings_body(request)))

    @app.get("/v2/models/{model_name}/trace/setting", tags=["tracing"], dependencies=guard)
    async def model_trace_settings(model_name: str) -> Response:
        dataplane.require_model(model_name)
        return json_response(tracer.control.settings(model_name))

    @app.post("/v2/models/{model_name}/trace/setting", tags=["tracing"], dependencies=admin)
    async def update_model_trace_settings(request: Request, model_name: str) -> Response:
        dataplane.require_model(model_name)
        return json_response(tracer.control.update(model_name, await _settings_body(request)))


async def _settings_body(request: Request) -> dict[str, Any]:
    """A trace setting request's JSON object (Triton: setting name -> string, list of strings or null)."""
    body = await read_request_body(request, 64 * 1024)
    return parse_json_object(body, "trace settings") if body.strip() else {}


def _add_fleet_route(app: FastAPI, fleet: Fleet, guard: list[Any]) -> None:
    """optiserve's extension next to Triton's repository index: what every replica sharing this repository
    serves, and whether they have converged (read like the index: inference scope)."""

    @app.get("/v2/repository/replicas", tags=["repository"], dependencies=guard)
    async def repository_replicas() -> Response:
        return json_response(await asyncio.to_thread(fleet.status))


def _add_metrics_route(app: FastAPI, registry: CollectorRegistry) -> None:
    @app.get("/metrics", tags=["metrics"])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def server_error(_: Request, exc: ServerError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(InvalidInput(f"{where}: {first.get('msg', 'invalid request')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        return json_response({"error": str(exc)}, 499)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        return error_response(InternalError(f"internal error: {type(exc).__name__}: {exc}"))


def _add_health_routes(app: FastAPI, dataplane: DataPlane) -> None:
    @app.get("/v2/health/live", tags=["health"])
    async def live() -> Response:
        return json_response({"live": dataplane.live()})

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> Response:
        is_ready = dataplane.ready()
        return json_response({"ready": is_ready}, 200 if is_ready else 503)

    @app.get("/v2", tags=["metadata"])
    async def server_metadata() -> Response:
        return json_response(dataplane.server_metadata())


def _guard(access: AccessPolicy, scope: Scope) -> list[Any]:
    """Route dependencies enforcing ``scope``; none for an open scope, so open routes pay nothing."""
    if not access.guards(scope):
        return []

    async def authorize(request: Request) -> None:
        client = request.client
        access.check(scope, request.headers.get("authorization"), client.host if client else None)

    return [Depends(authorize)]


def _add_model_routes(app: FastAPI, dataplane: DataPlane, guard: list[Any]) -> None:
    @app.get("/v2/models/stats", tags=["statistics"], dependencies=guard)
    async def all_stats() -> Response:
        return json_response(dataplane.statistics())

    per_model: list[tuple[str, Callable[[str, str], Any], str]] = [
        ("", dataplane.model_metadata, "metadata"),
        ("/config", dataplane.model_config_json, "metadata"),
        ("/stats", dataplane.statistics, "statistics"),
        ("/optimization", dataplane.optimization_report, "optimization"),
    ]
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        app.add_api_route(f"{prefix}/ready", _ready_handler(dataplane), methods=["GET"], tags=["health"])
        for suffix, read, tag in per_model:
            # Clients read metadata and config before they infer (perf_analyzer does): with --load-on-demand
            # those load the model too.
            load = dataplane.resident if tag == "metadata" else None
            route = _json_handler(read, load)
            app.add_api_route(prefix + suffix, route, methods=["GET"], tags=[tag], dependencies=guard)


def _json_handler(read: Callable[[str, str], Any], load: Callable[[str, str], Awaitable[None]] | None = None) -> Any:
    """A GET route answering ``read(model, version)`` as JSON, after ``load(model, version)`` if given."""

    async def handler(model_name: str, model_version: str = "") -> Response:
        if load is not None:
            await load(model_name, model_version)
        return json_response(read(model_name, model_version))

    handler.__name__ = getattr(read, "__name__", "handler")
    return handler


def _ready_handler(dataplane: DataPlane) -> Any:
    async def model_ready(model_name: str, model_version: str = "") -> Response:
        is_ready = dataplane.model_ready(model_name, model_version)
        return json_response({"name": model_name, "ready": is_ready}, 200 if is_ready else 503)

    return model_ready


def _document_infer_routes(app: FastAPI) -> None:
    """Docs-only entries for ``POST .../infer``: InferFastPath (server/http/fast.py) answers every such request
    before FastAPI routes it, so these handlers never serve; they only put the endpoint on /docs."""

    async def infer(model_name: str, model_version: str = "") -> Response:
        raise InternalError("inference is served by server.http.fast.InferFastPath, which is not in front of this app")

    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
        app.add_api_route(path, infer, methods=["POST"], tags=["inference"], openapi_extra=INFER_DOCS)


def _add_repository_routes(app: FastAPI, dataplane: DataPlane, settings: Settings, access: AccessPolicy) -> None:
    admin = _guard(access, Scope.ADMIN)
    # Triton's upload path carries the files base64-encoded in the JSON body.
    load_limit = settings.max_request_bytes + (settings.max_upload_bytes * 4 + 2) // 3

    @app.post("/v2/repository/index", tags=["repository"], dependencies=_guard(access, Scope.INFERENCE))
    async def repository_index(request: Request) -> Response:
        body = await read_request_body(request, settings.max_request_bytes)
        options = parse_json_object(body) if body.strip() else {}
        return json_response(dataplane.repository_index(bool(options.get("ready", False))))

    @app.post("/v2/repository/models/{model_name}/load", tags=["repository"], dependencies=admin)
    async def load(request: Request, model_name: str) -> Response:
        body = await read_request_body(request, load_limit)
        options = parse_json_object(body) if body.strip() else {}
        parameters = options.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput("parameters: must be a JSON object")
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            raise InvalidInput("parameters.config: must be a JSON string")
        await dataplane.load_model(model_name, config, _file_parameters(parameters))
        return json_response({})

    @app.post(
        "/v2/repository/models/{model_name}/upload",
        tags=["repository"],
        dependencies=admin,
        status_code=201,
        openapi_extra=UPLOAD_FORM,
    )
    async def upload(request: Request, model_name: str, wait: bool = False) -> Response:
        declared = request.headers.get("content-length", "")
        if is_ascii_uint(declared) and int(declared) > settings.max_upload_bytes + settings.max_request_bytes:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {settings.max_upload_bytes}")
        receive = form_receiver(request.headers.get("content-type", ""), request.stream(), settings.max_request_bytes)
        try:
            result = await dataplane.upload_model(model_name, receive, wait=wait)
        except ClientDisconnect:
            raise ClientGone("client disconnected during the upload") from None
        if result.failed:
            return json_response({"error": result.reason, **result.to_json()}, 400)
        return json_response(result.to_json(), 201)

    @app.post("/v2/repository/models/{model_name}/unload", tags=["repository"], dependencies=admin)
    async def unload(request: Request, model_name: str) -> Response:
        await dataplane.unload_model(model_name)
        return json_response({})


def _file_parameters(parameters: dict[str, Any]) -> dict[str, bytes]:
    """Triton's ``file:<version>/<name>`` load parameters, base64-decoded (key without the prefix)."""
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if not key.startswith("file:"):
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"parameters.{key}: must be a base64 string")
        try:
            files[key.removeprefix("file:")] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"parameters.{key}: is not valid base64") from None
    return files
